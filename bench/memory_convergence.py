"""CRDT memory across peers: how fast one write converges, what a small update costs on the wire against
sending the full state, and how many durable writes per second one node sustains.

Every node is a full Mesh + MemoryStore (SQLite, WAL, synchronous=FULL) + MemorySync on its own loopback
port, all in this process and one event loop (30 node processes would swamp a small machine):

  convergence  3, 10 and 30 nodes in a ring with chords (each node i also linked to i + n/2 from 6 nodes
               on); one write on node 0, timed until every node has applied it; repeated --writes times
  bytes        two linked nodes, --keys keys already synced; --updates small writes, wire bytes per write
               (both directions, from the meshes' counters) against sending full_update() over the same
               link each time (the naive baseline), in the same run
  writes/s     store.set in a loop for --write-seconds on one node: alone, then with sync and 1 and 2 peers
               (each peer in a process of its own, as it would be on its own machine)

    python bench/memory_convergence.py [--sizes 3,10,30] [--writes 30] [--keys 1000] [--updates 50]
                                       [--write-seconds 5] [--dir PATH] [--json]

Exit status 0 when every write reached every node, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import websockets

from pinkybrain.node.core.identity import Identity
from pinkybrain.node.services.memory_store import MemoryStore
from pinkybrain.node.services.memory_sync import MemorySync
from pinkybrain.node.services.mesh import Mesh, MeshSettings
from pinkybrain.node.services.peer_link import WebsocketsTransport

# Peer processes get the parent's secret through the environment (not argv, which `ps` shows).
SECRET = os.environ.get("PB_BENCH_SECRET") or secrets.token_urlsafe(32)
CONVERGE_TIMEOUT = 15.0


class BenchNode:
    """One node's mesh, WebSocket server, durable store and sync, in this process."""

    def __init__(self, directory: Path, name: str, heartbeat: float):
        self.directory, self.name = directory, name
        self.settings = MeshSettings(
            heartbeat_secs=heartbeat, dead_after_secs=max(30.0, 3 * heartbeat), peer_exchange=False
        )
        self.watch_key: str | None = None
        self.arrived: float | None = None
        self.on_arrival = None

    async def start(self) -> BenchNode:
        self.store = MemoryStore.open(self.directory / self.name, "private")
        original = self.store.apply_remote

        def apply_remote(update: bytes) -> bool:
            # Timed on the applying thread, the moment the update is durable here.
            changed = original(update)
            if (
                changed
                and self.watch_key is not None
                and self.arrived is None
                and self.watch_key in self.store
            ):
                self.arrived = time.perf_counter()
                self.on_arrival()
            return changed

        self.store.apply_remote = apply_remote
        self.server = await websockets.serve(self._accept, "127.0.0.1", 0, compression=None, max_size=2**21)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"ws://127.0.0.1:{port}/p2p"
        self.mesh = Mesh(
            Identity.generate(),
            SECRET,
            name=self.name,
            version="bench",
            listen_host="127.0.0.1",
            listen_port=port,
            settings=self.settings,
        )
        self.sync = MemorySync(self.store, self.mesh, interval=600.0)
        self.sync.start()
        await self.mesh.start()
        return self

    async def _accept(self, ws) -> None:
        await self.mesh.accept(WebsocketsTransport(ws, self.mesh.stats))

    async def stop(self) -> None:
        await self.sync.stop(flush_secs=0)
        await self.mesh.stop()
        self.server.close()
        await self.server.wait_closed()
        self.store.close()

    def wire_bytes(self) -> int:
        return self.mesh.stats["bytes_out"]


