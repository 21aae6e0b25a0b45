"""The private mesh over real WebSockets on 127.0.0.1.

In-process meshes (the test's own event loop) cover the RPC layer, flow control, dead peers and the link
rules; real node processes cover static peers, peer exchange, a wrong secret and dead-peer detection; a
relay in the test process sits between an in-process mesh and a real node to tamper with and replay frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import websockets

from nodes import RunningNode, free_port, node_env, strong_secret, wait_until_up, write_node_config
from pinkybrain.node.core.channel import HEADER
from pinkybrain.node.core.identity import Identity
from pinkybrain.node.services.mesh import (
    DialError,
    Mesh,
    MeshSettings,
    MessageTooLarge,
    PeerGone,
    PeerNotConnected,
    RemoteError,
    RpcError,
    RpcTimeout,
    normalize_peer_url,
)
from pinkybrain.node.services.peer_link import WebsocketsTransport

FAST = {"p2p.heartbeat_secs": 0.5, "p2p.dead_after_secs": 2.0}
SECRET = strong_secret()


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def eventually(check, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


class Node:
    """An in-process mesh with its own WebSocket server, as a node's /p2p endpoint would serve it."""

    def __init__(
        self,
        name: str,
        secret: str = SECRET,
        *,
        stealth: bool = False,
        host: str = "127.0.0.1",
        port: int | None = None,
        mesh_options: dict | None = None,
        **settings,
    ):
        defaults = {"heartbeat_secs": 0.2, "dead_after_secs": 1.0, "reconnect_base_secs": 0.1}
        self.settings = MeshSettings(**{**defaults, **settings})
        self.name, self.secret, self.stealth = name, secret, stealth
        self.host, self.port, self.mesh_options = host, port or free_port(host), mesh_options or {}
        self.mesh: Mesh | None = None

    async def __aenter__(self) -> Node:
        self.mesh = Mesh(
            Identity.generate(),
            self.secret,
            name=self.name,
            version="test",
            listen_host=self.host,
            listen_port=self.port,
            stealth=self.stealth,
            settings=self.settings,
            **self.mesh_options,
        )

        async def handler(ws):
            await self.mesh.accept(WebsocketsTransport(ws, self.mesh.stats))

        self.server = await websockets.serve(handler, self.host, self.port, compression=None, max_size=2**21)
        await self.mesh.start()
        self.url = f"ws://{self.host}:{self.port}/p2p"
        return self

    async def __aexit__(self, *exc) -> None:
        await self.mesh.stop()
        self.server.close()
        await self.server.wait_closed()

    @property
    def id(self) -> str:
        return self.mesh.node_id


# -- in-process: the RPC layer ----------------------------------------------------------------------
def test_rpc_unary_stream_binary_and_errors():
    async def scenario():
        async with Node("a") as a, Node("b") as b:

            async def count(ctx, n):
                for i in range(n):
                    yield {"i": i, "caller": ctx.peer_id}

            async def refuse(ctx, payload):
                raise RpcError("not_allowed", "no thanks")

            async def broken(ctx, payload):
                raise ValueError("a secret prompt that must not be logged")

            b.mesh.register_handler("count", count)
            b.mesh.register_handler("refuse", refuse)
            b.mesh.register_handler("broken", broken)
            await a.mesh.connect(b.url)
            assert await a.mesh.request(b.id, "mesh.echo", {"x": [1, 2]}) == {"x": [1, 2]}
            assert await a.mesh.request(b.id, "mesh.echo", b"\x00\xffraw") == b"\x00\xffraw"
            info = await a.mesh.request(b.id, "mesh.info")
            assert info["node_id"] == b.id and info["name"] == "b"
            chunks = await a.mesh.request(b.id, "count", 500)
            assert [c["i"] for c in chunks] == list(range(500)) and chunks[0]["caller"] == a.id
            async with a.mesh.stream(b.id, "count", 3) as stream:
                assert [c["i"] async for c in stream] == [0, 1, 2]
            async with a.mesh.stream(b.id, "mesh.echo", "once") as stream:
                assert [c async for c in stream] == ["once"]
            with pytest.raises(RemoteError) as info:
                await a.mesh.request(b.id, "nope")
            assert info.value.code == "unknown_method"
            with pytest.raises(RemoteError) as info:
                await a.mesh.request(b.id, "refuse")
            assert (info.value.code, info.value.message) == ("not_allowed", "no thanks")
            with pytest.raises(RemoteError) as info:
                await a.mesh.request(b.id, "broken")
            assert info.value.code == "internal"
            with pytest.raises(MessageTooLarge):
                await a.mesh.request(b.id, "mesh.echo", b"x" * (2 * 1024 * 1024))
            with pytest.raises(PeerNotConnected):
                await a.mesh.request(Identity.generate().node_id, "mesh.echo")
            # None of that hurt the link.
            assert await a.mesh.request(b.id, "mesh.echo", 7) == 7
            assert a.mesh.state()["links_opened"] == 1

    run(scenario())


