"""Signed API throughput and latency: `GET /api/status` on a real node vs a bare uvicorn+Starlette app,
and what each authentication check costs per request.

One run starts, on 127.0.0.1 only:
  * a node (`python -m pinkybrain.node serve`) in a throw-away PINKYBRAIN_HOME with a random secret,
  * a baseline server: the same uvicorn settings serving a trivial, unsigned Starlette endpoint,
then drives both from a separate load-generator process (httpx, HMAC-signed for the node: with the
network secret as a mesh member, and with the owner key as the owner) at each concurrency level, and
prints req/s, p50 and p99 with the node's ratio to the baseline. Rows: `node` is `GET /api/status` signed
as a mesh member, `ping` is `GET /api/ping` signed the same way, `owner` is status signed with the owner key,
and with --compare-dashboard `no-dash` is `node` on a second node whose dashboard is turned off. The ratio is what our auth middleware +
FastAPI + the status handler cost over bare ASGI on this machine.

A second table (in-process, no sockets) times the auth middleware alone for each credential and each
kind of refusal, against the same trivial ASGI app called without it: the cost of the checks per request.

    python bench/api_load.py [--requests 2000] [--concurrency 1,8,32] [--rounds 3] [--max-seconds 60] [--json]

Exit status: 0 when every request succeeded, 1 when any failed (e.g. a signature refused), 2 when a
server did not start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

SECRET_ENV = "PB_BENCH_SECRET"  # the secret reaches the load generator by environment, never argv (ps)
CREDENTIAL_ENV = "PB_BENCH_CREDENTIAL"  # mesh (the secret) or owner (PB_BENCH_SECRET holds the owner key)
STATUS_PATH = "/api/status"
PING_PATH = "/api/ping"
START_TIMEOUT_SECS = 60.0


# ------------------------------------------------------------------------------------------ helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of an ascending list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _auth(secret: str | None, credential: str = "mesh") -> httpx.Auth | None:
    if not secret:
        return None
    from pinkybrain.skill.signing import HmacAuth

    return HmacAuth(secret, credential=credential)


# --------------------------------------------------------------------------------- baseline server


def run_baseline_server(port: int) -> None:
    """Bare ASGI: Starlette + uvicorn with the node's uvicorn settings, a constant JSON answer."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def status(_request):
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route(STATUS_PATH, status), Route(PING_PATH, status)])
    uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off"
        )
    ).run()


# ---------------------------------------------------------------------------------- load generator


async def _drive(
    url: str,
    secret: str | None,
    concurrency: int,
    requests: int,
    warmup: int,
    max_seconds: float,
    server_pid: int | None,
    credential: str = "mesh",
) -> dict:
    import psutil

    # One client (one keep-alive connection) per concurrent worker: a single httpx pool shared by 32
    # tasks spends most of its time in pool bookkeeping, and the numbers would describe httpx, not us.
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    clients = [httpx.AsyncClient(auth=_auth(secret, credential), limits=limits, timeout=30.0)
               for _ in range(concurrency)]
    server = psutil.Process(server_pid) if server_pid else None

    async def phase(count: int, deadline: float, latencies: list[float] | None) -> tuple[int, int]:
        remaining = count
        ok = errors = 0

        async def worker(client: httpx.AsyncClient) -> None:
            nonlocal remaining, ok, errors
            while remaining > 0 and time.monotonic() < deadline:
                remaining -= 1
                start = time.perf_counter()
                try:
                    response = await client.get(url)
                    good = response.status_code == 200
                except httpx.HTTPError:
                    good = False
                elapsed = time.perf_counter() - start
                if good:
                    ok += 1
                    if latencies is not None:
                        latencies.append(elapsed)
                else:
                    errors += 1

        await asyncio.gather(*(worker(c) for c in clients))
        return ok, errors

    try:
        return await _measured(phase, warmup, requests, max_seconds, server, concurrency, requests)
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))


def _cpu_seconds(proc) -> float:
    """The process's CPU time so far. psutil reads it in clock ticks (10 ms on Linux): against a round's
    0.2-0.4 s of server CPU that is a 3 % step in `srv us/req`, 5-7 % in a ratio of two rounds. Where the
    C library has clock_getcpuclockid (Linux), the process's CPU clock gives nanoseconds instead."""
    clock = _cpu_clock(proc.pid)
    if clock is not None:
        try:
            return time.clock_gettime(clock)
        except OSError:  # the process is gone
            pass
    times = proc.cpu_times()
    return times.user + times.system


