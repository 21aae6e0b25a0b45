"""CRDT memory converging across peers: real node processes for the network behaviour (line topology,
partition and heal, 1 000 keys, SIGKILL, a hostile peer), in-process meshes for the protocol corners (gaps,
anti-entropy, chunked sync, bad sync answers, private vs public).

Anti-entropy is set to 10 minutes on the real nodes, so what converges there converged by pushes, gossip
and the sync steps at link-up, not by the periodic repair.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pycrdt
import pytest
import websockets
from pycrdt import Doc, Map

from nodes import (
    RunningNode,
    free_port,
    node_env,
    run_cli,
    start_node,
    strong_secret,
    wait_for,
    wait_until_up,
)
from pinkybrain.node.core.identity import Identity
from pinkybrain.node.core.memory_doc import MemoryDoc
from pinkybrain.node.services.memory_store import MemoryStore
from pinkybrain.node.services.memory_sync import MemorySync
from pinkybrain.node.services.mesh import Mesh, MeshSettings, RemoteError
from pinkybrain.node.services.peer_link import WebsocketsTransport

CFG = {
    "p2p.heartbeat_secs": 0.5,
    "p2p.dead_after_secs": 2.0,
    "p2p.peer_exchange": False,  # the topology is exactly what the test links
    "memory.sync_interval_secs": 600.0,
}
MARKER = "zebra-memory-marker"  # must never reach a log


# -- helpers ----------------------------------------------------------------------------------------
def node_id(node: RunningNode) -> str:
    return node.get("/api/ping").json()["node_id"]


def peer_ids(node: RunningNode) -> set[str]:
    return {p["node_id"] for p in node.get("/api/peers").json()["peers"]}


def value(node: RunningNode, key: str):
    r = node.get(f"/api/memory/{key}")
    return r.json()["value"] if r.status_code == 200 else None


def keys(node: RunningNode, prefix: str = "") -> list[str]:
    return node.get("/api/memory", params={"prefix": prefix}).json()["keys"]


def set_value(node: RunningNode, key: str, val) -> None:
    r = node.post("/api/memory/set", json={"key": key, "value": val})
    assert r.status_code == 200, r.text


def delete(node: RunningNode, key: str) -> int:
    with node.client() as client:
        return client.delete(f"/api/memory/{key}").status_code


def memory_state(node: RunningNode) -> dict:
    return node.get("/api/status").json()["mesh"]["memory"]["private"]


def start_all(specs: list[tuple[Path, int, str, dict]]) -> list[RunningNode]:
    """Start nodes side by side (their start-up overlaps) and wait for each."""
    nodes = [
        start_node(home, port=port, secret=secret, extra=extra, wait=False)
        for home, port, secret, extra in specs
    ]
    try:
        for n in nodes:
            wait_until_up(n)
    except Exception:
        for n in nodes:
            n.stop()
        raise
    return nodes


def assert_clean_logs(*nodes: RunningNode) -> None:
    for n in nodes:
        log = n.log()
        assert "Traceback" not in log, log[-3000:]
        assert MARKER not in log


class TcpProxy:
    """A TCP relay on 127.0.0.1, in its own thread: cut() severs every connection and refuses new ones (a
    partition), restore() lets them through again."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.severed = False
        self.writers: set[asyncio.StreamWriter] = set()

    def __enter__(self) -> TcpProxy:
        self.thread.start()
        self.server = self._call(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc) -> None:
        async def shut() -> None:
            self.server.close()
            for w in list(self.writers):
                w.transport.abort()

        self._call(shut())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    async def _handle(self, reader, writer) -> None:
        if self.severed:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        pair = {writer, up_writer}
        self.writers |= pair

        async def pump(src, dst) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self.writers -= pair

    def cut(self) -> None:
        async def sever() -> None:
            self.severed = True
            for w in list(self.writers):
                w.transport.abort()

        self._call(sever())

    def restore(self) -> None:
        async def heal() -> None:
            self.severed = False

        self._call(heal())


# -- real nodes: a line A - B - C --------------------------------------------------------------------
@pytest.fixture(scope="module")
def line(tmp_path_factory):
    base = tmp_path_factory.mktemp("line")
    secret = strong_secret()
    ports = [free_port() for _ in range(3)]
    url = [f"http://127.0.0.1:{p}" for p in ports]
    a, b, c = start_all(
        [
            (base / "a", ports[0], secret, {**CFG, "p2p.peers": [url[1]]}),
            (base / "b", ports[1], secret, {**CFG, "p2p.peers": [url[2]]}),
            (base / "c", ports[2], secret, CFG),
        ]
    )
    try:
        ids = [node_id(n) for n in (a, b, c)]
        wait_for(
            lambda: peer_ids(b) == {ids[0], ids[2]} and peer_ids(a) == {ids[1]}, 30, "the line to link up"
        )
        yield a, b, c, ids
    finally:
        for n in (a, b, c):
            n.stop()


