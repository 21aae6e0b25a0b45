"""Values a peer can plant: crafted CRDT updates (non-finite numbers, lone surrogates, 5 000-deep nesting),
equivocation (one Yjs client id and clock, two values, sent to two nodes) and random updates
(hypothesis) against real nodes. Every read answers, every refusal counts, the nodes converge.

The hostile peer is an in-process Mesh holding the network secret (a member gone bad): it links to the
real nodes over loopback and sends raw pycrdt updates on the memory RPCs.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map

from nodes import RunningNode, free_port, start_node, strong_secret, wait_for, wait_until_up
from pinkybrain.node.core.identity import Identity
from pinkybrain.node.core.memory_doc import MemoryDoc, MemoryUpdateError
from pinkybrain.node.core.memory_values import MemoryValueError, check_value, decode_value, encode_value
from pinkybrain.node.services.mesh import Mesh, MeshSettings, RemoteError

CFG = {
    "p2p.heartbeat_secs": 0.5,
    "p2p.dead_after_secs": 3.0,
    "p2p.peer_exchange": False,
    "memory.sync_interval_secs": 600.0,  # what converges here converged by pushes and link-up syncs
    "memory.penalty_limit": 1_000_000,  # count strikes without banning the test's hostile peer
}
UPDATE = "memory.private.update"
DEEP = "[" * 5000 + "]" * 5000
CRAFTED = {
    "inf": "1e400",
    "minus-inf": "-1e999",
    "in-a-list": '[1, 2, {"x": 1e400}]',
    "lone-surrogate": '"\\ud800"',
    "surrogate-key": '{"\\udfff": 1}',
    "deep-list": DEEP,
    "deep-object": '{"a":' * 5000 + "1" + "}" * 5000,
    "nan-constant": "NaN",
}


# -- helpers ----------------------------------------------------------------------------------------
def node_id(node: RunningNode) -> str:
    return node.get("/api/ping").json()["node_id"]


def peer_ids(node: RunningNode) -> set[str]:
    return {p["node_id"] for p in node.get("/api/peers").json()["peers"]}


def snapshot(node: RunningNode) -> dict:
    """Every key and its value, reading each one as a client would; any failed read fails the test."""
    listing = node.get("/api/memory")
    assert listing.status_code == 200, listing.text
    out = {}
    for key in listing.json()["keys"]:
        r = node.get(f"/api/memory/{key}")
        assert r.status_code in (200, 404), (key, r.status_code, r.text)  # 404: deleted meanwhile
        if r.status_code == 200:
            out[key] = r.json()["value"]
    return out


def memory_state(node: RunningNode) -> dict:
    return node.get("/api/status").json()["mesh"]["memory"]["private"]


def raw_update(entries: dict, client_id: int | None = None) -> bytes:
    """A pycrdt update writing `entries` (key -> stored text or any Yjs value), bypassing every check."""
    doc = Doc(client_id=client_id)
    m = doc.get("memory", type=Map)
    with doc.transaction():
        for key, text in entries.items():
            m[key] = text
    return doc.get_update()


class HostilePeer:
    """A member's mesh in its own thread and event loop, driven synchronously from the test."""

    def __init__(self, secret: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.mesh = Mesh(Identity.generate(), secret, name="hostile", version="t", listen_host="127.0.0.1",
                         listen_port=free_port(), settings=MeshSettings(heartbeat_secs=0.5, dead_after_secs=3.0,
                                                                        peer_exchange=False))
        self.call(self.mesh.start())

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def link(self, node: RunningNode) -> str:
        return self.call(self.mesh.connect(f"ws://{node.host}:{node.port}/p2p")).peer_id

    def push(self, peer: str, update) -> dict | str:
        """The node's answer to a push, or the error code it refused it with."""
        try:
            return self.call(self.mesh.request(peer, UPDATE, update, timeout=20))
        except RemoteError as exc:
            return exc.code

    def close(self) -> None:
        self.call(self.mesh.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def start_pair(tmp_path, *, link: bool = True) -> tuple[RunningNode, RunningNode]:
    secret = strong_secret()
    ports = [free_port(), free_port()]
    a = start_node(tmp_path / "a", port=ports[0], secret=secret, extra=CFG, wait=False)
    b_cfg = {**CFG, "p2p.peers": [f"http://127.0.0.1:{ports[0]}"]} if link else CFG
    b = start_node(tmp_path / "b", port=ports[1], secret=secret, extra=b_cfg, wait=False)
    for n in (a, b):
        wait_until_up(n)
    if link:
        ida = node_id(a)
        wait_for(lambda: ida in peer_ids(b), 30, "B to link to A")
    return a, b


def restart(node: RunningNode, extra: dict) -> RunningNode:
    node.stop()
    return start_node(node.home, port=node.port, secret=node.secret, extra=extra)


# -- the one validator ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_text_is_refused_by_the_same_check_everywhere(name):
    text = CRAFTED[name]
    with pytest.raises(MemoryValueError):
        decode_value(text)
    doc = MemoryDoc()
    doc.set("keep", 1)
    before = doc.full_update()
    with pytest.raises(MemoryUpdateError):
        doc.apply_remote(raw_update({"k": text}))
    assert doc.full_update() == before


@pytest.mark.parametrize(
    "value",
    [float("inf"), float("-inf"), float("nan"), "\ud800", {"\udfff": 1}, [[[[1]]]], {"a": {"b": {"c": []}}}],
    ids=repr,
)
def test_local_writes_pass_the_same_check(value):
    doc = MemoryDoc(max_depth=3)
    with pytest.raises(MemoryValueError):
        doc.set("k", value)
    assert "k" not in doc


def test_depth_is_bounded_without_recursion():
    deep: list = []
    for _ in range(100_000):  # far past the interpreter's recursion limit
        deep = [deep]
    with pytest.raises(MemoryValueError, match="nested more than 64 deep"):
        check_value(deep)
    nested = json.loads("[" * 64 + "]" * 64)
    assert decode_value(encode_value(nested)) == nested
    with pytest.raises(MemoryValueError, match="nested more than 64"):
        decode_value("[" * 65 + "]" * 65)
    # Brackets inside strings are text, not nesting.
    assert decode_value(json.dumps("[" * 5000)) == "[" * 5000


def test_a_bad_value_an_older_version_stored_is_a_clear_error_not_an_unopenable_store():
    doc = MemoryDoc.from_updates([raw_update({"old": "1e400", "fine": '"ok"'})])
    assert doc.list() == ["fine", "old"] and doc.get("fine") == "ok"
    with pytest.raises(MemoryValueError, match="finite"):
        doc.get("old")


def test_content_under_our_own_client_id_is_refused():
    doc = MemoryDoc()
    doc.set("mine", 1)
    before = doc.full_update()
    forged = Doc(client_id=doc._doc.client_id)  # a peer reusing our id, at a clock we have not used yet
    forged.get("memory", type=Map)["mine"] = '"forged"'
    forged.get("memory", type=Map)["more"] = '"forged"'
    with pytest.raises(MemoryUpdateError, match="own Yjs client id"):
        doc.apply_remote(forged.get_update())
    assert doc.full_update() == before and doc.get("mine") == 1
    # What we wrote ourselves, coming back from a peer, is just a duplicate.
    assert doc.apply_remote(before) is False


# -- real nodes ------------------------------------------------------------------------------------------
def test_crafted_peer_updates_leave_every_node_readable_and_converged(tmp_path):
    a, b = start_pair(tmp_path)
    hostile = HostilePeer(a.secret)
    try:
        peer_a = hostile.link(a)
        assert a.post("/api/memory/set", json={"key": "good", "value": {"x": 1}}).status_code == 200
        for name, text in CRAFTED.items():
            assert hostile.push(peer_a, raw_update({name: text})) == "bad_update", name
        # A good entry carrying a bad one is refused whole.
        assert hostile.push(peer_a, raw_update({"fine": "1", "bad": "1e400"})) == "bad_update"
        # The same values through the local API are refused with a 400 (raw JSON: no client sends these).
        with a.client() as client:
            for body in ('{"key": "x", "value": 1e400}', '{"key": "x", "value": "\\ud800"}',
                         '{"key": "x", "value": ' + "[" * 65 + "]" * 65 + "}"):
                r = client.post("/api/memory/set", content=body, headers={"content-type": "application/json"})
                assert r.status_code == 400, (body[:40], r.status_code, r.text)
        refused = len(CRAFTED) + 1
        state = memory_state(a)
        assert state["refused"] == refused, state  # every refusal is a strike, RecursionError included
        assert state["strikes"] == {peer_a_short(hostile): refused}

        def readable_and_converged() -> bool:
            return snapshot(a) == snapshot(b) == {"good": {"x": 1}}

        wait_for(readable_and_converged, 10, "A and B to agree")
        for n in (a, b):
            for name in [*CRAFTED, "fine", "bad", "x"]:
                assert n.get(f"/api/memory/{name}").status_code == 404
        # ...also after a restart of both.
        a = restart(a, CFG)
        b = restart(b, {**CFG, "p2p.peers": [a.url]})
        wait_for(readable_and_converged, 20, "A and B to agree after restarts")
        for n in (a, b):
            assert "Traceback" not in n.log()
    finally:
        hostile.close()
        a.stop()
        b.stop()


def peer_a_short(hostile: HostilePeer) -> str:
    return hostile.mesh.node_id[:7]


def test_an_equivocating_peer_cannot_split_the_mesh(tmp_path):
    # Two nodes not yet linked, so each keeps the version it was given: the split is real before the link.
    a, b = start_pair(tmp_path, link=False)
    hostile = HostilePeer(a.secret)
    try:
        peer_a, peer_b = hostile.link(a), hostile.link(b)
        for n in (a, b):
            assert n.post("/api/memory/set", json={"key": f"honest-{n.port}", "value": n.port}).status_code == 200
        client_id = random.getrandbits(32)
        assert hostile.push(peer_a, raw_update({"eq": '"one"', "only-a": "1"}, client_id))["changed"]
        assert hostile.push(peer_b, raw_update({"eq": '"two"', "only-b": "2"}, client_id))["changed"]
        assert a.get("/api/memory/eq").json()["value"] == "one"
        assert b.get("/api/memory/eq").json()["value"] == "two"
        # Yjs alone never repairs this: both hold the same ids, so each sync finds nothing to send.
        b = restart(b, {**CFG, "p2p.peers": [a.url]})
        ida = node_id(a)
        wait_for(lambda: ida in peer_ids(b), 30, "B to link to A")

        wait_for(lambda: snapshot(a) == snapshot(b), 15, "A and B to converge")
        view = snapshot(a)
        assert view == {f"honest-{a.port}": a.port, f"honest-{b.port}": b.port}, view
        counted = memory_state(a)["equivocations"] + memory_state(b)["equivocations"]
        assert counted >= 1
        assert "equivocated" in a.log() + b.log()
        # The mesh keeps working on the same key afterwards.
        assert a.post("/api/memory/set", json={"key": "eq", "value": "settled"}).status_code == 200
        wait_for(lambda: snapshot(b).get("eq") == "settled", 10, "a later write to reach B")
        assert snapshot(a) == snapshot(b)
    finally:
        hostile.close()
        a.stop()
        b.stop()


# -- property: random values and random updates from a peer ----------------------------------------------
json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
)
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
# Text a peer may store as a value: JSON from any of the above (NaN and Infinity included), crafted text
# (huge exponents, escaped surrogates, deep nesting), or anything at all.
stored_text = st.one_of(
    json_value.map(lambda v: json.dumps(v, ensure_ascii=False)),
    st.sampled_from(sorted(CRAFTED.values())),
    st.integers(1, 4000).map(lambda n: "[" * n + "]" * n),
    st.integers(0xD800, 0xDFFF).map(lambda c: f'"\\u{c:04x}"'),
    st.text(max_size=30),
)
yjs_value = st.one_of(stored_text, st.integers(-(2**53), 2**53), st.none(), st.just("map"), st.just("array"))
keys = st.sampled_from(["a", "b", "c", "d", "é", "k" * 300, ""])
operation = st.tuples(st.sampled_from(["set", "delete"]), keys, yjs_value)


def random_update(ops, client_id: int) -> bytes:
    doc = Doc(client_id=client_id)
    m = doc.get("memory", type=Map)
    for op, key, val in ops:
        with doc.transaction():
            if op == "delete":
                if key in m:
                    del m[key]
            elif val == "map":
                m[key] = Map({"x": "1"})
            elif val == "array":
                m[key] = Array(["1"])
            else:
                m[key] = val
    return doc.get_update()


@pytest.fixture(scope="module")
def property_mesh(tmp_path_factory):
    a, b = start_pair(tmp_path_factory.mktemp("property"))
    hostile = HostilePeer(a.secret)
    peers = {"a": hostile.link(a), "b": hostile.link(b)}
    yield a, b, hostile, peers
    hostile.close()
    for n in (a, b):
        n.stop()
        assert "Traceback" not in n.log()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                HealthCheck.too_slow])
