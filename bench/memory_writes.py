"""Durable memory writes through the signed API, against plain SQLite in the same run.

One run, on 127.0.0.1 only:
  * a node (server pinned to CPU 0) takes `POST /api/memory/set` from --writers concurrent signed
    connections (pinned to the other CPU), --writes in all; each write is acknowledged only once durable;
  * the baseline: one thread inserting the same number of rows into a SQLite WAL database with
    synchronous=FULL, one commit (one fsync) each, on the same filesystem;
then prints writes/s for both, the ratio, how many commits (fsyncs of the log) the node made, and
checks every acknowledged key is there (0 lost).

    python bench/memory_writes.py [--writes 2000] [--writers 16] [--warmup 300] [--json]

Exit status: 0 on success, 1 when a write failed or an acknowledged key is missing, 2 when the node
did not start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from api_load import (  # noqa: E402
    NotReady,
    _auth,
    _bench_env,
    _pinned,
    _raw_exchange,
    _raw_requests,
    _stop,
    _wait_ready,
    _write_config,
    free_port,
)


def sqlite_baseline(directory: Path, writes: int) -> float:
    conn = sqlite3.connect(directory / "baseline.sqlite3", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE updates (id INTEGER PRIMARY KEY, data BLOB, sha256 BLOB, origin TEXT)")
    payload = os.urandom(120)
    start = time.perf_counter()
    for _ in range(writes):
        conn.execute("INSERT INTO updates (data, sha256, origin) VALUES (?, ?, 'local')", (payload, payload[:32]))
    elapsed = time.perf_counter() - start
    conn.close()
    return writes / elapsed


async def drive(url: str, secret: str, writes: int, writers: int, prefix: str = "bench/"
                ) -> tuple[float, list[str], int]:
    """`writers` keep-alive connections send the writes, signed ahead of time (api_load's raw client: an
    HTTP library in Python would set the pace here, not the node)."""
    keys = [f"{prefix}{i:06}" for i in range(writes)]
    bodies = [json.dumps({"key": key, "value": {"i": i, "pad": "p" * 64}}).encode() for i, key in enumerate(keys)]
    requests = _raw_requests(f"{url}/api/memory/set", secret, "mesh", writes, bodies)
    parts = urlsplit(url)
    conns = [await asyncio.open_connection(parts.hostname, parts.port) for _ in range(writers)]
    acked: list[str] = []
    failed = 0
    queue = iter(zip(keys, requests, strict=True))

    async def writer(reader: asyncio.StreamReader, stream: asyncio.StreamWriter) -> None:
        nonlocal failed
        for key, request in queue:  # one shared iterator: each connection takes the next write in turn
            try:
                ok = await _raw_exchange(reader, stream, request, True)  # a 200 carrying the node's proof
            except (OSError, asyncio.IncompleteReadError, ValueError):
                ok = False
            if ok:
                acked.append(key)
            else:
                failed += 1

    try:
        start = time.perf_counter()
        await asyncio.gather(*(writer(r, w) for r, w in conns))
        elapsed = time.perf_counter() - start
    finally:
        for _, stream in conns:
            stream.close()
    return len(acked) / elapsed, acked, failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=2000)
    parser.add_argument("--writers", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=300, help="writes before the measured ones")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pb-writes-") as tmp:
        tmp = Path(tmp)
        baseline = sqlite_baseline(tmp, args.writes)
        home = tmp / "node"
        home.mkdir()
        secret, port = secrets.token_urlsafe(32), free_port()
        config = _write_config(home, secret, port)
        log = home / "node.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "pinkybrain.node", "serve", "--config", str(config)],
                                    env=_bench_env(home), stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=_pinned(0))
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_ready(proc, url + "/api/ping", secret, "node", log)
            if len(os.sched_getaffinity(0)) > 1:
                os.sched_setaffinity(0, {1})
            with httpx.Client(base_url=url, auth=_auth(secret), timeout=30) as c:
                commits0 = c.get("/api/status").json()["memory"]["commits"]
            # Warm-up, not measured: the node builds its full API on the first request that is not a ping or
            # a status (node/api/front.py), and the first writes pay for that.
            asyncio.run(drive(url, secret, args.warmup, args.writers, prefix="warmup/"))
            node_cpu = psutil.Process(proc.pid)
            cpu0 = sum(node_cpu.cpu_times()[:2])
            rate, acked, failed = asyncio.run(drive(url, secret, args.writes, args.writers))
            cpu_per_write = (sum(node_cpu.cpu_times()[:2]) - cpu0) / max(1, args.writes)
            with httpx.Client(base_url=url, auth=_auth(secret), timeout=60) as c:
                commits = c.get("/api/status").json()["memory"]["commits"] - commits0
                stored = set(c.get("/api/memory", params={"prefix": "bench/"}).json()["keys"])
        except NotReady as exc:
            print(f"memory_writes: {exc}", file=sys.stderr)
            return 2
        finally:
            _stop(proc, "node")
    lost = [k for k in acked if k not in stored]
    result = {"writes": args.writes, "writers": args.writers, "api_writes_per_sec": rate,
              "sqlite_writes_per_sec": baseline, "ratio": rate / baseline, "commits": commits,
              "writes_per_commit": len(acked) / commits if commits else None,
              "node_cpu_us_per_write": cpu_per_write * 1e6, "failed": failed, "lost": len(lost)}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{'path':<44} {'writes/s':>9} {'ratio':>6}")
        print(f"{'SQLite WAL insert, one fsync each, 1 thread':<44} {baseline:>9.0f} {1:>6.2f}")
        print(f"{f'signed API, {args.writers} writers, durable ack':<44} {rate:>9.0f} {rate / baseline:>6.2f}")
        print(f"node commits (fsyncs of the log): {commits} for {len(acked)} acknowledged writes "
              f"({result['writes_per_commit'] or 0:.1f} per commit); node CPU {cpu_per_write * 1e6:.0f} us "
              f"per write; failed {failed}, lost {len(lost)}")
    return 0 if not failed and not lost else 1


if __name__ == "__main__":
    sys.exit(main())