def test_small_messages_are_batched_under_load_and_arrive_in_order():
    from pinkybrain.node.services.peer_link import decode_message, encode_batch, encode_message, split_batch

    parts = [encode_message({"t": "x", "n": i}, b"b" * i) for i in range(5)]
    head, body = decode_message(encode_batch(parts))
    assert head == {"t": "batch"} and [bytes(p) for p in split_batch(body)] == parts
    assert [decode_message(p) for p in split_batch(body)][3] == ({"t": "x", "n": 3}, b"bbb")
    with pytest.raises(ValueError):
        split_batch((100).to_bytes(4, "big") + b"short")

    async def scenario():
        async with Node("a") as a, Node("b") as b:
            got: list[int] = []

            async def sink(ctx, n):
                got.append(n)
                return None

            b.mesh.register_handler("sink", sink)
            link = await a.mesh.connect(b.url)
            assert link.batches  # both ends announced the feature
            frames0 = link.counters["frames_out"]
            # Requests queued at once (rounds under the peer's in-flight limit): the writer packs what
            # is waiting into shared frames.
            for round_ in range(10):
                await asyncio.gather(*(a.mesh.request(b.id, "sink", round_ * 20 + i) for i in range(20)))
            assert got == list(range(200))
            assert link.counters["frames_out"] - frames0 < 100
            # An idle link still answers at once, one message per frame.
            assert await a.mesh.request(b.id, "mesh.echo", "alone") == "alone"

    run(scenario())


def test_enqueued_messages_are_done_once_sent_and_fail_when_the_link_closes():
    async def scenario():
        async with Node("a") as a, Node("b") as b:
            link = await a.mesh.connect(b.url)
            frames0 = link.counters["frames_out"]
            # A producer that pipelines: futures, not a task per message; small ones share frames.
            sent = [link.enqueue({"t": "ping", "n": 10_000 + i}) for i in range(100)]
            await asyncio.wait_for(asyncio.gather(*sent), 10)
            assert link.counters["frames_out"] - frames0 < 100
            await eventually(lambda: b.mesh._links[a.id].counters["frames_in"] >= link.counters["frames_out"])
            # Queued behind a large message when the link closes: each one is sent or fails with PeerGone.
            pending = [link.enqueue({"t": "bulk", "b": 1}, b"x" * 512 * 1024) for _ in range(8)]
            link.close("test over")
            outcomes = await asyncio.gather(*pending, return_exceptions=True)
            assert all(o is None or isinstance(o, PeerGone) for o in outcomes)
            assert any(isinstance(o, PeerGone) for o in outcomes)
            with pytest.raises(PeerGone):
                link.enqueue({"t": "ping", "n": 1})

    run(scenario())


