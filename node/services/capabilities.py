"""What this machine can do, reported honestly for `GET /api/capabilities`.

Values come from the OS (psutil, /proc, sysctl), the GPU vendors' own tools when installed, and the
llama.cpp build that will actually run inference. Nothing is guessed: a value that cannot be read is
None (or an empty list for GPUs), never a default that looks real. Every probe is bounded in time
and never raises, so one broken tool cannot take the endpoint down.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psutil

SUBPROCESS_TIMEOUT_SECS = 5.0
# GPUs are rarely hot-plugged; re-probing now and then keeps a long-running node honest without
# paying nvidia-smi's start-up (up to a second) on every request.
GPU_CACHE_TTL_SECS = 300.0

_NVIDIA_QUERY = ["--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"]
_MIB = 1024 * 1024

_lock = threading.Lock()
_cpu_model_cache: str | None = None
_llama_cache: dict | None = None
_gpu_cache: tuple[float, list[dict]] | None = None


def clear_cache() -> None:
    """Forget cached probes (tests; or after installing a driver without restarting)."""
    global _cpu_model_cache, _llama_cache, _gpu_cache
    with _lock:
        _cpu_model_cache = _llama_cache = _gpu_cache = None


def _run(argv: list[str], timeout: float | None = None) -> str | None:
    """stdout of a tool, or None if it is missing, fails, hangs or prints nothing."""
    timeout = SUBPROCESS_TIMEOUT_SECS if timeout is None else timeout
    exe = shutil.which(argv[0])
    if exe is None:
        return None
    try:
        proc = subprocess.run(
            [exe, *argv[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    return proc.stdout


# ---------------------------------------------------------------------------------------------- CPU


def _cpu_model_uncached() -> str | None:
    system = platform.system()
    if system == "Linux":
        try:
            text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = ""
        # x86 says "model name"; ARM kernels vary ("Model" on a Raspberry Pi, "Hardware", "Processor").
        for field in ("model name", "Model", "Hardware", "Processor", "cpu model"):
            match = re.search(rf"^{re.escape(field)}\s*:\s*(.+?)\s*$", text, re.MULTILINE)
            if match and match.group(1):
                return match.group(1)
    elif system == "Darwin":
        out = _run(["sysctl", "-n", "machdep.cpu.brand_string"])
        if out:
            return out.strip()
    return platform.processor() or None


def cpu_model() -> str | None:
    global _cpu_model_cache
    with _lock:
        if _cpu_model_cache is None:
            _cpu_model_cache = _cpu_model_uncached() or ""
        return _cpu_model_cache or None


def _usable_cores() -> int | None:
    """Cores this process may run on (affinity/cpuset), which can be fewer than the machine has."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _cgroup_memory_limit() -> int | None:
    """This process's cgroup memory limit (a container's or a systemd MemoryMax=); None if unlimited."""
    candidates = []
    try:
        for line in Path("/proc/self/cgroup").read_text(encoding="utf-8").splitlines():
            if line.startswith("0::"):  # cgroup v2: the limit file sits in our own cgroup's folder
                candidates.append(Path("/sys/fs/cgroup") / line[3:].lstrip("/") / "memory.max")
            elif ":memory:" in line:  # cgroup v1
                rel = line.split(":memory:", 1)[1].lstrip("/")
                candidates.append(Path("/sys/fs/cgroup/memory") / rel / "memory.limit_in_bytes")
    except OSError:
        pass
    candidates += [Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")]
    for path in candidates:
        try:
            text = path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            continue
        if not text.isdigit():
            return None  # "max"
        limit = int(text)
        # v1 reports "unlimited" as a huge page-rounded number instead of "max".
        return limit if limit < psutil.virtual_memory().total else None
    return None


# ---------------------------------------------------------------------------------------------- GPUs


def _int_or_none(text: str) -> int | None:
    try:
        return int(float(text))
    except ValueError:
        return None  # "[N/A]", "[Not Supported]"


def parse_nvidia_smi(csv_text: str) -> list[dict]:
    """Rows of `nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader,nounits`.

    memory.total is in MiB without units. A GPU name never contains a comma in practice, but the last
    two fields are split from the right so one would not shift the columns.
    """
    gpus = []
    for line in csv_text.splitlines():
        line = line.strip()
        if not line:
            continue
        parts = line.rsplit(",", 2)
        if len(parts) != 3:
            continue
        name, memory, driver = (p.strip() for p in parts)
        mib = _int_or_none(memory)
        gpus.append(
            {
                "vendor": "nvidia",
                "index": len(gpus),
                "name": name,
                "memory_total_bytes": mib * _MIB if mib is not None else None,
                "driver_version": driver if driver and not driver.startswith("[") else None,
            }
        )
    return gpus


def parse_rocm_smi(product_json: str, meminfo_json: str | None = None) -> list[dict]:
    """`rocm-smi --showproductname --json` (+ optional `--showmeminfo vram --json`) -> GPU list."""
    try:
        products = json.loads(product_json)
    except ValueError:
        return []
    try:
        meminfo = json.loads(meminfo_json) if meminfo_json else {}
    except ValueError:
        meminfo = {}
    if not isinstance(products, dict):
        return []
    gpus = []
    for card in sorted(k for k in products if k.startswith("card")):
        info = products[card] if isinstance(products[card], dict) else {}
        mem = meminfo.get(card) if isinstance(meminfo, dict) else None
        total = None
        if isinstance(mem, dict):
            total = _int_or_none(str(mem.get("VRAM Total Memory (B)", "")))
        gpus.append(
            {
                "vendor": "amd",
                "index": len(gpus),
                "name": info.get("Card Series")
                or info.get("Card series")
                or info.get("Card Model")
                or info.get("Card model")
                or card,
                "gfx_version": info.get("GFX Version"),
                "memory_total_bytes": total,
                "driver_version": None,
            }
        )
    return gpus


def _apple_gpus() -> list[dict]:
    """Apple Silicon: the GPU is on the SoC and shares (unified) system memory."""
    if platform.system() != "Darwin" or platform.machine() != "arm64":
        return []
    name, cores = None, None
    out = _run(["system_profiler", "SPDisplaysDataType", "-json"], timeout=10.0)
    if out:
        try:
            displays = json.loads(out).get("SPDisplaysDataType") or []
            first = displays[0] if displays else {}
            name = first.get("sppci_model") or first.get("_name")
            cores = _int_or_none(str(first.get("sppci_cores", "")))
        except (ValueError, AttributeError, IndexError):
            pass
    if not name:
        brand = _run(["sysctl", "-n", "machdep.cpu.brand_string"])
        name = brand.strip() if brand else "Apple Silicon GPU"
    return [
        {
            "vendor": "apple",
            "index": 0,
            "name": name,
            "cores": cores,
            "memory_total_bytes": psutil.virtual_memory().total,
            "unified_memory": True,
            "driver_version": None,
        }
    ]


def detect_gpus() -> list[dict]:
    """All GPUs the vendors' tools report, uncached; [] is a valid answer (no GPU or no tools)."""
    gpus: list[dict] = []
    out = _run(["nvidia-smi", *_NVIDIA_QUERY])
    if out:
        gpus += parse_nvidia_smi(out)
    out = _run(["rocm-smi", "--showproductname", "--json"])
    if out:
        gpus += parse_rocm_smi(out, _run(["rocm-smi", "--showmeminfo", "vram", "--json"]))
    gpus += _apple_gpus()
    return gpus


def _cached_gpus() -> list[dict]:
    global _gpu_cache
    with _lock:
        cached = _gpu_cache
    now = time.monotonic()
    if cached is not None and now - cached[0] < GPU_CACHE_TTL_SECS:
        return [dict(g) for g in cached[1]]
    gpus = detect_gpus()  # outside the lock: it may take seconds
    with _lock:
        _gpu_cache = (now, gpus)
    return [dict(g) for g in gpus]


# ---------------------------------------------------------------------------------------- llama.cpp


def parse_system_info_backends(system_info: str) -> list[str]:
    """Backend names from llama_print_system_info(): "CPU : SSE3 = 1 | ... | CUDA : ARCHS = 890 | "."""
    return re.findall(r"(?:^|\|\s*)([A-Za-z][\w-]*)\s:\s", system_info)


def _ggml_registry(libggml: Any) -> tuple[list[str], list[dict]]:
    """Backends and devices from ggml's registry: what this build can really run on.

    Only names and descriptions are read: asking a CUDA device for its free memory would create a
    CUDA context (hundreds of MiB of VRAM) just to answer a status request.
    """
    c_char_p, c_size_t, c_void_p = ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p
    signatures = {
        "ggml_backend_reg_count": ([], c_size_t),
        "ggml_backend_reg_get": ([c_size_t], c_void_p),
        "ggml_backend_reg_name": ([c_void_p], c_char_p),
        "ggml_backend_dev_count": ([], c_size_t),
        "ggml_backend_dev_get": ([c_size_t], c_void_p),
        "ggml_backend_dev_name": ([c_void_p], c_char_p),
        "ggml_backend_dev_description": ([c_void_p], c_char_p),
        "ggml_backend_dev_backend_reg": ([c_void_p], c_void_p),
    }
    fn = {}
    for name, (argtypes, restype) in signatures.items():
        f = getattr(libggml, name)  # AttributeError if this build lacks the registry
        f.argtypes, f.restype = argtypes, restype
        fn[name] = f

    def text(raw: bytes | None) -> str | None:
        return raw.decode("utf-8", "replace") if raw else None

    backends = [
        text(fn["ggml_backend_reg_name"](fn["ggml_backend_reg_get"](i)))
        for i in range(fn["ggml_backend_reg_count"]())
    ]
    devices = []
    for i in range(fn["ggml_backend_dev_count"]()):
        dev = fn["ggml_backend_dev_get"](i)
        reg = fn["ggml_backend_dev_backend_reg"](dev)
        devices.append(
            {
                "name": text(fn["ggml_backend_dev_name"](dev)),
                "description": text(fn["ggml_backend_dev_description"](dev)),
                "backend": text(fn["ggml_backend_reg_name"](reg)) if reg else None,
            }
        )
    return [b for b in backends if b], devices


def _probe_llama_cpp() -> dict:
    try:
        import llama_cpp
    except Exception as exc:  # noqa: BLE001 - a broken native build raises OSError/RuntimeError too
        return {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
    info: dict[str, Any] = {"available": True, "version": getattr(llama_cpp, "__version__", None)}
    try:
        raw = llama_cpp.llama_print_system_info()
        info["system_info"] = (raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)).strip()
    except Exception:  # noqa: BLE001 - an optional detail; the rest is still worth reporting
        info["system_info"] = None
    try:
        info["gpu_offload"] = bool(llama_cpp.llama_supports_gpu_offload())
    except Exception:  # noqa: BLE001
        info["gpu_offload"] = None
    try:
        info["max_devices"] = int(llama_cpp.llama_max_devices())
    except Exception:  # noqa: BLE001
        info["max_devices"] = None
    backends: list[str] = []
    devices: list[dict] = []
    try:
        from llama_cpp import _ggml

        backends, devices = _ggml_registry(_ggml.libggml)
    except Exception:  # noqa: BLE001 - older builds: fall back to the names in the system info
        backends = parse_system_info_backends(info["system_info"] or "")
    info["backends"] = backends
    info["devices"] = devices
    return info


def llama_cpp_info() -> dict:
    """The llama.cpp probe, done once per process (the import loads native libraries)."""
    global _llama_cache
    with _lock:
        if _llama_cache is None:
            _llama_cache = _probe_llama_cpp()
        return json.loads(json.dumps(_llama_cache))  # a copy the caller may change freely


# ----------------------------------------------------------------------------------------- together


def _disk(data_dir: Path) -> dict:
    # The data dir may not exist yet (first start): measure the filesystem it will be created on.
    probe = Path(data_dir).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError:
        return {"path": str(data_dir), "total_bytes": None, "free_bytes": None}
    return {"path": str(data_dir), "total_bytes": usage.total, "free_bytes": usage.free}


def collect_capabilities(data_dir: Path) -> dict:
    """The full report. The first call may take a second or two (llama.cpp import, GPU tools): call it
    from a worker thread in async code. Later calls are cheap (cached probes, live RAM and disk)."""
    vm = psutil.virtual_memory()
    return {
        "cpu": {
            "model": cpu_model(),
            "arch": platform.machine() or None,
            "physical_cores": psutil.cpu_count(logical=False),
            "logical_cores": psutil.cpu_count(logical=True),
            "usable_cores": _usable_cores(),
        },
        "memory": {
            "total_bytes": vm.total,
            "available_bytes": vm.available,
            "cgroup_limit_bytes": _cgroup_memory_limit(),
        },
        "disk": _disk(data_dir),
        "gpus": _cached_gpus(),
        "os": {
            "system": platform.system(),
            "release": platform.release(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "python_implementation": platform.python_implementation(),
        },
        "llama_cpp": llama_cpp_info(),
    }