_CPU_CLOCKS: dict[int, int | None] = {}


def _cpu_clock(pid: int) -> int | None:
    if pid not in _CPU_CLOCKS:
        clock = None
        try:
            import ctypes
            import ctypes.util

            clock_id = ctypes.c_int()
            libc = ctypes.CDLL(ctypes.util.find_library("c"))
            if libc.clock_getcpuclockid(pid, ctypes.byref(clock_id)) == 0:
                time.clock_gettime(clock_id.value)  # raises where the platform has no such clock
                clock = clock_id.value
        except (OSError, AttributeError, TypeError):
            clock = None
        _CPU_CLOCKS[pid] = clock
    return _CPU_CLOCKS[pid]


async def _measured(phase, warmup, measured, max_seconds: float, server, concurrency: int, requests: int) -> dict:
    """`phase(warmup)` unmeasured (it opens connections and warms caches), then `phase(measured)` with the
    server's and this process's CPU time counted; `phase(what, deadline, latencies)` -> (ok, errors)."""
    import psutil

    await phase(warmup, time.monotonic() + max_seconds, None)
    latencies: list[float] = []
    me = psutil.Process()
    server_cpu0 = _cpu_seconds(server) if server else 0.0
    client_cpu0 = _cpu_seconds(me)
    started = time.perf_counter()
    ok, errors = await phase(measured, time.monotonic() + max_seconds, latencies)
    wall = time.perf_counter() - started
    client_cpu = _cpu_seconds(me) - client_cpu0
    server_cpu = _cpu_seconds(server) - server_cpu0 if server else math.nan
    return _load_result(concurrency, requests, ok, errors, wall, latencies, server_cpu, client_cpu)


def _load_result(concurrency: int, requests: int, ok: int, errors: int, wall: float, latencies: list[float],
                 server_cpu: float, client_cpu: float) -> dict:
    latencies.sort()
    done = ok + errors
    return {
        "concurrency": concurrency,
        "requests": done,
        "ok": ok,
        "errors": errors,
        "seconds": wall,
        "rps": ok / wall if wall > 0 else 0.0,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        # Server CPU per request does not depend on how fast the client is: the cleanest cost figure.
        "server_cpu_us_per_req": server_cpu / done * 1e6 if done else math.nan,
        # Near 100 %: the load generator, not the server, set the pace.
        "client_cpu_pct": client_cpu / wall * 100 if wall > 0 else math.nan,
        "truncated": done < requests,
    }


# A raw HTTP/1.1 load generator: requests are built (and, for the node, signed) before the timed phase, so
# the client spends a few microseconds per request and keeps the server saturated, as wrk does. httpx
# spends several times the server's cost per request on its side; a server that waits for its client
# wakes once per request and its CPU per request then counts wake-ups, not work.
_BASE_HEADERS = (b"Accept: */*\r\nAccept-Encoding: gzip, deflate\r\nConnection: keep-alive\r\n"
                 b"User-Agent: pinkybrain-bench\r\n")