def test_a_batch_inside_a_batch_is_dropped_as_malformed():
    from pinkybrain.node.services.peer_link import encode_batch, encode_message

    async def scenario():
        async with Node("a") as a, Node("b") as b:
            link = await a.mesh.connect(b.url)
            inner = encode_batch([encode_message({"t": "ping", "n": 1})])
            await link.transport.send(link.channel.seal(encode_batch([inner])))
            await eventually(lambda: b.mesh.rejected["malformed"] >= 1)
            assert await a.mesh.request(b.id, "mesh.echo", 1) == 1  # the link carries on

    run(scenario())


def test_timeout_cancellation_and_early_exit_stop_the_remote_handler():
    async def scenario():
        async with Node("a") as a, Node("b") as b:
            stopped: list[str] = []

            async def forever(ctx, tag):
                try:
                    await asyncio.sleep(3600)
                finally:
                    stopped.append(tag)

            async def endless(ctx, tag):
                try:
                    i = 0
                    while True:
                        yield i
                        i += 1
                finally:
                    stopped.append(tag)

            b.mesh.register_handler("forever", forever)
            b.mesh.register_handler("endless", endless)
            await a.mesh.connect(b.url)
            started = time.monotonic()
            with pytest.raises(RpcTimeout):
                await a.mesh.request(b.id, "forever", "timeout", timeout=0.3)
            assert time.monotonic() - started < 2
            await eventually(lambda: "timeout" in stopped)

            task = asyncio.create_task(a.mesh.request(b.id, "forever", "cancelled"))
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await eventually(lambda: "cancelled" in stopped)

            async with a.mesh.stream(b.id, "endless", "early exit") as stream:
                async for i in stream:
                    if i == 10:
                        break
            await eventually(lambda: "early exit" in stopped)
            assert await a.mesh.request(b.id, "mesh.echo", "still fine") == "still fine"

    run(scenario())


def test_stream_flow_control_bounds_what_runs_ahead_of_a_slow_reader():
    async def scenario():
        async with Node("a") as a, Node("b") as b:
            produced = []

            async def numbers(ctx, n):
                for i in range(n):
                    produced.append(i)
                    yield i

            b.mesh.register_handler("numbers", numbers)
            await a.mesh.connect(b.url)
            got = []
            async with a.mesh.stream(b.id, "numbers", 100, window=8) as stream:
                async for i in stream:
                    got.append(i)
                    await asyncio.sleep(0.01)
                    assert len(produced) - len(got) <= 8 + 1, "the producer ran past the granted window"
            assert got == list(range(100))

    run(scenario())


def test_peer_dying_mid_request_raises_peer_gone_promptly():
    async def scenario():
        async with Node("a") as a, Node("b") as b:

            async def slow(ctx, payload):
                await asyncio.sleep(3600)

            b.mesh.register_handler("slow", slow)
            await a.mesh.connect(b.url)
            task = asyncio.create_task(a.mesh.request(b.id, "slow", timeout=60))
            await asyncio.sleep(0.2)
            # The peer's process dies: its socket is torn down without a goodbye.
            b.mesh._links[a.id].transport.ws.transport.abort()
            started = time.monotonic()
            with pytest.raises(PeerGone):
                await task
            assert time.monotonic() - started < 1.5
            assert not a.mesh.connected(b.id)

    run(scenario())


def test_silent_peer_is_declared_dead_within_the_heartbeat_bound():
    async def scenario():
        async with Node("a") as a, Node("b") as b, Relay(b.url) as relay:

            async def slow(ctx, payload):
                await asyncio.sleep(3600)

            b.mesh.register_handler("slow", slow)
            await a.mesh.connect(relay.url)
            task = asyncio.create_task(a.mesh.request(b.id, "slow", timeout=60))
            await asyncio.sleep(0.1)
            relay.blackhole = True  # a network partition: nothing arrives, nothing is closed
            started = time.monotonic()
            with pytest.raises(PeerGone) as info:
                await task
            elapsed = time.monotonic() - started
            assert "heartbeat timeout" in str(info.value)
            assert elapsed < a.settings.dead_after_secs + 2 * a.settings.heartbeat_secs + 0.5

    run(scenario())


