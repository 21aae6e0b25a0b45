"""Peer-link throughput: encrypted frames vs a plain WebSocket, over real loopback sockets, in one run.

Three ways of moving the same messages from one endpoint to another (both in this process, one event loop,
so each mode pays for both ends alike):

  plain    websockets send/recv of the raw message: the baseline
  channel  a Noise handshake, then every message sealed and opened as a channel frame (ChaCha20-Poly1305,
           explicit counter, replay check): the cost of the encryption itself
  link     two full meshes (handshake, message layer, writer queue, heartbeats running): what the node
           actually does per message

and a computed row, `floor`: plain's time per message plus one seal and one open of the message
(ChaCha20-Poly1305, timed in the same run without sockets). A link that seals each message in a frame of
its own cannot beat it in this one-process setup (small messages can, by sharing frames), so it shows how
much of a gap to plain is the cipher's own cost on this CPU and how much is ours.

With --rtt N, round trips instead (what a split's llama.cpp RPC pays per message, node/split/): N
request/response exchanges of a small and a graph-sized message with an echo server on loopback,
on the node's event loop (uvloop where installed):

  tcp      straight to the echo server over loopback TCP: the baseline (plain llama.cpp RPC)
  tunnel   through a loopback listener of one mesh, a tunnel on the encrypted link to a second mesh, and
           that mesh's connection to the echo server (the `split.rpc` path: borrower.py, tunnels.py)

    python bench/link_throughput.py [--small 20000] [--large 2000] [--rounds 3] [--max-seconds 20] [--json]
    python bench/link_throughput.py --rtt 2000 [--rounds 3] [--json]

Exit status 0 when every mode delivered every message, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import time

import websockets

from pinkybrain.node.core.channel import Channel
from pinkybrain.node.core.handshake import Handshake, derive_psk
from pinkybrain.node.core.identity import Identity
from pinkybrain.node.services.mesh import Mesh, MeshSettings
from pinkybrain.node.services.peer_link import WebsocketsTransport, unpack_payload

SIZES = {"small": 100, "large": 64 * 1024}
MAX_WS = 2 * 1024 * 1024


class Receiver:
    """Counts messages until `expected` arrived; the sender's clock stops on `done`."""

    def __init__(self, expected: int):
        self.expected, self.count, self.bytes = expected, 0, 0
        self.done = asyncio.Event()

    def got(self, size: int) -> None:
        self.count += 1
        self.bytes += size
        if self.count >= self.expected:
            self.done.set()


async def run_plain(payload: bytes, count: int, max_seconds: float) -> dict:
    receiver = Receiver(count)

    async def handler(ws):
        async for message in ws:
            receiver.got(len(message))

    async with websockets.serve(handler, "127.0.0.1", 0, compression=None, max_size=MAX_WS) as server:
        port = server.sockets[0].getsockname()[1]
        async with websockets.connect(
            f"ws://127.0.0.1:{port}", compression=None, max_size=MAX_WS, proxy=None
        ) as ws:
            return await _drive(receiver, max_seconds, lambda: ws.send(payload), count)


async def run_channel(payload: bytes, count: int, max_seconds: float) -> dict:
    receiver = Receiver(count)
    psk = derive_psk(secrets.token_urlsafe(32))
    server_id, client_id = Identity.generate(), Identity.generate()

    async def handler(ws):
        hs = Handshake(server_id, psk, initiator=False)
        await ws.send(hs.receive(await ws.recv()))
        hs.receive(await ws.recv())
        channel = Channel(hs.result.send_key, hs.result.recv_key, max_frame=MAX_WS)
        async for frame in ws:
            _, plaintext = channel.open(frame)
            receiver.got(len(plaintext))

    async with websockets.serve(handler, "127.0.0.1", 0, compression=None, max_size=MAX_WS) as server:
        port = server.sockets[0].getsockname()[1]
        async with websockets.connect(
            f"ws://127.0.0.1:{port}", compression=None, max_size=MAX_WS, proxy=None
        ) as ws:
            hs = Handshake(client_id, psk, initiator=True)
            await ws.send(hs.start())
            await ws.send(hs.receive(await ws.recv()))
            channel = Channel(hs.result.send_key, hs.result.recv_key, max_frame=MAX_WS)
            return await _drive(receiver, max_seconds, lambda: ws.send(channel.seal(payload)), count)