def test_write_on_a_is_read_on_c_over_a_line(line, tmp_path):
    a, b, c, ids = line
    env = node_env(tmp_path / "cli", {"P2P_SECRET": a.secret})
    done = run_cli("memory", "set", "my_key", "value", "--url", a.url, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    started = time.monotonic()
    wait_for(lambda: value(c, "my_key") == "value", 5, "my_key on C")
    took = time.monotonic() - started
    got = run_cli("memory", "get", "my_key", "--url", c.url, env=env, cwd=tmp_path)
    assert got.returncode == 0 and got.stdout.strip() == "value", got.stdout + got.stderr
    assert peer_ids(a) == {ids[1]} and peer_ids(c) == {ids[1]}, "A and C must not be linked directly"

    # JSON values, overwrites and deletes travel the same way.
    set_value(a, "doc", {"n": [1, 2.5, None], "s": "é"})
    set_value(c, "from-c", True)
    wait_for(
        lambda: value(c, "doc") == {"n": [1, 2.5, None], "s": "é"} and value(a, "from-c") is True,
        5,
        "JSON values both ways",
    )
    set_value(a, "doc", "second")
    assert delete(a, "from-c") == 200
    wait_for(
        lambda: value(c, "doc") == "second" and c.get("/api/memory/from-c").status_code == 404,
        5,
        "overwrite and delete to reach C",
    )

    # The API's edges: a missing key is a 404 with a message, limits are 413s that say which limit.
    missing = c.get("/api/memory/no-such-key")
    assert missing.status_code == 404 and "no-such-key" in missing.json()["detail"]
    long_key = a.post("/api/memory/set", json={"key": "k" * 257, "value": 1})
    assert long_key.status_code == 413 and "256" in long_key.json()["detail"]
    big = a.post("/api/memory/set", json={"key": "big", "value": "x" * 70000})
    assert big.status_code == 413 and "65536" in big.json()["detail"]
    assert c.get("/api/memory", params={"prefix": "my_"}).json()["keys"] == ["my_key"]

    state_a, state_b = memory_state(a), memory_state(b)
    assert state_a["pushes_sent"] >= 3 and state_b["updates_applied"] >= 3 and state_a["refused"] == 0
    print(f"my_key reached C {took * 1000:.0f} ms after the CLI returned")


def test_a_thousand_keys_written_concurrently_on_a_all_reach_c(line):
    a, b, c, _ = line
    local = threading.local()

    def write(i: int) -> int:
        if not hasattr(local, "client"):
            local.client = a.client()
        return local.client.post(
            "/api/memory/set", json={"key": f"bulk/{i:04d}", "value": {"i": i}}
        ).status_code

    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(write, range(1000)))
    assert codes == [200] * 1000
    wrote = time.monotonic() - started
    wait_for(lambda: len(keys(c, "bulk/")) == 1000, 60, "1 000 keys on C")
    converged = time.monotonic() - started
    assert len(keys(b, "bulk/")) == 1000
    for i in range(0, 1000, 97):
        assert value(c, f"bulk/{i:04d}") == {"i": i}
    print(f"1000 concurrent writes on A: {wrote:.1f}s; all on C after {converged:.1f}s")
    assert_clean_logs(a, b, c)


