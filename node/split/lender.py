"""Lending: llama.cpp's rpc-server for a borrowing peer, on this machine's loopback only.

rpc-server has no authentication and no encryption; it must never face a network. So it binds
127.0.0.1 on a port of our choosing, is started when a peer's tunnel asks for it and stopped when no
tunnel has used it for `idle_secs`, and the only way from another machine to it is a `split.rpc`
tunnel on an authenticated peer link: the tunnel's far end is always this process's own rpc-server,
never an address from the request. One rpc-server per (borrower, model): rpc-server serves one client
at a time, and its weight cache (`-c`) lives in a folder of its own under the model's SHA-256
(`cache_dir`: borrowers never share one), so the second load of the same model does not resend the
large tensors. A lender that has the model itself (shared, so
its SHA-256 is checked) fills that cache from its own file first (rpc_cache.py): not even the first load
sends them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from pinkybrain.node.services.process import die_with_parent
from pinkybrain.node.split.rpc_cache import load_fnv, prefill
from pinkybrain.node.split.tools import Tools

log = logging.getLogger("pinkybrain.split")

START_TIMEOUT = 20.0
# How long a tunnel's opening waits for the cache to be filled (under the mesh's 60 s open timeout); a
# fill that takes longer goes on, and the tensors it has not written yet are sent this time.
PREFILL_WAIT = 40.0


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class _Server:
    borrower: str
    sha256: str
    port: int
    proc: asyncio.subprocess.Process
    started: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    writers: list = field(default_factory=list)

    @property
    def active(self) -> int:
        self.writers = [w for w in self.writers if not w.is_closing()]
        return len(self.writers)


class RpcServers:
    def __init__(self, tools: Tools, cache_root: Path, *, idle_secs: float = 120.0, threads: int = 0,
                 max_servers: int = 4, log_level: int = logging.INFO):
        self.tools, self.cache_root = tools, cache_root
        self.level = log_level  # the public mesh's lends log at debug unless logging.public_mesh is on
        self.idle_secs, self.threads, self.max_servers = idle_secs, threads, max_servers
        self._servers: dict[tuple[str, str], _Server] = {}
        self._lock = asyncio.Lock()
        self._reaper: asyncio.Task | None = None
        self._fnv = load_fnv(tools.folder)
        self._prefills: dict[tuple, asyncio.Task] = {}
        self.prefilled_bytes = 0

    def cache_dir(self, borrower: str, sha256: str) -> Path:
        """The weight cache one borrower's rpc-server uses for one model. One per borrower: rpc-server
        writes every large tensor it is sent under its FNV-1a hash, which is no defence against a crafted
        collision, so a shared folder would let one mesh member plant weights that another member's
        load of the same model then takes from the cache."""
        # sha256 is checked hex, the borrower an authenticated node id: never a path from a peer.
        return self.cache_root / sha256 / hashlib.sha256(borrower.encode()).hexdigest()[:32]

    async def prefill(self, borrower: str, sha256: str, own_copy: Path, layers: range | None) -> None:
        """Fill `borrower`'s weight cache for `sha256` from this node's own copy of the model (once per
        borrower, model and layers); waits at most PREFILL_WAIT."""
        if self._fnv is None:
            return
        key = (borrower, sha256, *((layers.start, layers.stop) if layers is not None else ()))
        task = self._prefills.get(key)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            cache = self.cache_dir(borrower, sha256)
            task = self._prefills[key] = asyncio.create_task(
                asyncio.to_thread(prefill, own_copy, cache, self._fnv, layers), name=f"rpc-prefill-{sha256[:12]}")
            task.add_done_callback(self._prefilled)
        with contextlib.suppress(Exception):  # timed out, or failed (logged): the link carries them
            await asyncio.wait_for(asyncio.shield(task), PREFILL_WAIT)

    def _prefilled(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        if task.exception() is not None:
            log.warning("filling the RPC weight cache failed: %s", task.exception())
            return
        done = task.result()
        self.prefilled_bytes += done["bytes"]
        if done["written"]:
            log.info("RPC weight cache: %d tensor(s), %.0f MiB written from this node's own copy",
                     done["written"], done["bytes"] / 2**20)

    async def connect(self, borrower: str, sha256: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to the rpc-server for this borrower and model (started if need be)."""
        async with self._lock:
            key = (borrower, sha256)
            server = self._servers.get(key)
            if server is not None and server.proc.returncode is not None:
                self._servers.pop(key)
                server = None
            if server is None:
                if len(self._servers) >= self.max_servers:
                    raise OSError("this node runs as many rpc-servers as it allows")
                server = self._servers[key] = await self._start(borrower, sha256)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        server.writers.append(writer)
        server.last_used = time.monotonic()
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap_forever(), name="split-rpc-reaper")
        return reader, writer

    async def _start(self, borrower: str, sha256: str) -> _Server:
        cache = self.cache_dir(borrower, sha256)
        cache.mkdir(parents=True, exist_ok=True, mode=0o700)
        threads = self.threads or max(1, (os.cpu_count() or 2) // 2)
        last_error = "no attempt"
        for _ in range(3):  # the port may be taken between choosing and binding it
            port = _free_loopback_port()
            proc = await asyncio.create_subprocess_exec(
                str(self.tools.rpc_server), "--host", "127.0.0.1", "--port", str(port), "--cache",
                "--threads", str(threads),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL, env={**os.environ, "LLAMA_CACHE": str(cache)},
                preexec_fn=die_with_parent(),
            )
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline and proc.returncode is None:
                try:
                    probe = socket.create_connection(("127.0.0.1", port), timeout=0.5)
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
                probe.close()  # rpc-server takes the next client once this one hangs up
                log.log(self.level, "rpc-server started for %s (model %s) on 127.0.0.1:%d, pid %d",
                         borrower[:7], sha256[:12], port, proc.pid)
                return _Server(borrower, sha256, port, proc)
            last_error = f"exit code {proc.returncode}" if proc.returncode is not None else "no answer"
            await _stop(proc)
        raise OSError(f"rpc-server did not start ({last_error})")

    async def _reap_forever(self) -> None:
        while self._servers:
            await asyncio.sleep(min(5.0, max(0.2, self.idle_secs / 4)))
            await self.stop_idle()

    async def stop_idle(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        stopped = []
        async with self._lock:
            for key, server in list(self._servers.items()):
                if server.active:
                    server.last_used = now
                    continue
                if server.proc.returncode is not None or now - server.last_used >= self.idle_secs:
                    del self._servers[key]
                    await _stop(server.proc)
                    stopped.append(key[1])
                    log.log(self.level, "rpc-server for %s stopped (idle)", key[0][:7])
        return stopped

    def state(self) -> list[dict]:
        now = time.monotonic()
        return [{"borrower": s.borrower, "model_sha256": s.sha256, "pid": s.proc.pid, "port": s.port,
                 "connections": s.active, "idle_secs": round(now - s.last_used, 1)}
                for s in self._servers.values()]

    def pids(self) -> list[int]:
        return [s.proc.pid for s in self._servers.values()]

    def cache_bytes(self) -> int:
        total = 0
        for path in self.cache_root.rglob("*") if self.cache_root.exists() else ():
            with contextlib.suppress(OSError):
                total += path.stat().st_size if path.is_file() else 0
        return total

    def forget_cache(self, sha256: str) -> None:
        shutil.rmtree(self.cache_root / sha256, ignore_errors=True)
        for key in [k for k in self._prefills if k[1] == sha256]:
            self._prefills.pop(key)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        async with self._lock:
            for server in self._servers.values():
                for writer in server.writers:
                    writer.close()
                await _stop(server.proc)
            self._servers.clear()


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), 5)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