async def run_link(payload: bytes, count: int, max_seconds: float) -> dict:
    receiver = Receiver(count)
    # The rate limit is a flood guard, not what is measured here: lift it far out of the way.
    settings = MeshSettings(
        max_frame_bytes=MAX_WS, rate_frames_per_sec=1e9, rate_bytes_per_sec=1e12, heartbeat_secs=1.0
    )
    secret = secrets.token_urlsafe(32)
    meshes = [
        Mesh(
            Identity.generate(),
            secret,
            name=n,
            version="bench",
            listen_host="127.0.0.1",
            listen_port=1,
            settings=settings,
        )
        for n in ("sender", "receiver")
    ]
    sender, target = meshes

    async def handler(ws):
        await target.accept(WebsocketsTransport(ws, target.stats))

    async with websockets.serve(handler, "127.0.0.1", 0, compression=None, max_size=MAX_WS) as server:
        port = server.sockets[0].getsockname()[1]
        for mesh in meshes:
            await mesh.start()
        try:
            link = await sender.connect(f"ws://127.0.0.1:{port}/p2p")
            deadline = time.monotonic() + 5
            while not target.connected(sender.node_id) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            inbound = target._links[sender.node_id]
            dispatch = inbound._dispatch

            def counting(msg, body):
                if msg["t"] == "bench":
                    # As an RPC reply's binary payload reaches its caller: as bytes of its own.
                    receiver.got(len(unpack_payload(msg, body)))
                else:
                    dispatch(msg, body)

            inbound._dispatch = counting
            batch: list = []

            async def send_one():
                # Queue in batches: each message is done once on the wire, and one at a time would measure
                # latency. enqueue() returns that future, so there is no task per message.
                batch.append(link.enqueue({"t": "bench", "b": 1}, payload))
                if len(batch) >= 64:
                    await asyncio.gather(*batch)
                    batch.clear()

            async def flush():
                await asyncio.gather(*batch)
                batch.clear()

            return await _drive(receiver, max_seconds, send_one, count, flush)
        finally:
            for mesh in meshes:
                await mesh.stop()


async def _drive(receiver: Receiver, max_seconds: float, send_one, count: int, flush=None) -> dict:
    started = time.perf_counter()
    cpu_started = time.process_time()
    deadline = time.monotonic() + max_seconds
    sent = 0
    capped = False
    while sent < count:
        await send_one()
        sent += 1
        if sent % 256 == 0 and time.monotonic() > deadline:
            capped = True
            break
    if flush is not None:
        await flush()
    if not capped:
        try:
            await asyncio.wait_for(receiver.done.wait(), max(1.0, deadline - time.monotonic()))
        except TimeoutError:
            capped = True
    elapsed = time.perf_counter() - started
    return {
        "messages": receiver.count,
        "sent": sent,
        "seconds": elapsed,
        "cpu_seconds": time.process_time() - cpu_started,
        "msgs_per_sec": receiver.count / elapsed,
        "mb_per_sec": receiver.bytes / elapsed / 1e6,
        "complete": receiver.count == count,
        "capped": capped,
    }


MODES = {"plain": run_plain, "channel": run_channel, "link": run_link}


def aead_seconds(payload: bytes, count: int) -> float:
    """Seconds per message for one seal and one open on a channel, without sockets: the cipher's floor."""
    key_a, key_b = os.urandom(32), os.urandom(32)
    ours, theirs = Channel(key_a, key_b, max_frame=MAX_WS), Channel(key_b, key_a, max_frame=MAX_WS)
    started = time.perf_counter()
    for _ in range(count):
        theirs.open(ours.seal(payload))
    return (time.perf_counter() - started) / count