@given(
    ops=st.lists(operation, min_size=1, max_size=6),
    target=st.sampled_from(["a", "b", "both-equivocating"]),
    local=st.lists(st.tuples(keys, json_value), max_size=2),
    client_id=st.integers(1, 2**32),
)
def test_random_peer_updates_never_break_a_read_and_nodes_converge(property_mesh, ops, target, local, client_id):
    a, b, hostile, peers = property_mesh
    for key, val in local:  # the local API takes or refuses (4xx) what the validator says, never a 500
        body = json.dumps({"key": key, "value": val}, allow_nan=True)
        with a.client() as client:
            r = client.post("/api/memory/set", content=body, headers={"content-type": "application/json"})
        assert r.status_code < 500, r.text
        try:
            encode_value(val)
            storable = len(key.encode()) in range(1, 257)
        except MemoryValueError:
            storable = False
        assert (r.status_code == 200) == storable, (key, r.status_code, r.text)
    if target == "both-equivocating":
        # The same client id and clocks, different content, to each node.
        hostile.push(peers["a"], random_update(ops, client_id))
        hostile.push(peers["b"], random_update([(op, key, '"other"') for op, key, _ in ops], client_id))
    else:
        answer = hostile.push(peers[target], random_update(ops, client_id))
        assert answer == "bad_update" or isinstance(answer, dict), answer
    wait_for(lambda: snapshot(a) == snapshot(b), 20, "A and B to converge")
    for n in (a, b):
        for key, val in snapshot(n).items():
            check_value(val)  # what a node serves is what the validator allows
            assert key