def test_simultaneous_dials_leave_exactly_one_link():
    async def scenario():
        async with Node("a") as a, Node("b") as b:
            results = await asyncio.gather(
                a.mesh.connect(b.url), b.mesh.connect(a.url), return_exceptions=True
            )
            await asyncio.sleep(0.5)
            assert a.mesh.peer_ids() == [b.id] and b.mesh.peer_ids() == [a.id]
            kept_a, kept_b = a.mesh._links[b.id], b.mesh._links[a.id]
            assert kept_a.initiator_id == kept_b.initiator_id == min(a.id, b.id)
            assert {kept_a.direction, kept_b.direction} == {"inbound", "outbound"}
            assert sum(not isinstance(r, Exception) for r in results) >= 1
            assert await a.mesh.request(b.id, "mesh.echo", 1) == 1

    run(scenario())


def test_peer_exchange_static_reconnect_and_stealth():
    async def scenario():
        async with Node("a") as a, Node("b") as b, Node("c") as c, Node("s", stealth=True) as s:
            a.mesh.add_peer(b.url)
            b.mesh.add_peer(c.url)
            s.mesh.add_peer(b.url)
            await eventually(lambda: a.mesh.connected(c.id) and c.mesh.connected(a.id))
            # The stealth node may dial out (it learns a and c from b), but nobody learns its address.
            await eventually(lambda: b.mesh.connected(s.id))
            await asyncio.sleep(0.5)
            view = {p["node_id"]: p for p in b.mesh.peers()}
            assert view[s.id]["address"] is None and view[s.id]["url"] is None and view[s.id]["stealth"]
            assert view[a.id]["address"].startswith("127.0.0.1:")
            for node in (a, b, c):
                assert all(e["id"] != s.id for e in node.mesh._pex_entries(exclude="nobody"))
                assert all(t.node_id != s.id and t.url != s.url for t in node.mesh._targets.values())
                assert all(p["address"] is None for p in node.mesh.peers() if p["node_id"] == s.id)
            # A static peer that goes away is redialled (with backoff) when it comes back.
            b.mesh._links[c.id].transport.ws.transport.abort()
            await eventually(lambda: not b.mesh.connected(c.id), timeout=3)
            await eventually(lambda: b.mesh.connected(c.id), timeout=10)

    run(scenario())


def test_wrong_secret_and_rate_limit_in_process(caplog):
    async def scenario():
        async with (
            Node("a") as a,
            Node("d", secret=strong_secret()) as d,
            Node("slow", rate_frames_per_sec=20) as limited,
        ):
            with pytest.raises(DialError) as info:
                await d.mesh.connect(a.url)
            assert "refused the handshake" in str(info.value) and "network secret" in str(info.value)
            assert a.mesh.state()["handshakes_failed"] == 1 and not a.mesh.peers() and not d.mesh.peers()

            link = await a.mesh.connect(limited.url)
            await eventually(lambda: limited.mesh.connected(a.id))
            for _ in range(2000):  # a flood far over 20 frames/s (bypassing our own pacing)
                frame = link.channel.seal(b"\x00\x00\x00\x0c" + b'{"t":"ping"}')
                with contextlib.suppress(Exception):
                    await link.transport.send(frame)
                if link.closing:
                    break
            await eventually(lambda: not limited.mesh.connected(a.id), timeout=5)
            assert limited.mesh.rejected["rate_limited"] > 0

    with caplog.at_level("INFO", logger="pinkybrain.mesh"):
        run(scenario())
    text = caplog.text
    assert "refused inbound link from 127.0.0.1" in text and "wrong network secret" in text
    assert "rate limit" in text


