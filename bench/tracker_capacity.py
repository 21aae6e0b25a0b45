"""Tracker capacity and the relay's added latency, in one run, on 127.0.0.1 only.

    python bench/tracker_capacity.py [--records 1000,10000] [--sessions 250] [--list-requests 200]
                                     [--refresh 10000] [--relay-rounds 500] [--sizes 64,4096,65536]
                                     [--rounds 3] [--max-seconds 600] [--json]

One run:

1. Starts a tracker (`python -m pinkybrain tracker serve`) with its per-session rate limits raised out of
   the way (announce, list and relay rates; sessions per IP), so the numbers are the tracker's work, not
   its throttles. Where there are two or more CPUs, the tracker runs on one and this load generator on
   another (`--no-pin` turns that off).
2. Generates every identity and signs every record before any timing: signing is the nodes' cost.
3. Fills the store to each size in `--records` with new records: `--sessions` sessions at a time log in
   (not timed), then each announces its own record at once (timed: "announce, new record"). The records
   stay after their sessions close, as they do for real nodes.
4. At each size: `list` latency for a first page of 100 and of 500, a model filter matching 1 % of the
   records, a full walk through every page, and the same walk through TrackerClient (which verifies every
   record's signature, as a node does). `srv us/op` is the tracker process's CPU time per operation.
5. At the largest size: re-announces (a higher sequence replacing a record), pipelined over 50 sessions.
6. Relay latency: node A (this process) sends a payload to node B (a separate process) through the
   tracker, B echoes it back through the tracker (A -> tracker -> B -> tracker -> A), against a direct
   WebSocket echo from the same B process (A -> B -> A), for each payload size; direct and relayed
   batches alternate for `--rounds` rounds and the median round is shown. "added" is relay minus direct:
   what the two tracker hops cost. CPU pinning is lifted for this phase (see `unpin`).
7. Sybil limits (`--sybil N`, 0 skips it): what the per-address-range limits cost an honest announcement
   and an attacker. Two fresh trackers, one with the limits at their defaults (new node ids per /24 or
   /48: a burst of 64, then 1 a second; at most 1024 records per range) and one with them out of the way;
   N honest nodes each log in and announce once, one after the other, on each (alternating, `--rounds`
   rounds, median; N x rounds must fit the burst, since all of them come from 127.0.0.1): the latency
   and tracker CPU of an honest announcement with the limits, against without. Then an attacker in the
   same range announces 100 fresh identities as fast as it can on the limited tracker: how many it got
   in, and, from the settings, how long one range needs to reach its cap and how many ranges a given
   number of records needs.

Exit status: 0 when every operation succeeded, 1 when any failed, 2 when the tracker did not start.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START_TIMEOUT_SECS = 30.0
COMMON_MODEL = "bench-common-model"
RARE_MODEL = "bench-rare-model"
SHA = "5f" * 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.rows: list[dict] = []
        self.relay_rows: list[dict] = []
        self.sybil: dict | None = None
        self.failures = 0
        self.deadline = time.monotonic() + args.max_seconds
        self.proc: subprocess.Popen | None = None
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}"
        self.log_file = Path(tempfile.mkstemp(prefix="pb-tracker-bench-", suffix=".log")[1])
        self.server = None  # psutil.Process of the tracker
        self.pinned: tuple[int, int] | None = None

    # -- the tracker process ------------------------------------------------------------------------
    def start_tracker(self) -> None:
        import psutil

        most = max(self.args.records) + self.args.sessions + 100
        cmd = [
            sys.executable, "-m", "pinkybrain", "tracker", "serve", "--log-level", "warning",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--max-records", str(most), "--max-sessions", str(most), "--max-sessions-per-ip", str(most),
            "--announce-rate", "1000000", "--ip-new-record-rate", "1000000", "--list-rate", "1000000",
            "--relay-rate", "1000000", "--relay-bytes-rate", str(2**40), "--max-records-per-range", str(most),
        ]  # fmt: skip
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        self.server = psutil.Process(self.proc.pid)
        if self.args.pin and hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2:
            cpus = sorted(os.sched_getaffinity(0))
            if len(cpus) >= 2:
                os.sched_setaffinity(self.proc.pid, {cpus[0]})
                os.sched_setaffinity(0, {cpus[1]})
                self.pinned = (cpus[0], cpus[1])
        deadline = time.monotonic() + START_TIMEOUT_SECS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the tracker exited with {self.proc.returncode}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("the tracker did not listen in time")

    def stop_tracker(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def server_cpu(self) -> float:
        t = self.server.cpu_times()
        return t.user + t.system

    def check_time(self, what: str) -> None:
        if time.monotonic() > self.deadline:
            raise TimeoutError(f"--max-seconds ran out before {what}")

    def add(self, records: int, op: str, count: int, secs: float, cpu: float, lat: list[float] | None = None):
        row = {
            "records": records,
            "operation": op,
            "count": count,
            "seconds": round(secs, 4),
            "per_sec": round(count / secs, 1) if secs > 0 else None,
            "p50_ms": round(percentile(lat, 50) * 1000, 3) if lat else None,
            "p99_ms": round(percentile(lat, 99) * 1000, 3) if lat else None,
            "srv_us_per_op": round(cpu / count * 1e6, 1) if count else None,
        }
        self.rows.append(row)
        if not self.args.json:
            print(_row(row), flush=True)

    # -- sessions -----------------------------------------------------------------------------------
    async def login(self, identity):
        from websockets.asyncio.client import connect

        from pinkybrain.node.core.tracker_protocol import auth_message, b64decode

        ws = await connect(self.url, compression=None, proxy=None, max_size=2**21, ping_interval=None)
        challenge = json.loads(await ws.recv())
        await ws.send(auth_message(identity, b64decode(challenge["nonce"]), self.url))
        welcome = json.loads(await ws.recv())
        if welcome.get("type") != "welcome":
            raise RuntimeError(f"login refused: {welcome}")
        return ws

    async def ask(self, ws, text: str) -> dict:
        await ws.send(text)
        reply = json.loads(await ws.recv())
        if reply.get("type") == "error":
            self.failures += 1
        return reply

    # -- phases -------------------------------------------------------------------------------------
    async def run(self) -> None:
        from pinkybrain.node.core.identity import Identity
        from pinkybrain.node.core.tracker_protocol import AnnounceRecord

        args = self.args
        total = max(args.records)
        t0 = time.perf_counter()
        identities = [Identity.generate() for _ in range(total)]
        now = time.time()

        def record_fields(i: int) -> dict:
            models = [{"name": COMMON_MODEL, "sha256": SHA}]
            if i % 100 == 0:
                models.append({"name": RARE_MODEL, "sha256": None})
            return {
                "addresses": [f"ws://10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}:8080/p2p"],
                "models": models,
                "capacity": {
                    "cpu_cores": 8,
                    "ram_mb": 16384,
                    "cpu_percent": i % 100,
                    "ram_percent": 50,
                    "paused": False,
                },
                "stealth": False,
                "name": f"bench-{i}",
            }

        announces = [
            json.dumps(
                {
                    "type": "announce",
                    "id": 1,
                    "record": AnnounceRecord.build(
                        ident, seq=1, ttl=600, now=now, **record_fields(i)
                    ).to_wire(),
                }
            )
            for i, ident in enumerate(identities)
        ]
        gc.collect()
        gc.freeze()  # the pre-signed set is long-lived: keep collections from walking it mid-measurement
        if not args.json:
            print(f"signed {total} records in {time.perf_counter() - t0:.1f}s (not timed)\n", flush=True)
            print(_header(), flush=True)

        filled = 0
        for size in sorted(args.records):
            self.check_time(f"filling to {size} records")
            elapsed, cpu = 0.0, 0.0
            new = size - filled
            while filled < size:
                batch = range(filled, min(size, filled + args.sessions))
                sessions = await asyncio.gather(*(self.login(identities[i]) for i in batch))
                cpu0, start = self.server_cpu(), time.perf_counter()
                replies = await asyncio.gather(
                    *(self.ask(ws, announces[i]) for ws, i in zip(sessions, batch, strict=True))
                )
                elapsed += time.perf_counter() - start
                cpu += self.server_cpu() - cpu0
                if any(r.get("type") != "ok" for r in replies):
                    raise RuntimeError(
                        f"an announce was refused: {next(r for r in replies if r.get('type') != 'ok')}"
                    )
                await asyncio.gather(*(ws.close() for ws in sessions))
                filled = batch[-1] + 1
            self.add(size, f"announce, new record ({args.sessions} sessions)", new, elapsed, cpu)
            await self.list_phase(size, identities)
        await self.refresh_phase(total, identities, record_fields)
        await self.relay_phase()
        if self.args.sybil:
            await self.sybil_phase(record_fields)

    async def timed_requests(self, ws, texts: list[str]) -> tuple[list[float], float, float, list[dict]]:
        """Sequential requests; replies are parsed after the clock stops, so a page's JSON decoding in
        this process (milliseconds for 500 records) is not counted as the tracker's latency."""
        lat, raw = [], []
        cpu0, start = self.server_cpu(), time.perf_counter()
        for text in texts:
            t = time.perf_counter()
            await ws.send(text)
            raw.append(await ws.recv())
            lat.append(time.perf_counter() - t)
        secs, cpu = time.perf_counter() - start, self.server_cpu() - cpu0
        replies = [json.loads(r) for r in raw]
        self.failures += sum(r.get("type") == "error" for r in replies)
        return lat, secs, cpu, replies

    async def list_phase(self, size: int, identities) -> None:
        from pinkybrain.node.core.identity import Identity
        from pinkybrain.node.services.tracker_client import TrackerClient

        self.check_time(f"listing {size} records")
        n = self.args.list_requests
        ws = await self.login(Identity.generate())
        try:
            for limit in (100, 500):
                msg = json.dumps({"type": "list", "id": 1, "limit": limit})
                lat, secs, cpu, replies = await self.timed_requests(ws, [msg] * n)
                self._expect(replies, min(limit, size))
                self.add(size, f"list, first page of {limit}", n, secs, cpu, lat)
            msg = json.dumps({"type": "list", "id": 1, "limit": 500, "model": RARE_MODEL})
            lat, secs, cpu, replies = await self.timed_requests(ws, [msg] * n)
            self._expect(replies, math.ceil(size / 100))
            self.add(size, "list, model filter (1 % match)", n, secs, cpu, lat)

            # A walk through every page, records per second.
            cpu0, start, seen, after = self.server_cpu(), time.perf_counter(), 0, None
            while True:
                msg = {"type": "list", "id": 1, "limit": 500, **({"after": after} if after else {})}
                reply = await self.ask(ws, json.dumps(msg))
                seen += len(reply.get("records", []))
                after = reply.get("next")
                if after is None:
                    break
            secs, cpu = time.perf_counter() - start, self.server_cpu() - cpu0
            if seen != size:
                self.failures += 1
            self.add(size, "list, every page (records)", seen, secs, cpu)
        finally:
            await ws.close()

        client = TrackerClient(self.url, Identity.generate(), proxy=None, request_timeout=60)
        await client.connect()
        try:
            cpu0, start = self.server_cpu(), time.perf_counter()
            peers = await client.list_peers(limit=500, max_records=size + 10)
            secs, cpu = time.perf_counter() - start, self.server_cpu() - cpu0
            if len(peers) != size:
                self.failures += 1
            self.add(size, "TrackerClient.list_peers, verified (records)", len(peers), secs, cpu)
        finally:
            await client.close()

    def _expect(self, replies: list[dict], count: int) -> None:
        for r in replies:
            if r.get("type") != "peers" or len(r.get("records", [])) != count:
                self.failures += 1

    async def refresh_phase(self, size: int, identities, record_fields) -> None:
        from pinkybrain.node.core.tracker_protocol import AnnounceRecord

        self.check_time("re-announces")
        n_sessions = min(50, size)
        per = max(1, self.args.refresh // n_sessions)
        now = time.time()
        texts = [
            [
                json.dumps(
                    {
                        "type": "announce",
                        "id": k,
                        "record": AnnounceRecord.build(
                            identities[i], seq=2 + k, ttl=600, now=now, **record_fields(i)
                        ).to_wire(),
                    }
                )
                for k in range(per)
            ]
            for i in range(n_sessions)
        ]
        sessions = await asyncio.gather(*(self.login(identities[i]) for i in range(n_sessions)))

        async def pipeline(ws, batch: list[str]) -> int:
            window, sent, ok = 32, 0, 0
            for text in batch[:window]:
                await ws.send(text)
                sent += 1
            for _ in range(len(batch)):
                reply = json.loads(await ws.recv())
                ok += reply.get("type") == "ok"
                if sent < len(batch):
                    await ws.send(batch[sent])
                    sent += 1
            return ok

        try:
            cpu0, start = self.server_cpu(), time.perf_counter()
            oks = await asyncio.gather(
                *(pipeline(ws, batch) for ws, batch in zip(sessions, texts, strict=True))
            )
            secs, cpu = time.perf_counter() - start, self.server_cpu() - cpu0
        finally:
            await asyncio.gather(*(ws.close() for ws in sessions))
        self.failures += n_sessions * per - sum(oks)
        self.add(size, f"re-announce, higher seq (pipelined, {n_sessions} sessions)", sum(oks), secs, cpu)

    def unpin(self) -> None:
        """Latency is measured unpinned: on small VMs a wake-up across pinned CPUs costs milliseconds now
        and then, which would be this machine's artefact, not the relay's."""
        if self.pinned is not None:
            cpus = set(range(os.cpu_count() or 1))
            os.sched_setaffinity(self.proc.pid, cpus)
            os.sched_setaffinity(0, cpus)

    def start_peer(self) -> tuple[subprocess.Popen, str, int]:
        """Node B in its own process: it echoes relayed datagrams and serves a direct WebSocket echo."""
        port = free_port()
        peer = subprocess.Popen(
            [sys.executable, __file__, "--echo-peer", self.url, str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = peer.stdout.readline().strip()  # the peer prints its node id once both echoes are up
        if not line:
            raise RuntimeError("the echo peer did not start")
        return peer, line, port

    async def relay_phase(self) -> None:
        from websockets.asyncio.client import connect

        from pinkybrain.node.core.identity import Identity
        from pinkybrain.node.services.tracker_client import TrackerClient

        self.check_time("relay latency")
        self.unpin()
        loop = asyncio.get_running_loop()
        waiting: dict[str, asyncio.Future] = {}

        def on_reply(sender: str, payload: bytes) -> None:
            fut = waiting.pop("reply", None)
            if fut is not None and not fut.done():
                fut.set_result(payload)

        peer, peer_id, peer_port = await loop.run_in_executor(None, self.start_peer)
        a = TrackerClient(self.url, Identity.generate(), on_relay=on_reply, proxy=None)
        direct = None
        try:
            await a.connect()
            direct = await connect(
                f"ws://127.0.0.1:{peer_port}", compression=None, proxy=None, max_size=2**21
            )

            async def relay_rtt(payload: bytes) -> float:
                fut = waiting["reply"] = loop.create_future()
                t = time.perf_counter()
                await a.send_relay(peer_id, payload)
                got = await asyncio.wait_for(fut, 10)
                rtt = time.perf_counter() - t
                self.failures += got != payload
                return rtt

            async def direct_rtt(payload: bytes) -> float:
                t = time.perf_counter()
                await direct.send(payload)
                got = await asyncio.wait_for(direct.recv(), 10)
                rtt = time.perf_counter() - t
                self.failures += got != payload
                return rtt

            if not self.args.json:
                print("\nrelay latency: round trip A -> tracker -> B -> tracker -> A", flush=True)
                print(
                    "vs direct:     round trip A -> B -> A (B is the same echo process in both)", flush=True
                )
                print(_relay_header(), flush=True)
            for size in self.args.sizes:
                payload = os.urandom(size)
                for _ in range(20):  # warm both paths
                    await direct_rtt(payload)
                    await relay_rtt(payload)
                rounds = []
                for _ in range(self.args.rounds):
                    self.check_time("relay latency")
                    d = [await direct_rtt(payload) for _ in range(self.args.relay_rounds)]
                    r = [await relay_rtt(payload) for _ in range(self.args.relay_rounds)]
                    rounds.append(
                        (percentile(d, 50), percentile(d, 99), percentile(r, 50), percentile(r, 99))
                    )
                mid = sorted(rounds, key=lambda x: x[2])[len(rounds) // 2]
                row = {
                    "payload_bytes": size,
                    "rounds": self.args.rounds,
                    "per_round": self.args.relay_rounds,
                    "direct_p50_ms": round(mid[0] * 1000, 3),
                    "direct_p99_ms": round(mid[1] * 1000, 3),
                    "relay_p50_ms": round(mid[2] * 1000, 3),
                    "relay_p99_ms": round(mid[3] * 1000, 3),
                    "added_p50_ms": round((mid[2] - mid[0]) * 1000, 3),
                    "ratio_p50": round(mid[2] / mid[0], 2) if mid[0] else None,
                    "ratio_p99": round(mid[3] / mid[1], 2) if mid[1] else None,
                }
                self.relay_rows.append(row)
                if not self.args.json:
                    print(_relay_row(row), flush=True)
        finally:
            if direct is not None:
                await direct.close()
            await a.close()
            peer.stdin.close()  # the peer exits when its stdin closes
            try:
                peer.wait(10)
            except subprocess.TimeoutExpired:
                peer.kill()
                peer.wait(5)


    # -- Sybil limits -------------------------------------------------------------------------------
    async def sybil_phase(self, record_fields) -> None:
        import psutil

        from pinkybrain.node.core.identity import Identity
        from pinkybrain.node.core.tracker_protocol import AnnounceRecord
        from pinkybrain.node.services.tracker import TrackerSettings

        self.check_time("Sybil limits")
        n = self.args.sybil
        defaults = TrackerSettings()
        common = ["--announce-rate", "1000000", "--list-rate", "1000000", "--max-sessions-per-ip", str(4 * n + 10),
                  "--max-sessions", str(4 * n + 10)]
        off = ["--ip-new-record-rate", "1000000", "--max-records-per-range", str(10 * n * (self.args.rounds + 2))]
        trackers = {"limits on": spawn_tracker(common), "limits off": spawn_tracker(common + off)}
        saved_url, saved_server = self.url, self.server
        results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in trackers}
        try:
            now = time.time()
            base = 200_000
            for _ in range(self.args.rounds):
                for name, (proc, url) in trackers.items():
                    self.url, self.server = url, psutil.Process(proc.pid)
                    # Fresh honest identities each round: each announce adds a new record.
                    batch = [Identity.generate() for _ in range(n)]
                    texts = [json.dumps({"type": "announce", "id": 1, "record": AnnounceRecord.build(
                        ident, seq=1, ttl=600, now=now, **record_fields(base + i)).to_wire()})
                        for i, ident in enumerate(batch)]
                    base += n
                    lat, cpu_total, start = [], 0.0, time.perf_counter()
                    for ident, text in zip(batch, texts, strict=True):
                        ws = await self.login(ident)
                        cpu0, t = self.server_cpu(), time.perf_counter()
                        reply = await self.ask(ws, text)
                        lat.append(time.perf_counter() - t)
                        cpu_total += self.server_cpu() - cpu0
                        await ws.close()
                        if reply.get("type") != "ok":
                            raise RuntimeError(f"an honest announce was refused ({name}): {reply}")
                    results[name].append((percentile(lat, 50), percentile(lat, 99), cpu_total / n))
            rows = {}
            for name, rounds in results.items():
                p50, p99, cpu = sorted(rounds)[len(rounds) // 2]
                rows[name] = {"p50_ms": round(p50 * 1000, 3), "p99_ms": round(p99 * 1000, 3),
                              "srv_us_per_op": round(cpu * 1e6, 1)}
            on, off_row = rows["limits on"], rows["limits off"]
            self.sybil = {
                "honest_announce": rows,
                "ratio_p50": round(on["p50_ms"] / off_row["p50_ms"], 3) if off_row["p50_ms"] else None,
                "ratio_srv_cpu": round(on["srv_us_per_op"] / off_row["srv_us_per_op"], 3)
                if off_row["srv_us_per_op"] else None,
            }
            # The attacker: one range, fresh keys as fast as it can, on the limited tracker, right after the
            # honest nodes of that range used most of its burst.
            proc, url = trackers["limits on"]
            self.url, self.server = url, psutil.Process(proc.pid)
            attempts = 100
            accepted, start = 0, time.perf_counter()
            for i in range(attempts):
                ident = Identity.generate()
                ws = await self.login(ident)
                text = json.dumps({"type": "announce", "id": 1, "record": AnnounceRecord.build(
                    ident, seq=1, ttl=600, now=time.time(), **record_fields(900_000 + i)).to_wire()})
                await ws.send(text)
                reply = json.loads(await ws.recv())
                accepted += reply.get("type") == "ok"
                await ws.close()
            secs = time.perf_counter() - start
            cap, burst, rate = defaults.max_records_per_range, defaults.ip_new_record_burst, defaults.ip_new_record_rate
            self.sybil["attacker_one_range"] = {
                "attempts": attempts, "accepted": accepted, "seconds": round(secs, 2),
                "secs_to_fill_the_range_cap": round(max(0.0, cap - burst) / rate, 1),
                "records_per_range_at_most": cap, "ranges_for_100000_records": math.ceil(100_000 / cap),
            }
        finally:
            self.url, self.server = saved_url, saved_server
            for proc, _ in trackers.values():
                stop_process(proc)
        if not self.args.json:
            print("\nSybil limits (per address range: new ids burst 64 then 1/s, at most 1024 records):")
            print(f"{'honest announce':<16} {'p50 ms':>8} {'p99 ms':>8} {'srv us/op':>10}")
            for name, row in self.sybil["honest_announce"].items():
                print(f"{name:<16} {row['p50_ms']:>8.3f} {row['p99_ms']:>8.3f} {row['srv_us_per_op']:>10.1f}")
            print(f"ratio (on/off): p50 {self.sybil['ratio_p50']}x, tracker CPU {self.sybil['ratio_srv_cpu']}x")
            a = self.sybil["attacker_one_range"]
            print(f"attacker in one range: {a['accepted']} of {a['attempts']} fresh ids accepted in {a['seconds']} s; "
                  f"filling its {a['records_per_range_at_most']}-record cap takes >= {a['secs_to_fill_the_range_cap']} s; "
                  f"100 000 records need >= {a['ranges_for_100000_records']} ranges", flush=True)


def spawn_tracker(extra: list[str]):
    """A fresh tracker process on a free port (for the Sybil phase): (process, url)."""
    port = free_port()
    cmd = [sys.executable, "-m", "pinkybrain", "tracker", "serve", "--log-level", "warning",
           "--host", "127.0.0.1", "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + START_TIMEOUT_SECS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"a tracker exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"ws://127.0.0.1:{port}"
        time.sleep(0.05)
    stop_process(proc)
    raise RuntimeError("a tracker did not listen in time")


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def echo_peer(url: str, port: int) -> None:
    """Node B: echo relayed datagrams back to their sender, and echo a direct WebSocket."""
    from websockets.asyncio.server import serve

    from pinkybrain.node.core.identity import Identity
    from pinkybrain.node.services.tracker_client import TrackerClient

    client: TrackerClient | None = None

    async def echo_relay(sender: str, payload: bytes) -> None:
        await client.send_relay(sender, payload)

    async def echo_direct(ws) -> None:
        async for message in ws:
            await ws.send(message)

    client = TrackerClient(url, Identity.generate(), on_relay=echo_relay, proxy=None)
    await client.connect()
    server = await serve(echo_direct, "127.0.0.1", port, compression=None, max_size=2**21, ping_interval=None)
    print(client.node_id, flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the bench closes our stdin
    server.close()
    await client.close()


# -- output -----------------------------------------------------------------------------------------
_COLS = (
    ("records", 8), ("operation", 52), ("count", 7), ("seconds", 8), ("per_sec", 10), ("p50_ms", 8),
    ("p99_ms", 8), ("srv_us_per_op", 13),
)  # fmt: skip


def _header() -> str:
    labels = {"per_sec": "per sec", "p50_ms": "p50 ms", "p99_ms": "p99 ms", "srv_us_per_op": "srv us/op"}
    return " ".join(
        f"{labels.get(k, k):<{w}}" if k == "operation" else f"{labels.get(k, k):>{w}}" for k, w in _COLS
    )


def _row(row: dict) -> str:
    def fmt(k, w):
        v = row[k]
        if k == "operation":
            return f"{v:<{w}}"
        if v is None:
            return f"{'-':>{w}}"
        if isinstance(v, float):
            return f"{v:>{w}.{1 if k in ('per_sec', 'srv_us_per_op') else 3}f}"
        return f"{v:>{w}}"

    return " ".join(fmt(k, w) for k, w in _COLS)


def _relay_header() -> str:
    return (
        f"{'payload':>8} {'direct p50':>11} {'direct p99':>11} {'relay p50':>10} {'relay p99':>10} "
        f"{'added p50':>10} {'ratio p50':>10} {'ratio p99':>10}   (ms)"
    )


def _relay_row(row: dict) -> str:
    size = row["payload_bytes"]
    label = f"{size // 1024} KiB" if size >= 1024 else f"{size} B"
    return (
        f"{label:>8} {row['direct_p50_ms']:>11.3f} {row['direct_p99_ms']:>11.3f} "
        f"{row['relay_p50_ms']:>10.3f} {row['relay_p99_ms']:>10.3f} {row['added_p50_ms']:>10.3f} "
        f"{row['ratio_p50']:>9.2f}x {row['ratio_p99']:>9.2f}x"
    )


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("expected positive integers")
    return values


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--echo-peer":
        asyncio.run(echo_peer(sys.argv[2], int(sys.argv[3])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--records", type=_ints, default=[1000, 10000], help="store sizes (default 1000,10000)"
    )
    parser.add_argument("--sessions", type=int, default=250, help="sessions announcing at once (default 250)")
    parser.add_argument("--list-requests", type=int, default=200, help="list requests per kind (default 200)")
    parser.add_argument("--refresh", type=int, default=10000, help="re-announces in all (default 10000)")
    parser.add_argument("--sizes", type=_ints, default=[64, 4096, 65536], help="relay payload sizes in bytes")
    parser.add_argument("--relay-rounds", type=int, default=500, help="round trips per batch (default 500)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating direct/relay batches (default 3)")
    parser.add_argument("--max-seconds", type=float, default=600, help="stop after this long (default 600)")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin processes to CPUs")
    parser.add_argument("--sybil", type=int, default=20,
                        help="honest announces per round in the Sybil-limits phase (0 skips it; default 20)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()
    if args.sybil * args.rounds > 64:
        parser.error("--sybil times --rounds must be at most 64: the honest nodes share 127.0.0.1's burst")
    if max(args.sizes) > 200 * 1024:
        parser.error("--sizes: one relay message carries at most 200 KiB here")

    # Thousands of sessions: lift the open-file limit as far as allowed (the tracker inherits it).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(args.records) + args.sessions + 1000
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want * 2, hard), hard))

    bench = Bench(args)
    try:
        try:
            bench.start_tracker()
        except RuntimeError as exc:
            print(f"tracker_capacity: {exc}", file=sys.stderr)
            print(bench.log_file.read_text(errors="replace")[-3000:], file=sys.stderr)
            return 2
        if not args.json:
            where = (
                f"tracker on cpu {bench.pinned[0]}, load generator on cpu {bench.pinned[1]}"
                if bench.pinned
                else "not pinned"
            )
            print(f"tracker capacity: {bench.url} ({where}; {os.cpu_count()} cpus)", flush=True)
        try:
            asyncio.run(bench.run())
        except (TimeoutError, RuntimeError) as exc:
            print(f"tracker_capacity: {exc}", file=sys.stderr)
            bench.failures += 1
        alive = bench.proc.poll() is None
        if not alive:
            bench.failures += 1
    finally:
        bench.stop_tracker()
    if args.json:
        print(
            json.dumps(
                {"capacity": bench.rows, "relay": bench.relay_rows, "sybil": bench.sybil, "failures": bench.failures}, indent=2
            )
        )
    else:
        if bench.relay_rows:
            print(
                "\n'added p50' is what two tracker hops cost over the direct link; ratios are relay / direct."
            )
        print(f"failures: {bench.failures}")
        warnings = [
            line for line in bench.log_file.read_text(errors="replace").splitlines() if "ERROR" in line
        ]
        for line in warnings[:10]:
            print(f"tracker log: {line}")
    with_errors = bench.failures > 0
    try:
        bench.log_file.unlink()
    except OSError:
        pass
    return 1 if with_errors else 0


if __name__ == "__main__":
    sys.exit(main())