# -- real nodes: a partition that heals ---------------------------------------------------------------
def test_concurrent_writes_during_a_partition_converge_after_it_heals(tmp_path):
    secret = strong_secret()
    ports = [free_port() for _ in range(3)]
    nodes: list[RunningNode] = []
    with TcpProxy(ports[1]) as proxy:
        try:
            nodes = start_all(
                [
                    (
                        tmp_path / "a",
                        ports[0],
                        secret,
                        {**CFG, "p2p.peers": [proxy.url]},
                    ),  # A reaches B via the proxy
                    (
                        tmp_path / "b",
                        ports[1],
                        secret,
                        {**CFG, "p2p.peers": [f"http://127.0.0.1:{ports[2]}"]},
                    ),
                    (tmp_path / "c", ports[2], secret, CFG),
                ]
            )
            a, b, c = nodes
            ids = [node_id(n) for n in nodes]
            wait_for(lambda: peer_ids(b) == {ids[0], ids[2]}, 30, "A - B - C to link up")
            set_value(a, "shared", "before")
            wait_for(
                lambda: all(value(n, "shared") == "before" for n in nodes), 5, "the first value everywhere"
            )

            proxy.cut()
            wait_for(lambda: peer_ids(a) == set() and peer_ids(b) == {ids[2]}, 10, "the partition")
            with ThreadPoolExecutor(2) as pool:  # the same key, on both sides of the cut at once
                list(pool.map(lambda nv: set_value(nv[0], "shared", nv[1]), [(a, "from-a"), (b, "from-b")]))
            set_value(a, "only-a", 1)
            set_value(b, "only-b", 2)
            assert delete(b, "shared") == 200
            set_value(b, "shared", "from-b-again")
            wait_for(
                lambda: value(c, "only-b") == 2 and value(c, "shared") == "from-b-again", 5, "C to follow B"
            )
            time.sleep(0.5)
            assert (
                value(a, "shared") == "from-a" and value(a, "only-b") is None and value(c, "only-a") is None
            )

            proxy.restore()
            wait_for(lambda: peer_ids(b) == {ids[0], ids[2]}, 30, "the link to come back")

            def converged():
                seen = [(value(n, "shared"), value(n, "only-a"), value(n, "only-b")) for n in nodes]
                return seen if len(set(seen)) == 1 and seen[0][1:] == (1, 2) else None

            final = wait_for(converged, 10, "all three to agree")
            assert final[0][0] in ("from-a", "from-b-again")
            assert sorted(keys(a)) == sorted(keys(b)) == sorted(keys(c))
            assert_clean_logs(*nodes)
        finally:
            for n in nodes:
                n.stop()


# -- real nodes: SIGKILL right after acknowledged writes ----------------------------------------------
def test_sigkill_after_acknowledged_writes_loses_nothing_and_peers_get_them(tmp_path):
    secret = strong_secret()
    port = free_port()
    (n,) = start_all([(tmp_path / "n", port, secret, CFG)])
    with n.client() as client:
        for i in range(20):
            r = client.post("/api/memory/set", json={"key": f"durable/{i:02d}", "value": f"v{i}"})
            assert r.status_code == 200
    n.stop(signal.SIGKILL)  # right after the last acknowledgement
    assert n.proc.returncode == -signal.SIGKILL

    # A peer that was not there when they were written; the restarted node links to it.
    (p,) = start_all([(tmp_path / "p", free_port(), secret, CFG)])
    try:
        set_value(p, "from-p", 1)
        (n2,) = start_all([(tmp_path / "n", port, secret, {**CFG, "p2p.peers": [p.url]})])
        try:
            assert keys(n2, "durable/") == [f"durable/{i:02d}" for i in range(20)]
            assert value(n2, "durable/19") == "v19"
            # The link-up sync carries them to the peer, and the peer's own write back.
            wait_for(
                lambda: len(keys(p, "durable/")) == 20 and value(n2, "from-p") == 1,
                15,
                "the durable writes to reach the peer",
            )
            assert value(p, "durable/07") == "v7"
            assert_clean_logs(p, n2)
        finally:
            n2.stop()
    finally:
        p.stop()