def test_mdns_and_tailscale_finds_are_dialled(monkeypatch):
    from pinkybrain.node.services import discovery

    async def scenario():
        # b listens on another loopback address, on the port a uses: as Tailscale peers are probed.
        async with Node("b", host="127.0.0.2") as b, Node("m") as m:
            found = [{"url": m.url.replace("ws://", "http://").removesuffix("/p2p"), "node_id": m.id}]
            monkeypatch.setattr(
                discovery,
                "tailscale_peers",
                lambda: {"available": True, "peers": [{"addresses": ["127.0.0.2"], "online": True}]},
            )
            options = {"discovery_provider": lambda: found, "tailscale": True}
            async with Node("a", port=b.port, mesh_options=options, discovery_secs=0.1) as a:
                await eventually(lambda: a.mesh.connected(b.id) and a.mesh.connected(m.id))
                sources = {t.node_id: t.source for t in a.mesh._targets.values()}
                assert sources == {b.id: "tailscale", m.id: "mdns"}

    run(scenario())


def test_backoff_is_capped_and_jittered():
    mesh = Mesh(
        Identity.generate(),
        SECRET,
        name="x",
        version="t",
        listen_host="127.0.0.1",
        listen_port=1,
        settings=MeshSettings(reconnect_base_secs=1, reconnect_max_secs=60),
    )
    for failures, top in ((1, 1), (2, 2), (3, 4), (7, 60), (50, 60)):
        delays = [mesh._backoff(failures) for _ in range(50)]
        assert all(top / 2 <= d <= top for d in delays)
        assert len(set(delays)) > 1


@pytest.mark.parametrize(
    "text, url",
    [
        ("127.0.0.1:9000", "ws://127.0.0.1:9000/p2p"),
        ("http://node.lan:8081", "ws://node.lan:8081/p2p"),
        ("https://node.example", "wss://node.example:8080/p2p"),
        ("ws://10.0.0.2:8080/p2p", "ws://10.0.0.2:8080/p2p"),
        ("node", "ws://node:8080/p2p"),
        ("http://[fe80::1]:9000", "ws://[fe80::1]:9000/p2p"),
    ],
)
def test_peer_urls_are_normalised(text, url):
    assert normalize_peer_url(text) == url


@pytest.mark.parametrize("text", ["", "ftp://x:1", "http://:80", "http://h:99999"])
def test_bad_peer_urls_are_refused(text):
    with pytest.raises(ValueError):
        normalize_peer_url(text)


# -- a man in the middle ----------------------------------------------------------------------------
class Relay:
    """Forwards one WebSocket link both ways and lets a test tamper with, replay or swallow messages."""

    def __init__(self, target_url: str):
        self.target_url = target_url
        self.a_to_b: list[bytes] = []
        self.b_to_a: list[bytes] = []
        self.blackhole = False
        self.tamper_next = {"a_to_b": False, "b_to_a": False}
        self.connected = asyncio.Event()

    async def __aenter__(self) -> Relay:
        self.server = await websockets.serve(self._handle, "127.0.0.1", 0, compression=None, max_size=None)
        self.url = f"ws://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/p2p"
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, client) -> None:
        upstream = await websockets.connect(self.target_url, compression=None, max_size=None, proxy=None)
        self.client, self.upstream = client, upstream
        self.connected.set()

        async def pump(src, dst, log, direction):
            async for message in src:
                log.append(message)
                if self.blackhole:
                    continue
                if self.tamper_next[direction] and len(log) > 3:  # past the handshake
                    self.tamper_next[direction] = False
                    message = _flip_last(message)
                await dst.send(message)
            await dst.close()

        await asyncio.gather(
            pump(client, upstream, self.a_to_b, "a_to_b"),
            pump(upstream, client, self.b_to_a, "b_to_a"),
            return_exceptions=True,
        )

    async def inject_to_b(self, data: bytes) -> None:
        await self.upstream.send(data)

    async def inject_to_a(self, data: bytes) -> None:
        await self.client.send(data)


