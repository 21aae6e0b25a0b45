"""The llama.cpp programs a split runs: `ggml-rpc-server` (lending) and `llama-server` (borrowing).

install.sh builds them with the RPC backend from the same llama.cpp sources as the installed
llama-cpp-python wheel and puts them in <venv>/libexec/pinkybrain/ with a VERSION file naming that wheel's
version; PINKYBRAIN_LLAMA_TOOLS names another folder. A build for another llama-cpp-python version is
not used: RPC peers must speak the same protocol as each other, and the answers must match the engine's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

RPC_SERVER = "ggml-rpc-server"
LLAMA_SERVER = "llama-server"
_lock = threading.Lock()
_devices_cache: dict[str, list[str]] = {}


@dataclass(frozen=True)
class Tools:
    folder: Path
    rpc_server: Path | None
    llama_server: Path | None
    version: str | None  # the llama-cpp-python version the tools were built from
    problem: str | None  # why they cannot be used (None: they can)

    @property
    def usable(self) -> bool:
        return self.problem is None


def tools_folder() -> Path:
    override = os.environ.get("PINKYBRAIN_LLAMA_TOOLS")
    return Path(override) if override else Path(sys.prefix) / "libexec" / "pinkybrain"


def _wheel_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("llama-cpp-python")
    except Exception:  # noqa: BLE001 - not installed: the tools still report their own version
        return None


def find_tools() -> Tools:
    folder = tools_folder()

    def exe(name: str) -> Path | None:
        path = folder / name
        return path if path.is_file() and os.access(path, os.X_OK) else None

    rpc, server = exe(RPC_SERVER), exe(LLAMA_SERVER)
    try:
        version = (folder / "VERSION").read_text().strip() or None
    except OSError:
        version = None
    problem = None
    if rpc is None or server is None:
        problem = f"llama.cpp's RPC tools are not built in {folder} (./install.sh builds them)"
    elif version != _wheel_version():
        problem = (f"the RPC tools in {folder} were built from llama-cpp-python {version}, the installed one is "
                   f"{_wheel_version()}: rerun ./install.sh")
    return Tools(folder, rpc, server, version, problem)


def devices(tools: Tools) -> list[str]:
    """The compute devices llama-server sees (`--list-devices`), e.g. ["CPU"] or ["CUDA0", ...]; cached."""
    if tools.llama_server is None:
        return []
    key = str(tools.llama_server)
    with _lock:
        if key in _devices_cache:
            return list(_devices_cache[key])
    try:
        out = subprocess.run([str(tools.llama_server), "--list-devices"], capture_output=True, text=True,
                             timeout=20, stdin=subprocess.DEVNULL, check=False)
        text = out.stdout + out.stderr
    except (OSError, subprocess.SubprocessError):
        text = ""
    found = []
    listing = False
    for line in text.splitlines():
        if line.strip().lower().startswith("available devices"):
            listing = True
            continue
        if listing and ":" in line and line.startswith(" "):
            found.append(line.split(":", 1)[0].strip())
    found = found or ["CPU"]  # a CPU-only build lists no extra device: the CPU backend is always there
    with _lock:
        _devices_cache[key] = found
    return list(found)