def _raw_requests(url: str, secret: str | None, credential: str, count: int,
                  bodies: list[bytes] | None = None) -> list[bytes]:
    """`count` GETs of `url`, or with `bodies` one POST of JSON per body, each signed ahead of time."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    method = "GET" if bodies is None else "POST"
    head = f"{method} {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n".encode() + _BASE_HEADERS
    if not secret:
        return [head + b"\r\n"] * count
    from pinkybrain.skill.signing import signature_headers

    try:  # as the skill sends it: the node answers with the cheaper MAC proof
        from pinkybrain.skill.signing import CLIENT_KEY_HEADER, ProofKey

        client_key = {CLIENT_KEY_HEADER: ProofKey().public}
    except ImportError:  # a tree from before the MAC proof (a "before" run): the node signs each answer
        client_key = {}
    out = []
    for body in bodies if bodies is not None else [b""] * count:
        headers = signature_headers(secret, method, parts.path, "", body, credential)
        headers.update(client_key)
        if bodies is not None:
            headers.update({"Content-Type": "application/json", "Content-Length": str(len(body))})
        out.append(head + "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode() + b"\r\n" + body)
    return out


async def _raw_exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes,
                        proof: bool) -> bool:
    """One request; True for a 200 (that carries the node's id proof, when `proof`)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    # A signed answer without its proof would be a cheaper, wrong answer: count it as an error.
    if not head.startswith(b"HTTP/1.1 200 "):
        return False
    lowered = head.lower()
    return not proof or b"\r\nx-pinkybrain-node-mac:" in lowered or b"\r\nx-pinkybrain-node-sig:" in lowered


async def _drive_raw(url: str, secret: str | None, concurrency: int, requests: int, warmup: int,
                     max_seconds: float, server_pid: int | None, credential: str = "mesh") -> dict:
    from urllib.parse import urlsplit

    import psutil

    parts = urlsplit(url)
    server = psutil.Process(server_pid) if server_pid else None
    warm = _raw_requests(url, secret, credential, warmup + concurrency)
    measured = _raw_requests(url, secret, credential, requests)
    conns = [await asyncio.open_connection(parts.hostname, parts.port) for _ in range(concurrency)]

    async def phase(batch: list[bytes], deadline: float, latencies: list[float] | None) -> tuple[int, int]:
        ok = errors = 0
        queue = iter(batch)

        async def worker(reader, writer) -> None:
            nonlocal ok, errors
            for request in queue:  # one shared iterator: the workers take the next request in turn
                if time.monotonic() >= deadline:
                    return
                start = time.perf_counter()
                try:
                    good = await _raw_exchange(reader, writer, request, bool(secret))
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    good = False
                if good:
                    ok += 1
                    if latencies is not None:
                        latencies.append(time.perf_counter() - start)
                else:
                    errors += 1

        await asyncio.gather(*(worker(r, w) for r, w in conns))
        return ok, errors

    try:
        return await _measured(phase, warm, measured, max_seconds, server, concurrency, requests)
    finally:
        for _, writer in conns:
            writer.close()


def run_load_worker(args: argparse.Namespace) -> None:
    drive = _drive_raw if args.client == "raw" else _drive
    try:
        import uvloop  # the raw generator's own cost per request, lowered further
        run = uvloop.run if drive is _drive_raw else asyncio.run
    except ImportError:
        run = asyncio.run
    result = run(
        drive(
            args.url,
            os.environ.get(SECRET_ENV),
            args.level,
            args.requests,
            args.warmup,
            args.max_seconds,
            args.server_pid,
            os.environ.get(CREDENTIAL_ENV, "mesh"),
        )
    )
    print(json.dumps(result))


def median_round(rounds: list[dict]) -> dict:
    return sorted(rounds, key=lambda r: r["rps"])[(len(rounds) - 1) // 2]


def measure(
    url: str, secret: str | None, level: int, args: argparse.Namespace, cpu: int | None, server_pid: int,
    credential: str = "mesh",
) -> dict:
    """One level against one server, in a separate process (so client CPU is not the server's)."""
    env = {k: v for k, v in os.environ.items() if k not in (SECRET_ENV, CREDENTIAL_ENV)}
    if secret:
        env[SECRET_ENV] = secret
        env[CREDENTIAL_ENV] = credential
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--load-worker",
        "--url",
        url,
        "--level",
        str(level),
        "--requests",
        str(args.requests),
        "--warmup",
        str(args.warmup),
        "--max-seconds",
        str(args.max_seconds),
        "--server-pid",
        str(server_pid),
        "--client",
        args.client,
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True, preexec_fn=_pinned(cpu))
    try:
        out, _ = proc.communicate(timeout=2 * args.max_seconds + 60)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"load generator for {url} at concurrency {level} did not finish") from None
    finally:
        if proc.poll() is None:  # timed out, or we are being interrupted: leave nothing behind
            proc.kill()
            proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"load generator for {url} exited {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ auth checks alone


def _owner_key(home: Path) -> str | None:
    """The owner key `identity init` created (None for a node version without owner keys)."""
    try:
        return json.loads((home / "owner.key").read_text())["key"]
    except (OSError, ValueError, KeyError):
        return None