def _flip_last(frame: bytes) -> bytes:
    return frame[:-1] + bytes([frame[-1] ^ 0x80])


def _forge_ahead(frame: bytes) -> bytes:
    """A copy of a genuine frame claiming a counter far ahead: only the key could make it authentic."""
    version, kind, counter = HEADER.unpack_from(frame)
    return HEADER.pack(version, kind, counter + 10_000) + frame[HEADER.size :]


def test_tampered_and_replayed_frames_are_rejected_and_the_link_carries_on(node_factory):
    real = node_factory(extra=FAST)

    async def scenario():
        async with Node("mitm-victim", real.secret, heartbeat_secs=0.5, dead_after_secs=2.0) as a:
            async with Relay(f"ws://{real.host}:{real.port}/p2p") as relay:
                link = await a.mesh.connect(relay.url)
                b_id = link.peer_id
                assert await a.mesh.request(b_id, "mesh.echo", "before") == "before"
                before = await asyncio.to_thread(lambda: real.get("/api/peers").json()["peers"])
                assert [p["node_id"] for p in before] == [a.id]

                await eventually(lambda: len(relay.a_to_b) >= 6 and len(relay.b_to_a) >= 5)
                # Towards the node: a forged frame, an old genuine frame replayed, a genuine frame altered
                # in flight. And the same towards us.
                await relay.inject_to_b(_forge_ahead(relay.a_to_b[-1]))
                await relay.inject_to_b(relay.a_to_b[3])
                await relay.inject_to_a(_forge_ahead(relay.b_to_a[-1]))
                await relay.inject_to_a(relay.b_to_a[3])
                relay.tamper_next.update(a_to_b=True, b_to_a=True)
                await eventually(lambda: not any(relay.tamper_next.values()), timeout=5)
                await eventually(lambda: a.mesh.rejected["auth"] >= 2 and a.mesh.rejected["replay"] >= 1)

                # Later traffic is unaffected: RPCs answer, heartbeats go on, it is still the same link.
                for i in range(5):
                    payload = {"zebra-payload-marker": i}
                    assert await a.mesh.request(b_id, "mesh.echo", payload) == payload
                pings_before = link.counters["frames_in"]
                await asyncio.sleep(1.5)
                assert link.counters["frames_in"] > pings_before and not link.closing

                status = await asyncio.to_thread(lambda: real.get("/api/status").json())
                rejected = status["mesh"]["private"]["frames_rejected"]
                assert rejected["auth"] >= 2 and rejected["replay"] >= 1, rejected
                after = await asyncio.to_thread(lambda: real.get("/api/peers").json()["peers"])
                assert [p["node_id"] for p in after] == [a.id]
                assert after[0]["connected_since"] == before[0]["connected_since"]
                assert after[0]["latency_ms"] is not None

    run(scenario())
    log = real.log()
    assert "frame failed authentication" in log and "stale frame counter" in log
    assert "Traceback" not in log
    assert "zebra-payload-marker" not in log  # payloads never reach the log


# -- real node processes ----------------------------------------------------------------------------
def peer_ids(node: RunningNode) -> set[str]:
    return {p["node_id"] for p in node.get("/api/peers").json()["peers"]}


def node_id(node: RunningNode) -> str:
    return node.get("/api/ping").json()["node_id"]


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def serve_with_args(home: Path, *, port: int, secret: str, extra: dict, args: list[str]) -> RunningNode:
    """A node started as a user would, with extra `serve` options."""
    config_path = write_node_config(home, host="127.0.0.1", port=port, secret=secret, extra=extra)
    env, log_path = node_env(home), home / "test-node.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pinkybrain.node", "serve", "--config", str(config_path), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(home),
        )
    node = RunningNode(home, "127.0.0.1", port, secret, config_path, proc, env, log_path)
    try:
        wait_until_up(node)
    except RuntimeError:
        node.stop()
        raise
    return node


