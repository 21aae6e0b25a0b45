"""Cold start: from `pinkybrain serve` to the first signed ping answered, to the first signed status
(every service started: stores, mesh, brain), and the node's resident memory one second after that,
beside `python -c pass` measured in the same run.

Each round starts a fresh node (127.0.0.1 only, mDNS off, stealthy, no model) in a throw-away
PINKYBRAIN_HOME, polls `GET /api/ping` (signed) every 10 ms, then `GET /api/status` (which waits for the
services) and reads the process's RSS with psutil one second after the status answers; also the node's
CPU seconds (user + system) when its first ping answers, which a busy machine inflates far less than
wall time. The baseline is the interpreter alone:
`python -c pass` (time to exit, its CPU seconds) and `python -c "import time; time.sleep(2)"` (RSS after
one second). Medians of --rounds.

    python bench/cold_start.py [--rounds 5] [--json]

Exit status: 0 on success, 2 when a node did not answer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from api_load import _auth, _bench_env, _stop, _write_config, free_port  # noqa: E402

MIB = 1024 * 1024


def interpreter_baseline() -> tuple[float, float, float]:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2)"])
    time.sleep(1.0)
    rss = psutil.Process(proc.pid).memory_info().rss
    proc.wait()
    return elapsed, cpu, rss


def node_round(directory: Path) -> tuple[float, float, float, float]:
    home = Path(tempfile.mkdtemp(dir=directory))
    port = free_port()
    secret = __import__("secrets").token_urlsafe(32)
    config = _write_config(home, secret, port)
    url = f"http://127.0.0.1:{port}/api/ping"
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pinkybrain.node", "serve", "--config", str(config)],
        env=_bench_env(home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        with httpx.Client(auth=_auth(secret), timeout=1.0) as client:
            deadline = start + 60
            while True:
                if proc.poll() is not None or time.perf_counter() > deadline:
                    raise RuntimeError(f"node did not answer (exit {proc.poll()})")
                try:
                    if client.get(url).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.01)
            first_ping = time.perf_counter() - start
            # CPU seconds, steadier than wall time on a busy machine; with the children it has reaped (the
            # forked secret check: node/services/secret_check.py)
            times = psutil.Process(proc.pid).cpu_times()
            ping_cpu = times.user + times.system + times.children_user + times.children_system
            while True:
                if proc.poll() is not None or time.perf_counter() > deadline:
                    raise RuntimeError(f"node did not answer status (exit {proc.poll()})")
                try:
                    if client.get(url.replace("/ping", "/status"), timeout=30).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.01)
            up = time.perf_counter() - start
        time.sleep(1.0)
        rss = psutil.Process(proc.pid).memory_info().rss
        return first_ping, ping_cpu, up, rss
    finally:
        _stop(proc, "node")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    base, node = [], []
    with tempfile.TemporaryDirectory(prefix="pb-cold-") as tmp:
        for _ in range(args.rounds):
            base.append(interpreter_baseline())
            try:
                node.append(node_round(Path(tmp)))
            except RuntimeError as exc:
                print(f"cold_start: {exc}", file=sys.stderr)
                return 2
    result = {
        "rounds": args.rounds,
        "python_pass_secs": statistics.median(b[0] for b in base),
        "python_cpu_secs": statistics.median(b[1] for b in base),
        "python_rss_mib": statistics.median(b[2] for b in base) / MIB,
        "first_ping_secs": statistics.median(n[0] for n in node),
        "first_ping_cpu_secs": statistics.median(n[1] for n in node),
        "first_status_secs": statistics.median(n[2] for n in node),
        "node_rss_mib": statistics.median(n[3] for n in node) / MIB,
    }
    result["time_ratio"] = result["first_ping_secs"] / result["python_pass_secs"]
    result["cpu_ratio"] = result["first_ping_cpu_secs"] / result["python_cpu_secs"]
    result["status_ratio"] = result["first_status_secs"] / result["python_pass_secs"]
    result["rss_ratio"] = result["node_rss_mib"] / result["python_rss_mib"]
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{'what':<34} {'python -c pass':>14} {'node':>10} {'ratio':>7}")
    print(f"{'start to first signed ping (s)':<34} {result['python_pass_secs']:>14.3f} "
          f"{result['first_ping_secs']:>10.3f} {result['time_ratio']:>7.1f}")
    print(f"{'CPU seconds to the first ping':<34} {result['python_cpu_secs']:>14.3f} "
          f"{result['first_ping_cpu_secs']:>10.3f} {result['cpu_ratio']:>7.1f}")
    print(f"{'start to first signed status (s)':<34} {result['python_pass_secs']:>14.3f} "
          f"{result['first_status_secs']:>10.3f} {result['status_ratio']:>7.1f}")
    print(f"{'RSS 1 s after the status (MiB)':<34} {result['python_rss_mib']:>14.1f} "
          f"{result['node_rss_mib']:>10.1f} {result['rss_ratio']:>7.1f}")
    print(f"(medians of {args.rounds} rounds; targets: first ping <= 0.5 s, RSS <= 70 MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
