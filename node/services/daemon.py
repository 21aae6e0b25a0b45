"""`serve --daemon` and `serve --stop`: a detached node with a pid file and a log file in its home."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pinkybrain.node.core.auth import NONCE_HEADER, SIG_HEADER, TS_HEADER, sign
from pinkybrain.node.core.config import Config
from pinkybrain.node.services.process import running_pid

if TYPE_CHECKING:
    import httpx


class DaemonError(RuntimeError):
    pass


def _signed_get(url: str, path: str, secret: str, timeout: float) -> httpx.Response:
    import httpx  # here, not at the top: `serve` in the foreground imports this module and never pings

    ts, nonce = f"{time.time():.3f}", secrets.token_hex(16)
    headers = {
        SIG_HEADER: sign(secret, "GET", path, "", ts, nonce, b""),
        TS_HEADER: ts,
        NONCE_HEADER: nonce,
    }
    return httpx.get(f"{url}{path}", headers=headers, timeout=timeout)


def local_url(host: str, port: int) -> str:
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def start_daemon(
    cfg: Config,
    config_source: str | None,
    host: str,
    port: int,
    *,
    wait_secs: float = 60,
    peers: tuple[str, ...] = (),
) -> dict:
    home = cfg.home
    pid_file = home / "pinkybrain.pid"
    log_file = cfg.path("logging.file") if cfg["logging.file"] else home / "pinkybrain.log"
    pid = running_pid(pid_file)
    if pid is not None:
        raise DaemonError(
            f"a node is already running with home {home} (pid {pid}); `pinkybrain serve --stop` stops it"
        )
    home.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pinkybrain.node", "serve", "--host", host, "--port", str(port)]
    if config_source:
        cmd += ["--config", str(Path(config_source).resolve())]
    for peer in peers:
        cmd += ["--peer", peer]
    # The node logs to the file itself (rotated by size, 0600); its stdout and stderr go there too.
    env = dict(os.environ, PINKYBRAIN_START_MODE="daemon", PINKYBRAIN_HOME=str(home),
               PINKYBRAIN_LOG_FILE=str(log_file.resolve()))
    if cfg.file is not None:
        env["PINKYBRAIN_CONFIG"] = str(cfg.file.resolve())  # the daemon's cwd differs from ours
    log_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "ab") as log, open(os.devnull, "rb") as devnull:
        proc = subprocess.Popen(
            cmd,
            stdin=devnull,
            stdout=log,
            stderr=log,
            cwd=str(home),
            env=env,
            start_new_session=True,
            close_fds=True,
        )
    import httpx

    url = local_url(host, port)
    deadline = time.monotonic() + wait_secs
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            tail = _tail(log_file)
            raise DaemonError(f"the node exited with status {code} during start-up: {tail}")
        try:
            # Status, not ping: a ping answers while the stores still open (api/front.py); status answers
            # once everything has started, so a store that stops the node is reported here.
            if _signed_get(url, "/api/status", cfg["p2p.secret"], 5.0).status_code == 200:
                return {"pid": proc.pid, "url": url, "log_file": str(log_file), "pid_file": str(pid_file)}
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise DaemonError(f"the node did not answer on {url} within {wait_secs:.0f}s; see {log_file}")


def stop_daemon(home: Path, *, wait_secs: float = 30) -> dict:
    pid_file = home / "pinkybrain.pid"
    pid = running_pid(pid_file)
    if pid is None:
        raise DaemonError(f"no node is running with home {home}")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait_secs
    while time.monotonic() < deadline:
        if running_pid(pid_file) is None:
            return {"pid": pid, "stopped": True}
        time.sleep(0.1)
    raise DaemonError(f"node pid {pid} did not stop within {wait_secs:.0f}s after SIGTERM")


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"