def test_three_nodes_link_by_static_peers_and_exchange_then_drop_a_dead_one(node_factory, tmp_path):
    secret = strong_secret()
    ports = [free_port() for _ in range(3)]
    url = [f"http://127.0.0.1:{p}" for p in ports]
    c = node_factory(port=ports[2], secret=secret, extra=FAST)
    b = node_factory(port=ports[1], secret=secret, extra={**FAST, "p2p.peers": [url[2]]})  # from the config
    a = serve_with_args(tmp_path / "a", port=ports[0], secret=secret, extra=FAST, args=["--peer", url[1]])
    try:
        three_nodes(a, b, c, ports)
    finally:
        a.stop()


def three_nodes(a: RunningNode, b: RunningNode, c: RunningNode, ports: list[int]) -> None:
    ids = {name: node_id(n) for name, n in (("a", a), ("b", b), ("c", c))}
    assert a.get("/api/status").json()["mesh"]["static_peers"] == [f"ws://127.0.0.1:{ports[1]}/p2p"]

    # a was told only about b; it learns c from b (peer exchange) and links to it.
    wait_for(lambda: peer_ids(a) == {ids["b"], ids["c"]}, 30, "a to link to b and c")
    wait_for(lambda: peer_ids(c) == {ids["a"], ids["b"]}, 10, "c to see a and b")
    peers = {p["node_id"]: p for p in a.get("/api/peers").json()["peers"]}
    assert peers[ids["c"]]["url"] == f"ws://127.0.0.1:{ports[2]}/p2p"
    assert peers[ids["b"]]["direction"] == "outbound"

    def measured():
        peers = a.get("/api/peers").json()["peers"]
        return all(p["latency_ms"] is not None and p["load"]["ram_percent"] is not None for p in peers)

    wait_for(measured, 15, "latency and load of both peers")
    p = a.get("/api/peers").json()["peers"][0]
    assert set(p) >= {"node_id", "name", "address", "latency_ms", "shared_models", "load", "guard"}
    assert p["guard"]["sharing_paused"] is False and p["shared_models"] == []
    mesh = a.get("/api/status").json()["mesh"]["private"]
    assert mesh["peers"] == mesh["links_up"] == 2 and mesh["bytes_in"] > 0 and mesh["bytes_out"] > 0
    assert mesh["links_down"] == 0

    # c dies without a word: a and b drop it within the heartbeat bound, and b keeps redialling it.
    c.stop(signal.SIGKILL)
    started = time.monotonic()
    wait_for(lambda: ids["c"] not in peer_ids(a) and ids["c"] not in peer_ids(b), 10, "c to be dropped")
    assert time.monotonic() - started < FAST["p2p.dead_after_secs"] + 3
    assert peer_ids(a) == {ids["b"]}
    status_b = b.get("/api/status").json()["mesh"]["private"]
    assert status_b["links_down"] == 1 and status_b["dialling"][0]["url"] == f"ws://127.0.0.1:{ports[2]}/p2p"
    for node in (a, b):
        assert "Traceback" not in node.log()


def test_a_node_with_the_wrong_secret_is_refused_on_both_sides(node_factory):
    a = node_factory(extra=FAST)
    d = node_factory(extra={**FAST, "p2p.peers": [a.url]})  # its own, different secret
    wait_for(lambda: "wrong network secret" in a.log(), 15, "a to log the refusal")
    wait_for(lambda: "refused the handshake" in d.log(), 15, "d to log the refusal")
    assert peer_ids(a) == set() and peer_ids(d) == set()
    assert a.get("/api/status").json()["mesh"]["private"]["handshakes_failed"] >= 1
    refusal = next(line for line in a.log().splitlines() if "wrong network secret" in line)
    assert "refused inbound link from 127.0.0.1" in refusal
    for node in (a, d):
        assert node.get("/api/ping").status_code == 200
        assert "Traceback" not in node.log()