RTT_SIZES = {"small": 64, "graph": 24 * 1024}  # a graph_compute message of the default model is ~20-40 KB


async def _echo_server():
    async def echo(reader, writer):
        while data := await reader.read(256 * 1024):
            writer.write(data)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", 0)


async def _ping_pong(port: int, payload: bytes, count: int) -> dict:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    times = []
    cpu_started = time.process_time()
    try:
        for _ in range(count):
            started = time.perf_counter()
            writer.write(payload)
            await reader.readexactly(len(payload))
            times.append(time.perf_counter() - started)
    finally:
        writer.close()
    return {"round_trips": count, "cpu_seconds": time.process_time() - cpu_started,
            "median_us": statistics.median(times) * 1e6,
            "p90_us": sorted(times)[int(len(times) * 0.9)] * 1e6}


async def run_rtt_tcp(payload: bytes, count: int) -> dict:
    server = await _echo_server()
    async with server:
        return await _ping_pong(server.sockets[0].getsockname()[1], payload, count)


async def run_rtt_tunnel(payload: bytes, count: int) -> dict:
    from pinkybrain.node.services.tunnels import pump

    echo = await _echo_server()
    echo_port = echo.sockets[0].getsockname()[1]
    settings = MeshSettings(max_frame_bytes=MAX_WS, rate_frames_per_sec=1e9, rate_bytes_per_sec=1e12)
    secret = secrets.token_urlsafe(32)
    borrower, lender = (Mesh(Identity.generate(), secret, name=n, version="bench", listen_host="127.0.0.1",
                             listen_port=1, settings=settings) for n in ("borrower", "lender"))

    async def connect_echo(ctx, payload):
        return await asyncio.open_connection("127.0.0.1", echo_port)

    lender.register_tunnel("bench.echo", connect_echo)
    pumps: set[asyncio.Task] = set()

    async def joined(reader, writer):  # as SplitSession._joined: each connection gets its own tunnel
        tunnel = await borrower.open_tunnel(lender.node_id, "bench.echo")
        pumps.add(asyncio.current_task())
        await pump(tunnel, reader, writer)

    async def handler(ws):
        await lender.accept(WebsocketsTransport(ws, lender.stats))

    async with echo, websockets.serve(handler, "127.0.0.1", 0, compression=None, max_size=MAX_WS) as server:
        for mesh in (borrower, lender):
            await mesh.start()
        listener = await asyncio.start_server(joined, "127.0.0.1", 0)
        try:
            await borrower.connect(f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/p2p")
            return await _ping_pong(listener.sockets[0].getsockname()[1], payload, count)
        finally:
            listener.close()
            for mesh in (borrower, lender):
                await mesh.stop()


RTT_MODES = {"tcp": run_rtt_tcp, "tunnel": run_rtt_tunnel}


async def bench_rtt(args) -> list[dict]:
    rows = []
    for size_name, size in RTT_SIZES.items():
        payload = os.urandom(size)
        rounds: dict[str, list[dict]] = {m: [] for m in RTT_MODES}
        for _ in range(args.rounds):
            for mode, fn in RTT_MODES.items():  # interleaved, so background noise hits both alike
                rounds[mode].append(await fn(payload, args.rtt))
        base = None
        for mode in RTT_MODES:
            results = rounds[mode]
            median = statistics.median(r["median_us"] for r in results)
            row = {"size": size_name, "bytes": size, "mode": mode,
                   **min(results, key=lambda r: abs(r["median_us"] - median))}
            row["cpu_us_per_rtt"] = row["cpu_seconds"] / row["round_trips"] * 1e6
            base = base or row
            row["ratio"] = row["median_us"] / base["median_us"]
            row["added_us"] = row["median_us"] - base["median_us"]
            rows.append(row)
    return rows


def render_rtt(rows: list[dict]) -> str:
    lines = [f"{'size':>6} {'mode':>7} {'round trips':>11} {'median us':>9} {'p90 us':>8} {'cpu us/rtt':>10} "
             f"{'added us':>8} {'vs tcp':>7}"]
    for r in rows:
        lines.append(f"{r['bytes']:>6} {r['mode']:>7} {r['round_trips']:>11} {r['median_us']:>9.0f} "
                     f"{r['p90_us']:>8.0f} {r['cpu_us_per_rtt']:>10.0f} {r['added_us']:>8.0f} {r['ratio']:>6.2f}x")
    return "\n".join(lines)


async def bench(args) -> list[dict]:
    rows = []
    for size_name, count in (("small", args.small), ("large", args.large)):
        payload = os.urandom(SIZES[size_name])
        rounds: dict[str, list[dict]] = {m: [] for m in MODES}
        floors: list[float] = []
        for _ in range(args.rounds):
            for mode, fn in MODES.items():  # interleaved, so background noise hits every mode alike
                rounds[mode].append(await fn(payload, count, args.max_seconds))
            floors.append(aead_seconds(payload, min(count, 2000)))
        base = None
        for mode in MODES:
            results = rounds[mode]
            median = statistics.median(r["msgs_per_sec"] for r in results)
            pick = min(results, key=lambda r: abs(r["msgs_per_sec"] - median))
            row = {"size": size_name, "bytes": SIZES[size_name], "mode": mode, **pick}
            row["all_complete"] = all(r["complete"] for r in results)
            row["us_per_msg_cpu"] = pick["cpu_seconds"] / max(1, pick["messages"]) * 1e6
            base = base or row
            row["ratio"] = row["msgs_per_sec"] / base["msgs_per_sec"]
            rows.append(row)
        aead = statistics.median(floors)
        rate = 1 / (1 / base["msgs_per_sec"] + aead)
        rows.append({"size": size_name, "bytes": SIZES[size_name], "mode": "floor", "computed": True,
                     "aead_us": aead * 1e6, "msgs_per_sec": rate, "mb_per_sec": rate * SIZES[size_name] / 1e6,
                     "all_complete": True, "capped": False, "ratio": rate / base["msgs_per_sec"]})
    return rows


def render(rows: list[dict]) -> str:
    head = (
        f"{'size':>6} {'mode':>8} {'messages':>9} {'msgs/s':>10} {'MB/s':>9} {'cpu us/msg':>11} "
        f"{'vs plain':>9}"
    )
    lines = [head]
    for r in rows:
        flag = "" if r["all_complete"] else "  (incomplete)"
        flag += "  (time cap hit)" if r["capped"] else ""
        if r.get("computed"):  # the floor: plain's time per message plus the cipher's, not a run
            lines.append(f"{r['bytes']:>6} {r['mode']:>8} {'-':>9} {r['msgs_per_sec']:>10.0f} "
                         f"{r['mb_per_sec']:>9.1f} {'-':>11} {r['ratio']:>8.2f}x  (plain + "
                         f"{r['aead_us']:.1f} us seal+open)")
            continue
        lines.append(
            f"{r['bytes']:>6} {r['mode']:>8} {r['messages']:>9} {r['msgs_per_sec']:>10.0f} "
            f"{r['mb_per_sec']:>9.1f} {r['us_per_msg_cpu']:>11.1f} {r['ratio']:>8.2f}x{flag}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=20000, help="100-byte messages per run")
    parser.add_argument("--large", type=int, default=2000, help="64 KiB messages per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per mode; the median is shown")
    parser.add_argument("--max-seconds", type=float, default=20.0, help="cap per run")
    parser.add_argument("--rtt", type=int, default=0, metavar="N",
                        help="measure N round trips through a tunnel vs plain TCP instead of throughput")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    if args.rtt:
        from pinkybrain.node.server import event_loop_factory

        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:  # the loop the node serves on
            rows = runner.run(bench_rtt(args))
        print(json.dumps(rows, indent=2) if args.json else render_rtt(rows))
        return 0
    rows = asyncio.run(bench(args))
    print(json.dumps(rows, indent=2) if args.json else render(rows))
    return 0 if all(r["all_complete"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