def auth_costs(iterations: int, repeats: int = 5) -> list[dict]:
    """Microseconds per request the auth middleware adds, per credential and per refusal, in-process.

    Each case runs `iterations` requests (signed beforehand: signing is the client's cost) through
    SignedRequestMiddleware around a trivial ASGI app, `repeats` times; the fastest repeat (in CPU time)
    counts, the least disturbed by other load. The same app called without the middleware is the baseline."""
    from pinkybrain.node.api.auth import Authenticator, SignedRequestMiddleware
    from pinkybrain.node.core.auth import NonceCache, RequestVerifier
    from pinkybrain.node.core.identity import Identity
    from pinkybrain.node.services.credentials import ApiKeyStore
    from pinkybrain.node.services.trust_store import TrustStore
    from pinkybrain.skill.signing import signature_headers

    tmp = Path(tempfile.mkdtemp(prefix="pinkybrain-bench-auth-"))
    node, peer = Identity.generate(), Identity.generate()
    trust = TrustStore.open(tmp, node.node_id)
    try:
        trust.vouch(node, peer.node_id, "full")
        keys = ApiKeyStore.open(tmp)
        api_key = keys.create("bench", "query")
        secret, owner_key = secrets.token_urlsafe(32), secrets.token_hex(32)
        auth = Authenticator(
            RequestVerifier(secret, NonceCache(), owner_key=owner_key,
                            peer_valid=lambda node_id: trust.is_valid(node_id).valid), keys)

        def peer_headers(method: str, path: str, body: bytes) -> dict:
            import hashlib

            ts, nonce = f"{time.time():.3f}", secrets.token_hex(16)
            canonical = "\n".join(("PB1-ED25519", method, path, "", ts, nonce, hashlib.sha256(body).hexdigest()))
            return {"X-PinkyBrain-Sig": peer.sign(canonical.encode()).hex(), "X-PinkyBrain-Timestamp": ts,
                    "X-PinkyBrain-Nonce": nonce, "X-PinkyBrain-Credential": "peer", "X-PinkyBrain-Peer": peer.node_id}

        body_1k = json.dumps({"key": "k", "value": "v" * 1000}).encode()
        cases = {
            "bare app (no middleware)": ("GET", "/api/status", b"", lambda m, p, b: {}),
            "member: secret HMAC, GET /api/status": ("GET", "/api/status", b"",
                                                     lambda m, p, b: signature_headers(secret, m, p, "", b)),
            "owner: owner-key HMAC, GET /api/status": (
                "GET", "/api/status", b"", lambda m, p, b: signature_headers(owner_key, m, p, "", b, "owner")),
            "owner: POST /api/memory/set, 1 KiB body": (
                "POST", "/api/memory/set", body_1k,
                lambda m, p, b: signature_headers(owner_key, m, p, "", b, "owner")),
            "query key: bearer, GET /v1/models": ("GET", "/v1/models", b"",
                                                  lambda m, p, b: {"Authorization": f"Bearer {api_key}"}),
            "public peer: Ed25519 + WoT, GET /api/conversations": ("GET", "/api/conversations", b"", peer_headers),
            "refused 403: member -> POST /api/trust/vouch": (
                "POST", "/api/trust/vouch", b"", lambda m, p, b: signature_headers(secret, m, p, "", b)),
            "refused 401: unsigned GET /api/status": ("GET", "/api/status", b"", lambda m, p, b: {}),
        }

        async def app(scope, receive, send):
            await receive()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

        middleware = SignedRequestMiddleware(app, lambda: auth)

        async def run_case(name: str) -> tuple[float, dict]:
            method, path, body, sign = cases[name]
            target = app if name.startswith("bare") else middleware
            best, statuses = math.inf, {}
            for _ in range(repeats):
                scopes = []
                for _ in range(iterations):
                    headers = {"content-length": str(len(body)), **sign(method, path, body)}
                    scopes.append({"type": "http", "method": method, "path": path, "query_string": b"",
                                   "client": ("127.0.0.1", 1),
                                   "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]})

                async def receive(body=body):
                    return {"type": "http.request", "body": body, "more_body": False}

                async def send(message):
                    if message["type"] == "http.response.start":
                        statuses[message["status"]] = statuses.get(message["status"], 0) + 1

                # CPU time of this process: on a busy machine, wall time would mostly measure the others.
                started = time.process_time()
                for scope in scopes:
                    await target(scope, receive, send)
                best = min(best, (time.process_time() - started) / iterations)
            return best, statuses

        import logging

        logging.getLogger("pinkybrain.auth").setLevel(logging.ERROR)  # the 401 case logs a line per request
        out = []
        for name in cases:
            seconds, statuses = asyncio.run(run_case(name))
            out.append({"case": name, "us_per_request": seconds * 1e6, "statuses": statuses})
        base = out[0]["us_per_request"]
        for row in out:
            row["added_us"] = row["us_per_request"] - base
        return out
    finally:
        trust.close()
        shutil.rmtree(tmp, ignore_errors=True)


def format_auth_costs(rows: list[dict]) -> str:
    lines = ["", "auth checks alone (in-process, no sockets; CPU time, fastest of 5 repeats)",
             f"{'case':<52} {'us/req':>8} {'added us':>9} {'status':>7}"]
    for row in rows:
        status = ",".join(str(s) for s in sorted(row["statuses"]))
        lines.append(f"{row['case']:<52} {row['us_per_request']:>8.1f} {row['added_us']:>9.1f} {status:>7}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ orchestration


def _pinned(cpu: int | None):
    """A preexec_fn keeping server and client off each other's core: steadier numbers. Set before
    exec, so every thread the child later starts inherits it."""
    if cpu is None:
        return None

    def pin() -> None:
        try:
            os.sched_setaffinity(0, {cpu})
        except OSError:
            pass

    return pin


def _stop(proc: subprocess.Popen | None, name: str) -> None:
    if proc is None or proc.poll() is not None:
        return
    # Each server runs in its own session: signalling its process group also reaches any children.
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        print(f"{name} ignored SIGTERM for 30 s; killing it", file=sys.stderr)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


class NotReady(RuntimeError):
    """A server did not start answering; str() says which and why, with its log tail."""


def _wait_ready(proc: subprocess.Popen, url: str, secret: str | None, name: str, log: Path | None) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECS
    last = "no answer"
    with httpx.Client(auth=_auth(secret), timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            try:
                response = client.get(url)
                if response.status_code == 200:
                    return
                last = f"HTTP {response.status_code}: {response.text[:200]}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}"
            time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    state = (
        f"exited {proc.returncode}"
        if proc.poll() is not None
        else f"not ready after {START_TIMEOUT_SECS:.0f} s"
    )
    raise NotReady(f"{name} {state} ({last})\n{tail}")


def _bench_env(home: Path) -> dict:
    env = dict(os.environ)
    # A P2P_SECRET or PINKYBRAIN_CONFIG from the caller's shell would override the bench's own files.
    for key in ("P2P_SECRET", "PINKYBRAIN_CONFIG", SECRET_ENV):
        env.pop(key, None)
    env["PINKYBRAIN_HOME"] = str(home)
    return env


def _write_config(home: Path, secret: str, port: int, dashboard: bool = True) -> Path:
    import yaml

    config = {
        "node": {"name": "bench"},
        "p2p": {"secret": secret, "listen": f"127.0.0.1:{port}", "mdns": False},
        "mesh": {"public": False, "stealth": True},
        "logging": {"level": "warning"},
    }
    if not dashboard:  # only when off: a tree from before the key (a "before" run) refuses unknown keys
        config["dashboard"] = {"enabled": False}
    path = home / "pinkybrain.yaml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        yaml.safe_dump(config, fh, sort_keys=False)
    return path


TABLE_HEADER = (
    f"{'server':<9} {'conc':>4} {'requests':>8} {'errors':>6} {'req/s':>8} {'p50 ms':>7} "
    f"{'p99 ms':>7} {'srv us/req':>10} {'client cpu':>10} {'req/s ratio':>11} {'p50 ratio':>9} "
    f"{'cpu ratio':>9}"
)


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else math.nan


def paired_ratios(rounds: list[dict], base_rounds: list[dict]) -> dict:
    """Median over rounds of each round's ratio to the baseline round measured just before it: drift and
    other load on a shared machine hit a pair alike, so these are steadier than a ratio of medians."""

    def med(values: list[float]) -> float:
        values = sorted(v for v in values if not math.isnan(v))
        return values[(len(values) - 1) // 2] if values else math.nan

    pairs = list(zip(rounds, base_rounds, strict=True))
    return {"rps": med([_ratio(r["rps"], b["rps"]) for r, b in pairs]),
            "p50": med([_ratio(r["p50_ms"], b["p50_ms"]) for r, b in pairs]),
            "cpu": med([_ratio(r["server_cpu_us_per_req"], b["server_cpu_us_per_req"]) for r, b in pairs])}


def format_row(name: str, r: dict, ratios: dict) -> str:
    return (
        f"{name:<9} {r['concurrency']:>4} {r['requests']:>8} {r['errors']:>6} {r['rps']:>8.1f} "
        f"{r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} {r['server_cpu_us_per_req']:>10.0f} "
        f"{r['client_cpu_pct']:>9.0f}% {ratios['rps']:>10.2f}x {ratios['p50']:>8.2f}x {ratios['cpu']:>8.2f}x"
        + ("  (time cap hit)" if r["truncated"] else "")
    )


def spawn_node(home: Path, config: Path, *, init_identity: bool = False, serve_args: tuple[str, ...] = (),
               cpu: int | None = None) -> tuple[subprocess.Popen, Path]:
    """`python -m pinkybrain.node serve` for a benchmark (the other bench scripts use it too): in its own
    session (so stopping it stops its children), its output in home/node.log, pinned to `cpu` if given."""
    env = _bench_env(home)
    node_cmd = [sys.executable, "-m", "pinkybrain.node"]
    if init_identity:
        subprocess.run([*node_cmd, "identity", "init", "--config", str(config)], env=env, cwd=home, check=True,
                       stdout=subprocess.DEVNULL, timeout=120)
    log = home / "node.log"
    with log.open("wb") as log_fh:
        proc = subprocess.Popen(
            [*node_cmd, "serve", "--config", str(config), *serve_args],
            env=env, cwd=home, stdin=subprocess.DEVNULL, stdout=log_fh, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_pinned(cpu),
        )
    return proc, log


def save_node_config(home: Path, config: dict) -> Path:
    """A benchmark node's pinkybrain.yaml (owner-only: it holds the secret), with its shared_models/."""
    import yaml

    (home / "shared_models").mkdir(parents=True, exist_ok=True)
    path = home / "pinkybrain.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    path.chmod(0o600)
    return path


def start_ready(home: Path, config: Path, port: int, secret: str) -> subprocess.Popen:
    """spawn_node, then wait until a signed status answers (NotReady, with the log's tail, if it does not)."""
    proc, log = spawn_node(home, config)
    _wait_ready(proc, f"http://127.0.0.1:{port}/api/status", secret, home.name, log)
    return proc


def _start_node(home: Path, secret: str, port: int, dashboard: bool, cpu: int | None
                ) -> tuple[subprocess.Popen, Path]:
    home.mkdir(parents=True, exist_ok=True)
    config = _write_config(home, secret, port, dashboard)
    return spawn_node(home, config, init_identity=True, serve_args=("--host", "127.0.0.1", "--port", str(port)),
                      cpu=cpu)


def run_bench(args: argparse.Namespace) -> int:
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    if not levels or min(levels) < 1:
        raise SystemExit("--concurrency needs positive integers, e.g. 1,8,32")
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    server_cpu, client_cpu = (cpus[0], cpus[1]) if args.pin and len(cpus) >= 2 else (None, None)

    home = Path(tempfile.mkdtemp(prefix="pinkybrain-bench-"))
    node = baseline = nodash = None
    # SIGTERM would otherwise end this process without its `finally`, orphaning both servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        secret = secrets.token_urlsafe(32)
        node_port, base_port, nodash_port = free_port(), free_port(), free_port()
        node, node_log = _start_node(home, secret, node_port, True, server_cpu)
        if args.compare_dashboard:  # the same node with dashboard.enabled: false
            nodash, nodash_log = _start_node(home / "no-dashboard", secret, nodash_port, False, server_cpu)
        baseline = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--baseline-server", "--port", str(base_port)],
            env=_bench_env(home), cwd=home, stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=_pinned(server_cpu),
        )
        node_url = f"http://127.0.0.1:{node_port}{STATUS_PATH}"
        ping_url = f"http://127.0.0.1:{node_port}{PING_PATH}"
        nodash_url = f"http://127.0.0.1:{nodash_port}{STATUS_PATH}"
        base_url = f"http://127.0.0.1:{base_port}{STATUS_PATH}"
        try:
            _wait_ready(node, node_url, secret, "node", node_log)
            if nodash is not None:
                _wait_ready(nodash, nodash_url, secret, "node without dashboard", nodash_log)
            _wait_ready(baseline, base_url, None, "baseline server", None)
        except NotReady as exc:
            print(f"api_load: {exc}", file=sys.stderr)
            return 2

        results = []
        if not args.json:
            print(f"{TABLE_HEADER}\n{'-' * len(TABLE_HEADER)}", flush=True)
        owner_key = _owner_key(home)
        for level in levels:
            # Rounds alternate baseline and node so background noise and drift hit both alike; the
            # median round (by req/s) of each is reported. "node" signs as a mesh member (the network
            # secret), "owner" with the owner key, when the node has one.
            base_rounds, node_rounds, owner_rounds, ping_rounds, nodash_rounds = [], [], [], [], []
            for _ in range(args.rounds):
                base_rounds.append(measure(base_url, None, level, args, client_cpu, baseline.pid))
                node_rounds.append(measure(node_url, secret, level, args, client_cpu, node.pid))
                ping_rounds.append(measure(ping_url, secret, level, args, client_cpu, node.pid))
                if nodash is not None:
                    nodash_rounds.append(measure(nodash_url, secret, level, args, client_cpu, nodash.pid))
                if owner_key:
                    owner_rounds.append(measure(node_url, owner_key, level, args, client_cpu, node.pid, "owner"))
            base, mine = median_round(base_rounds), median_round(node_rounds)
            entry = {"concurrency": level, "baseline": base, "node": mine, "ping": median_round(ping_rounds),
                     "rounds": {"baseline": base_rounds, "node": node_rounds, "ping": ping_rounds}}
            if owner_rounds:
                entry["owner"] = median_round(owner_rounds)
                entry["rounds"]["owner"] = owner_rounds
            if nodash_rounds:
                entry["no-dash"] = median_round(nodash_rounds)
                entry["rounds"]["no-dash"] = nodash_rounds
            results.append(entry)
            if not args.json:
                entry["ratios"] = {name: paired_ratios(entry["rounds"][name], base_rounds)
                                   for name in entry["rounds"]}
                rows = [format_row(name, entry[name], entry["ratios"][name])
                        for name in ("baseline", "node", "ping", "owner", "no-dash") if name in entry]
                print(*rows, sep="\n", flush=True)
        checks = auth_costs(args.auth_iterations) if args.auth_iterations else []
        if args.json:
            print(
                json.dumps(
                    {
                        "requests_per_level": args.requests,
                        "rounds": args.rounds,
                        "cpus": len(cpus) or os.cpu_count(),
                        "pinned": server_cpu is not None,
                        "results": results,
                        "auth_checks": checks,
                    },
                    indent=2,
                )
            )
        else:
            print(
                f"\n{len(cpus) or os.cpu_count()} CPUs; servers and load generator "
                f"{'pinned to separate cores' if server_cpu is not None else 'not pinned'}. Ratios are "
                "node / baseline at the same concurrency, the median of each round's ratio to the baseline round just before it.\nsrv us/req: server CPU time per request "
                "(independent of client speed). client cpu near 100%: the load generator set the pace, "
                "so req/s understates what that server could do."
            )
            if checks:
                print(format_auth_costs(checks))
        failed = sum(x["errors"] for r in results for side in r["rounds"].values() for x in side)
        if failed:
            tail = node_log.read_text(errors="replace")[-2000:]
            print(f"{failed} requests failed; node log tail:\n{tail}", file=sys.stderr)
            return 1
        return 0
    finally:
        _stop(node, "node")
        _stop(nodash, "node without dashboard")
        _stop(baseline, "baseline server")
        shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per level and server")
    parser.add_argument("--warmup", type=int, default=100, help="unmeasured requests before each measurement")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated concurrency levels")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=60.0,
        help="time cap per level and server (fewer requests are reported if hit)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="alternating baseline/node rounds per level; the median round is shown",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw",
                        help="load generator: raw (pre-signed HTTP/1.1 requests, saturates the server like wrk) "
                             "or httpx (the skill's own client, signing each request as it goes)")
    parser.add_argument("--compare-dashboard", action="store_true",
                        help="also measure status on the same node with dashboard.enabled: false (row no-dash)")
    parser.add_argument("--auth-iterations", type=int, default=3000,
                        help="requests per case for the in-process auth-check table (0: skip it)")
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not pin servers and load generator to separate CPU cores",
    )
    # internal: the same file plays the load generator and the baseline server
    parser.add_argument("--load-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--level", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.requests < 1 or args.warmup < 0 or args.max_seconds <= 0 or args.rounds < 1:
        parser.error("--requests and --rounds must be >= 1, --warmup >= 0, --max-seconds > 0")
    if args.baseline_server:
        run_baseline_server(args.port)
    elif args.load_worker:
        run_load_worker(args)
    else:
        sys.exit(run_bench(args))


if __name__ == "__main__":
    main()