def ring_with_chords(n: int) -> list[tuple[int, int]]:
    edges = {tuple(sorted((i, (i + 1) % n))) for i in range(n)} if n > 2 else {(0, 1)}
    if n >= 6:
        edges |= {tuple(sorted((i, (i + n // 2) % n))) for i in range(n)}
    return sorted(edges)


def diameter(n: int, edges: list[tuple[int, int]]) -> int:
    adjacent: dict[int, set[int]] = {i: set() for i in range(n)}
    for a, b in edges:
        adjacent[a].add(b)
        adjacent[b].add(a)
    worst = 0
    for start in range(n):
        depth, queue = {start: 0}, deque([start])
        while queue:
            x = queue.popleft()
            for y in adjacent[x]:
                if y not in depth:
                    depth[y] = depth[x] + 1
                    queue.append(y)
        worst = max(worst, *depth.values())
    return worst


async def wait_until(check, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def start_nodes(directory: Path, n: int, heartbeat: float, tag: str) -> list[BenchNode]:
    nodes = [BenchNode(directory, f"{tag}-{i:02d}", heartbeat) for i in range(n)]
    for node in nodes:
        await node.start()
    return nodes


async def link(nodes: list[BenchNode], edges: list[tuple[int, int]]) -> None:
    for a, b in edges:
        await nodes[a].mesh.connect(nodes[b].url)
    want = {i: set() for i in range(len(nodes))}
    for a, b in edges:
        want[a].add(nodes[b].mesh.node_id)
        want[b].add(nodes[a].mesh.node_id)
    ok = await wait_until(lambda: all(set(nd.mesh.peer_ids()) == want[i] for i, nd in enumerate(nodes)), 30)
    if not ok:
        raise RuntimeError("the topology did not link up")
    # Let the link-up syncs finish so they do not share the first measured write.
    await wait_until(lambda: all(nd.sync.stats["syncs"] >= len(want[i]) for i, nd in enumerate(nodes)), 30)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


class Arrivals:
    """Counts nodes that applied the watched write; `done` is set when all have."""

    def __init__(self, loop: asyncio.AbstractEventLoop, expected: int):
        self.loop, self.left, self.done = loop, expected, asyncio.Event()

    def arrived(self) -> None:  # on a store's applying thread
        self.loop.call_soon_threadsafe(self._one)

    def _one(self) -> None:
        self.left -= 1
        if self.left == 0:
            self.done.set()


# -- convergence ----------------------------------------------------------------------------------------
async def convergence(directory: Path, n: int, writes: int, heartbeat: float) -> dict:
    nodes = await start_nodes(directory, n, heartbeat, f"c{n}")
    try:
        edges = ring_with_chords(n)
        await link(nodes, edges)
        loop = asyncio.get_running_loop()
        acks, times, missed = [], [], 0
        for k in range(writes):
            key = f"conv/{k:04d}"
            waiter = Arrivals(loop, n - 1)
            for node in nodes[1:]:
                node.watch_key, node.arrived, node.on_arrival = key, None, waiter.arrived
            started = time.perf_counter()
            await asyncio.to_thread(nodes[0].store.set, key, {"k": k, "pad": "x" * 40})
            acks.append((time.perf_counter() - started) * 1000)
            try:
                await asyncio.wait_for(waiter.done.wait(), CONVERGE_TIMEOUT)
                times.append((max(nd.arrived for nd in nodes[1:]) - started) * 1000)
            except TimeoutError:
                missed += 1
            for node in nodes[1:]:
                node.watch_key = None
            await asyncio.sleep(0.03)  # replies and duplicate pushes settle before the next write
        return {
            "nodes": n,
            "links": len(edges),
            "hops": diameter(n, edges),
            "writes": writes,
            "converged": len(times),
            "missed": missed,
            "ack_p50_ms": statistics.median(acks),
            "p50_ms": statistics.median(times) if times else None,
            "p99_ms": percentile(times, 99) if times else None,
            "max_ms": max(times) if times else None,
        }
    finally:
        for node in nodes:
            await node.stop()


# -- bytes per small update ---------------------------------------------------------------------------------
async def update_bytes(directory: Path, keys: int, updates: int) -> dict:
    # Slow heartbeats: no pings or status frames inside the measured windows.
    a, b = await start_nodes(directory, 2, 60.0, "bytes")
    try:

        def fill() -> None:
            for i in range(keys):
                a.store.set(f"key/{i:05d}", {"i": i, "text": f"value number {i} " + "x" * 60})

        await asyncio.to_thread(fill)
        full_size = len(a.store.full_update())
        before = a.wire_bytes() + b.wire_bytes()
        await link([a, b], [(0, 1)])
        ok = await wait_until(lambda: len(b.store) == keys, 60)
        initial_sync = a.wire_bytes() + b.wire_bytes() - before

        received: list[int] = []

        async def naive(ctx, payload):
            received.append(len(payload))  # what a full-state sender would make the peer take in

        b.mesh.register_handler("bench.naive", naive)
        inc_wire, inc_payload, naive_wire, naive_payload = 0, 0, 0, 0
        for k in range(updates):
            key = f"key/{(k * 37) % keys:05d}"
            new = {"i": k, "text": f"updated {k}"}
            before = a.wire_bytes() + b.wire_bytes()
            update = await asyncio.to_thread(a.store.set, key, new)
            ok &= await wait_until(lambda key=key, new=new: b.store.get(key) == new, 10)
            await wait_until(lambda: a.sync.state()["queued"] == 0, 5)
            await asyncio.sleep(0.01)  # the reply to the push
            inc_wire += a.wire_bytes() + b.wire_bytes() - before
            inc_payload += len(update)

            state = await asyncio.to_thread(a.store.full_update)
            before = a.wire_bytes() + b.wire_bytes()
            await a.mesh.request(b.mesh.node_id, "bench.naive", state)
            naive_wire += a.wire_bytes() + b.wire_bytes() - before
            naive_payload += len(state)
        return {
            "keys": keys,
            "updates": updates,
            "complete": bool(ok),
            "full_state_bytes": full_size,
            "initial_sync_wire_bytes": initial_sync,
            "incremental_payload": inc_payload / updates,
            "incremental_wire": inc_wire / updates,
            "naive_payload": naive_payload / updates,
            "naive_wire": naive_wire / updates,
        }
    finally:
        await a.stop()
        await b.stop()


# -- sustained durable writes -------------------------------------------------------------------------------
async def serve_peer(directory: Path, name: str) -> None:
    """A peer in a process of its own (so it does not share the writer's interpreter lock), until stdin closes."""
    node = await BenchNode(directory, name, 5.0).start()

    async def get(ctx, key):
        return node.store.get(key) if key in node.store else None

    node.mesh.register_handler("bench.get", get)
    print(json.dumps({"url": node.url}), flush=True)
    try:
        await asyncio.to_thread(sys.stdin.read)
    finally:
        await node.stop()


async def sustained_writes(directory: Path, peers: int, seconds: float) -> dict:
    (writer,) = await start_nodes(directory, 1, 5.0, f"w{peers}")
    children = [
        subprocess.Popen(
            [sys.executable, __file__, "--serve-peer", str(directory), f"w{peers}-peer{i}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PB_BENCH_SECRET": SECRET},
        )
        for i in range(peers)
    ]
    try:
        peer_ids = []
        for child in children:
            line = await asyncio.to_thread(child.stdout.readline)
            link = await writer.mesh.connect(json.loads(line)["url"])
            peer_ids.append(link.peer_id)
        await wait_until(lambda: writer.sync.stats["syncs"] >= peers, 30)
        latencies: list[float] = []

        def loop() -> int:
            deadline = time.perf_counter() + seconds
            i = 0
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                writer.store.set(f"w/{i % 1000:04d}", {"i": i, "pad": "y" * 40})
                latencies.append((time.perf_counter() - started) * 1000)
                i += 1
            return i

        pushes_before = writer.sync.stats["pushes_sent"]
        started = time.perf_counter()
        count = await asyncio.to_thread(loop)
        elapsed = time.perf_counter() - started
        last = {"i": count - 1, "pad": "y" * 40}
        key = f"w/{(count - 1) % 1000:04d}"
        caught_up = True
        deadline = time.monotonic() + 60
        for peer in peer_ids:
            while await writer.mesh.request(peer, "bench.get", key) != last:
                if time.monotonic() > deadline:
                    caught_up = False
                    break
                await asyncio.sleep(0.005)
        lag = time.perf_counter() - started - elapsed
        pushes = writer.sync.stats["pushes_sent"] - pushes_before
        return {
            "peers": peers,
            "writes": count,
            "seconds": elapsed,
            "writes_per_sec": count / elapsed,
            "p50_ms": statistics.median(latencies),
            "p99_ms": percentile(latencies, 99),
            "pushes": pushes,
            "writes_per_push": count * peers / pushes if pushes else None,
            "peer_lag_ms": lag * 1000 if peers else None,
            "complete": caught_up,
        }
    finally:
        await writer.stop()
        for child in children:
            child.stdin.close()
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()


# -- output ---------------------------------------------------------------------------------------------------
def render(result: dict) -> str:
    lines = ["convergence of one write (ms from the call on node 0 until the last node has applied it)"]
    lines.append(
        f"{'nodes':>5} {'links':>5} {'hops':>4} {'writes':>6} {'ack p50':>8} {'p50':>8} {'p99':>8} "
        f"{'max':>8} {'p50/hop':>8}"
    )
    for r in result["convergence"]:
        flag = f"  ({r['missed']} did not converge in {CONVERGE_TIMEOUT:g}s)" if r["missed"] else ""
        if r["p50_ms"] is None:
            lines.append(f"{r['nodes']:>5} {r['links']:>5} {r['hops']:>4} {r['writes']:>6}{flag}")
            continue
        lines.append(
            f"{r['nodes']:>5} {r['links']:>5} {r['hops']:>4} {r['writes']:>6} {r['ack_p50_ms']:>8.2f} "
            f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['max_ms']:>8.2f} {r['p50_ms'] / r['hops']:>8.2f}{flag}"
        )
    b = result["bytes"]
    lines += [
        "",
        f"bytes per small update with {b['keys']} keys held (2 nodes, one link, {b['updates']} updates)",
        f"{'approach':<22} {'payload B':>10} {'wire B':>10} {'vs incremental':>15}",
        f"{'incremental (ours)':<22} {b['incremental_payload']:>10.0f} {b['incremental_wire']:>10.0f} {1:>14.2f}x",
        f"{'full state (naive)':<22} {b['naive_payload']:>10.0f} {b['naive_wire']:>10.0f} "
        f"{b['naive_wire'] / b['incremental_wire']:>14.1f}x",
        f"initial sync of the {b['keys']} keys to an empty peer: {b['initial_sync_wire_bytes']} B on the wire "
        f"(full state {b['full_state_bytes']} B)" + ("" if b["complete"] else "  (INCOMPLETE)"),
        "",
        f"sustained durable writes on one node (store.set, WAL, synchronous=FULL; {result['filesystem']})",
        f"{'peers':>5} {'writes':>7} {'writes/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'pushes':>7} "
        f"{'writes/push':>11} {'peer lag ms':>11} {'vs alone':>8}",
    ]
    alone = result["writes"][0]["writes_per_sec"]
    for w in result["writes"]:
        per_push = f"{w['writes_per_push']:.1f}" if w["writes_per_push"] else "-"
        lag = f"{w['peer_lag_ms']:.0f}" if w["peer_lag_ms"] is not None else "-"
        flag = "" if w["complete"] else "  (peers did not catch up)"
        lines.append(
            f"{w['peers']:>5} {w['writes']:>7} {w['writes_per_sec']:>9.0f} {w['p50_ms']:>7.2f} {w['p99_ms']:>7.2f} "
            f"{w['pushes']:>7} {per_push:>11} {lag:>11} {w['writes_per_sec'] / alone:>7.2f}x{flag}"
        )
    return "\n".join(lines)


def filesystem(path: Path) -> str:
    try:
        out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True, timeout=5).stdout
        return f"{out.splitlines()[1].split()[1]} at {path}"
    except (OSError, IndexError, subprocess.SubprocessError):
        return str(path)


async def bench(args, directory: Path) -> dict:
    result: dict = {"filesystem": filesystem(directory), "convergence": [], "writes": []}
    for n in args.sizes:
        result["convergence"].append(await convergence(directory, n, args.writes, args.heartbeat))
    result["bytes"] = await update_bytes(directory, args.keys, args.updates)
    for peers in (0, 1, 2):
        result["writes"].append(await sustained_writes(directory, peers, args.write_seconds))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[3, 10, 30],
        help="node counts for the convergence runs",
    )
    parser.add_argument("--writes", type=int, default=30, help="timed writes per node count")
    parser.add_argument("--keys", type=int, default=1000, help="keys held during the bytes comparison")
    parser.add_argument("--updates", type=int, default=50, help="small updates in the bytes comparison")
    parser.add_argument("--write-seconds", type=float, default=5.0, help="length of each writes/s run")
    parser.add_argument("--heartbeat", type=float, default=2.0, help="mesh heartbeat in the convergence runs")
    parser.add_argument("--dir", type=Path, default=None, help="where the stores go (default: a temp folder)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--serve-peer", nargs=2, metavar=("DIR", "NAME"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_peer:
        asyncio.run(serve_peer(Path(args.serve_peer[0]), args.serve_peer[1]))
        return 0
    if min(args.sizes) < 2 or args.writes < 1 or args.keys < 1 or args.updates < 1:
        parser.error("sizes must be at least 2 and counts at least 1")
    directory = Path(tempfile.mkdtemp(prefix="pb-memory-bench-", dir=args.dir))
    try:
        result = asyncio.run(bench(args, directory))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(json.dumps(result, indent=2) if args.json else render(result))
    ok = all(r["missed"] == 0 for r in result["convergence"]) and result["bytes"]["complete"]
    ok &= all(w["complete"] for w in result["writes"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