def test_a_corrupt_store_stops_the_node_with_a_way_out_and_peers_resync_it(tmp_path):
    secret = strong_secret()
    ports = [free_port(), free_port()]
    peer_cfg = {**CFG, "p2p.peers": [f"http://127.0.0.1:{ports[0]}"]}
    p, n = start_all([(tmp_path / "p", ports[0], secret, CFG), (tmp_path / "n", ports[1], secret, peer_cfg)])
    try:
        for i in range(5):
            set_value(n, f"saved/{i}", i)
        wait_for(lambda: len(keys(p, "saved/")) == 5, 10, "the peer to hold a copy")
        n.stop()
        store = tmp_path / "n" / "memory" / "memory-private.sqlite3"
        store.write_bytes(store.read_bytes()[: store.stat().st_size // 2])  # a torn file
        damaged = store.read_bytes()

        broken = start_node(tmp_path / "n", port=ports[1], secret=secret, extra=peer_cfg, wait=False)
        assert broken.proc.wait(60) != 0
        log = broken.log()
        assert "is corrupt" in log and f"mv {store} {store}.corrupt" in log and "peers will resync it" in log
        assert store.read_bytes() == damaged, "a corrupt store must be left as it was"

        store.rename(store.with_name(store.name + ".corrupt"))  # the way out the message gives
        (n2,) = start_all([(tmp_path / "n", ports[1], secret, peer_cfg)])
        try:
            wait_for(
                lambda: keys(n2, "saved/") == [f"saved/{i}" for i in range(5)], 15, "the peer to resync it"
            )
            assert value(n2, "saved/3") == 3
        finally:
            n2.stop()
    finally:
        p.stop()
        n.stop()


# -- real node: a hostile peer ------------------------------------------------------------------------
def _raw_update(write, client_id: int | None = None) -> bytes:
    doc = Doc(client_id=client_id)
    write(doc.get("memory", type=Map))
    return doc.get_update()


def _smuggle_pair() -> tuple[bytes, bytes]:
    """A valid update carrying a hidden overwrite whose parent it leaves out, and that parent: applied raw,
    the second would let the first's non-JSON value in unchecked."""
    doc = Doc(client_id=4242)
    updates: list[bytes] = []
    doc.observe(lambda event: updates.append(event.update))
    m = doc.get("memory", type=Map)
    with doc.transaction():
        m["smuggled"] = '"fine"'
    with doc.transaction():
        m["smuggled"] = f"not json {MARKER}"
    carrier = MemoryDoc()
    return pycrdt.merge_updates(carrier.set("carrier", 1), updates[1]), updates[0]


def test_garbage_updates_from_a_peer_change_nothing_and_get_it_banned(node_factory):
    node = node_factory(extra={**CFG, "memory.penalty_limit": 3})
    set_value(node, "keep", {"a": 1})
    before = keys(node)

    async def scenario() -> str:
        hostile = Mesh(
            Identity.generate(),
            node.secret,
            name="hostile",
            version="t",
            listen_host="127.0.0.1",
            listen_port=free_port(),
            settings=MeshSettings(heartbeat_secs=0.5, dead_after_secs=2.0),
        )
        await hostile.start()
        try:
            url = f"ws://127.0.0.1:{node.port}/p2p"
            link = await hostile.connect(url)
            nid = link.peer_id
            method = "memory.private.update"
            # Valid updates pass; the hidden, unvalidated part of the first is left out, not stored.
            carrier, parent = _smuggle_pair()
            assert (await hostile.request(nid, method, carrier))["changed"] is True
            assert (await hostile.request(nid, method, parent))["changed"] is True
            # Then garbage: random bytes, a decodable update writing non-JSON, a non-bytes payload.
            bad = [
                bytes(range(7, 250, 3)),
                _raw_update(lambda m: m.__setitem__("victim", f"{{{MARKER}")),
                {"not": "bytes"},
            ]
            for i, payload in enumerate(bad):
                with pytest.raises(RemoteError) as info:
                    await hostile.request(nid, method, payload, timeout=5)
                assert info.value.code == "bad_update"
                if i < len(bad) - 1:
                    assert hostile.connected(nid)
            await _eventually(lambda: not hostile.connected(nid), 5)
            # Banned: a new link is dropped at once.
            with contextlib.suppress(Exception):
                await hostile.connect(url)
            await asyncio.sleep(1.0)
            assert not hostile.connected(nid)
            return hostile.node_id
        finally:
            await hostile.stop()

    hostile_id = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert keys(node) == sorted([*before, "carrier", "smuggled"])
    assert (
        value(node, "keep") == {"a": 1} and value(node, "smuggled") == "fine" and value(node, "carrier") == 1
    )
    status = node.get("/api/status").json()["mesh"]
    assert [b["node_id"] for b in status["private"]["banned"]] == [hostile_id]
    assert hostile_id not in peer_ids(node)
    memory = status["memory"]["private"]
    assert memory["refused"] == 3 and memory["peers_banned"] == 1
    log = node.log()
    assert log.count("memory private: refused") == 3 and f"banning node {hostile_id[:7]}" in log
    assert_clean_logs(node)


# -- in-process: protocol corners -----------------------------------------------------------------------
SECRET = strong_secret()


async def _eventually(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


class MemNode:
    """A mesh with its own WebSocket server and a synced memory store, all in the test's event loop."""

    def __init__(self, directory: Path, name: str, *, namespaces=("private",), interval: float = 600.0, **kw):
        self.directory, self.name, self.namespaces, self.interval, self.kw = (
            directory,
            name,
            namespaces,
            interval,
            kw,
        )
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}/p2p"

    async def __aenter__(self) -> MemNode:
        self.mesh = Mesh(
            Identity.generate(),
            SECRET,
            name=self.name,
            version="t",
            listen_host="127.0.0.1",
            listen_port=self.port,
            settings=MeshSettings(
                heartbeat_secs=0.3, dead_after_secs=1.5, reconnect_base_secs=0.1, peer_exchange=False
            ),
        )
        self.stores = {ns: MemoryStore.open(self.directory / self.name, ns) for ns in self.namespaces}
        self.syncs = {
            ns: MemorySync(s, self.mesh, namespace=ns, interval=self.interval, **self.kw)
            for ns, s in self.stores.items()
        }
        for sync in self.syncs.values():
            sync.start()

        async def handler(ws):
            await self.mesh.accept(WebsocketsTransport(ws, self.mesh.stats))

        self.server = await websockets.serve(
            handler, "127.0.0.1", self.port, compression=None, max_size=2**21
        )
        await self.mesh.start()
        return self

    async def __aexit__(self, *exc) -> None:
        for sync in self.syncs.values():
            await sync.stop()
        await self.mesh.stop()
        self.server.close()
        await self.server.wait_closed()
        for store in self.stores.values():
            store.close()

    @property
    def store(self) -> MemoryStore:
        return self.stores["private"]

    @property
    def id(self) -> str:
        return self.mesh.node_id


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_private_and_public_documents_never_mix(tmp_path):
    async def scenario():
        both = ("private", "public")
        async with MemNode(tmp_path, "a", namespaces=both) as a, MemNode(tmp_path, "b", namespaces=both) as b:
            await a.mesh.connect(b.url)
            await asyncio.to_thread(a.stores["private"].set, "secret-plan", "private only")
            await asyncio.to_thread(b.stores["public"].set, "announcement", "public only")
            await _eventually(
                lambda: "secret-plan" in b.stores["private"] and "announcement" in a.stores["public"]
            )
            await asyncio.sleep(0.3)
            for node in (a, b):
                assert node.stores["private"].list() == ["secret-plan"]
                assert node.stores["public"].list() == ["announcement"]
            # Each handler feeds its own document only.
            update = MemoryDoc().set("pushed-public", 1)
            await a.mesh.request(b.id, "memory.public.update", update)
            assert "pushed-public" in b.stores["public"] and "pushed-public" not in b.stores["private"]
            files = sorted(p.name for p in (tmp_path / "a").glob("memory-*.sqlite3"))
            assert files == ["memory-private.sqlite3", "memory-public.sqlite3"]
            assert {m for m in a.mesh._handlers if m.startswith("memory.")} == {
                f"memory.{ns}.{kind}" for ns in both for kind in ("update", "sync", "hint", "digests")
            }
        with MemoryStore.open(tmp_path / "c", "private") as private, pytest.raises(ValueError):
            MemorySync(private, a.mesh, namespace="public")

    run(scenario())


def test_a_push_overtaking_its_parent_heals_at_once_and_anti_entropy_heals_a_lost_one(tmp_path):
    async def scenario():
        async with MemNode(tmp_path, "a", interval=600) as a, MemNode(tmp_path, "b", interval=600) as b:
            await a.mesh.connect(b.url)
            await _eventually(lambda: a.syncs["private"].stats["syncs"] and b.syncs["private"].stats["syncs"])
            # Another writer's two updates to one key: A gets both, B only the second (the first push lost).
            writer = MemoryDoc()
            first, second = writer.set("k", "one"), writer.set("k", "two")
            await asyncio.to_thread(a.store.apply_remote, first)  # not gossiped: as if the push to B was lost
            await asyncio.to_thread(a.store.apply_remote, second)
            await a.mesh.request(b.id, "memory.private.update", second)
            # B cannot place it yet, notices, and pulls from A at once (anti-entropy is 10 minutes away).
            await _eventually(lambda: "k" in b.store and b.store.get("k") == "two", 5)
            assert b.syncs["private"].stats["gaps"] >= 1

        async with MemNode(tmp_path, "c", interval=0.3) as c, MemNode(tmp_path, "d", interval=0.3) as d:
            await c.mesh.connect(d.url)
            await _eventually(lambda: c.syncs["private"].stats["syncs"] and d.syncs["private"].stats["syncs"])
            await asyncio.to_thread(
                c.store.apply_remote, MemoryDoc().set("lost", 1)
            )  # a push that never went
            started = time.monotonic()
            await _eventually(lambda: "lost" in d.store, 5)
            assert time.monotonic() - started < 2.5

    run(scenario())


def test_a_sync_larger_than_a_frame_streams_in_chunks_and_gossip_crosses_a_line(tmp_path):
    async def scenario():
        async with (
            MemNode(tmp_path, "a") as a,
            MemNode(tmp_path, "b") as b,
            MemNode(tmp_path, "c") as c,
        ):
            blob = "y" * 60000
            for i in range(80):  # ~4.8 MB: five times the 1 MiB frame limit
                await asyncio.to_thread(a.store.set, f"blob/{i:02d}", f"{i}{blob}")
            await b.mesh.connect(c.url)
            await a.mesh.connect(b.url)  # B pulls the lot from A at link-up, then gossips it on to C
            await _eventually(lambda: len(c.store) == 80, 30)
            assert c.store.get("blob/79") == f"79{blob}"
            assert b.syncs["private"].stats["sync_bytes_received"] > 4 * 1024 * 1024
            assert b.syncs["private"].stats["hints_sent"] >= 1  # too big to push: C was told to pull
            assert not a.mesh.connected(c.id)
            # A burst of small writes is merged into few pushes, in order.
            await asyncio.to_thread(lambda: [a.store.set("counter", i) for i in range(300)])
            await _eventually(lambda: "counter" in c.store and c.store.get("counter") == 299, 10)
            assert a.syncs["private"].stats["pushes_sent"] < 300

    run(scenario(), 120)


def test_bad_sync_answers_count_against_the_peer(tmp_path):
    async def scenario():
        async with MemNode(tmp_path, "victim", penalty_limit=3, ban_secs=60) as victim:
            hostile = Mesh(
                Identity.generate(),
                SECRET,
                name="hostile",
                version="t",
                listen_host="127.0.0.1",
                listen_port=free_port(),
                settings=MeshSettings(heartbeat_secs=0.3, dead_after_secs=1.5),
            )
            answers = iter([[{"size": 9}, b"\xff" * 9], [{"size": -1}], [{"size": 4}, b"12345678"]])

            async def sync(ctx, payload):
                for chunk in next(answers, [{"size": 0}]):
                    yield chunk

            hostile.register_handler("memory.private.sync", sync)
            await hostile.start()
            try:
                await hostile.connect(victim.url)  # the victim pulls at link-up: strike one
                await _eventually(lambda: victim.syncs["private"].stats["refused"] == 1, 5)
                await hostile.request(victim.id, "memory.private.hint", None)  # strike two
                await _eventually(lambda: victim.syncs["private"].stats["refused"] == 2, 5)
                await hostile.request(victim.id, "memory.private.hint", None)  # strike three: dropped, banned
                await _eventually(lambda: not victim.mesh.connected(hostile.node_id), 5)
                assert victim.mesh.banned(hostile.node_id) and victim.store.list() == []
                assert victim.mesh.state()["banned"][0]["node_id"] == hostile.node_id
            finally:
                await hostile.stop()

    run(scenario())


def test_store_never_keeps_content_that_skipped_validation(tmp_path):
    carrier, parent = _smuggle_pair()
    with MemoryStore.open(tmp_path, "private") as store:
        assert store.apply_remote(carrier) is True
        assert store.apply_remote(parent) is True
        assert store.items() == [("carrier", 1), ("smuggled", "fine")]
    with MemoryStore.open(tmp_path, "private") as store:  # and the file replays to the same, valid document
        assert store.items() == [("carrier", 1), ("smuggled", "fine")]
    # Plain out-of-order delivery: the overtaking update is not applied (nor claimed), the sender resends.
    writer, reader = MemoryDoc(), MemoryDoc()
    first, second = writer.set("k", 1), writer.set("k", 2)
    assert reader.apply_remote(second) is False and "k" not in reader
    assert reader.apply_remote(first) is True and reader.apply_remote(second) is True and reader.get("k") == 2


def test_memory_config_keys_reach_the_store(tmp_path):
    port = free_port()
    (n,) = start_all(
        [
            (
                tmp_path / "n",
                port,
                strong_secret(),
                {**CFG, "memory.max_key_bytes": 8, "memory.max_value_bytes": 100},
            )
        ]
    )
    try:
        assert n.post("/api/memory/set", json={"key": "123456789", "value": 1}).status_code == 413
        r = n.post("/api/memory/set", json={"key": "k", "value": "x" * 120})
        assert r.status_code == 413 and "100 bytes" in r.json()["detail"]
        set_value(n, "k", "ok")
        assert value(n, "k") == "ok"
    finally:
        n.stop()
