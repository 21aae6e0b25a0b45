"""The public mesh with a real tracker process and five real nodes on 127.0.0.1, plus an in-process
public-mesh client ("mallory") that plays an untrusted stranger.

    A  joins by API; shares a tiny GGUF ("a-tiny"), keeps another unshared, holds private memory, and is
       linked on its private mesh to P (same network secret). Vouches for D only.
    B  joins by API; shares the real default model but nobody vouches for it; vouches for A.
    C  joins by API with initial_balance 0 (broke); vouches for A.
    D  stealth, `mesh.public: true` (joins at start), shares the real default model; vouches for A.
    P  A's private peer: never on the public mesh.

Checked: join (tracker list, every node's public peers) and leave; D serves A's query through the
relay while it is absent from the tracker's raw list, from every /api/peers and from every peer-exchange
message; credits move by exactly earn_per_query with the same dual-signed receipt on both sides, and a
replayed or altered receipt is refused; B's queries are refused "not trusted", also after forged and
expired vouches for it arrive through trust.exchange, and after a revoked one; A never routes to B although
B shares the model over a direct link; broke C is refused with the hint; a unique marker sent in every
public query is in no file under any node's home and in no log; A's private memory, private peer and
unshared model never reach a public peer; private and public handshakes never cross.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from pathlib import Path

import pytest
from test_tracker import start_tracker

from model import DEFAULT_NAME, place_default_model, write_tiny_gguf
from nodes import free_port, start_node, strong_secret
from pinkybrain.node.core.credits import EARN_HINT, InvalidReceipt, Ledger, Receipt, ReplayError, to_micro
from pinkybrain.node.core.handshake import HandshakeError
from pinkybrain.node.core.identity import Identity, load_identity
from pinkybrain.node.core.tracker_protocol import ListQuery
from pinkybrain.node.core.trust import Attestation
from pinkybrain.node.services.mesh import DialError, Mesh, MeshError, MeshSettings, RemoteError
from pinkybrain.node.services.public_mesh import PUBLIC_MESH_SECRET, PUBLIC_PATH, TRUST_EXCHANGE
from pinkybrain.node.services.tracker_client import TrackerClient

MARKER = f"pb-public-{uuid.uuid4().hex}"  # in every public prompt: must never be written anywhere
PRIVATE_KEY = f"private/secret-{uuid.uuid4().hex[:12]}"
PRIVATE_VALUE = f"do-not-leak-{uuid.uuid4().hex[:12]}"
FAST = {"p2p.heartbeat_secs": 0.5, "p2p.dead_after_secs": 3.0, "mesh.public_peer_refresh_secs": 0.5,
        "mesh.trust_refresh_secs": 1.0, "inference.n_ctx": 1024,
        "p2p.remote_timeout_secs": 90, "credit.earn_per_query": 1.0, "credit.initial_balance": 10.0}


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


class Loop:
    """An asyncio loop in a thread, for in-process meshes and tracker clients next to the sync tests."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class RecordingMesh(Mesh):
    """A public-mesh client that keeps every peer-exchange message it is sent."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.pex: list = []

    def _on_peers(self, link, msg):
        self.pex.append(msg.get("peers"))
        super()._on_peers(link, msg)


def stranger_mesh(identity: Identity, secret: str = PUBLIC_MESH_SECRET, path: str = PUBLIC_PATH) -> RecordingMesh:
    return RecordingMesh(identity, secret, name="mallory", version="0", listen_host="127.0.0.1",
                         listen_port=free_port(), url_path=path,
                         settings=MeshSettings(heartbeat_secs=0.5, dead_after_secs=5, handshake_timeout=5))


def ids_of(records) -> set[str]:
    return {r["node_id"] if isinstance(r, dict) else r.node_id for r in records}


def test_the_announced_address_is_the_public_url_or_a_concrete_bind_address_and_never_a_stealth_one():
    from pinkybrain.node.services.public_mesh import advertised_url

    def cfg(**kw):
        return {"mesh.stealth": False, "p2p.public_url": None, **kw}

    assert advertised_url(cfg(), "127.0.0.1", 8081) == f"ws://127.0.0.1:8081{PUBLIC_PATH}"
    assert advertised_url(cfg(), "0.0.0.0", 8080) is None  # noqa: S104 - a wildcard has no address to give
    assert advertised_url(cfg(**{"p2p.public_url": "https://node.example.org"}), "0.0.0.0", 8080) == (  # noqa: S104
        f"wss://node.example.org:443{PUBLIC_PATH}")
    assert advertised_url(cfg(**{"p2p.public_url": "node.example.org:9000"}), "0.0.0.0", 8080) == (  # noqa: S104
        f"ws://node.example.org:9000{PUBLIC_PATH}")
    assert advertised_url(cfg(**{"mesh.stealth": True, "p2p.public_url": "http://h:1"}), "127.0.0.1", 1) is None


def test_public_memory_shows_only_entries_signed_by_valid_writers(tmp_path):
    from pinkybrain.node.core.signed_memory import UnsignedEntry, open_entry, sign_entry
    from pinkybrain.node.services.memory_store import MemoryStore
    from pinkybrain.node.services.public_memory import SignedPublicMemory

    me, friend, stranger = Identity.generate(), Identity.generate(), Identity.generate()
    valid = {friend.node_id}
    with MemoryStore.open(tmp_path, "public") as store:
        memory = SignedPublicMemory(store, me, valid.__contains__, clock=lambda: 1_750_000_000)
        memory.set("board/mine", {"n": 1})
        # What peers' updates can bring: a valid writer's entry, a stranger's, an unsigned one, one moved
        # to another key, and one whose value was changed after signing.
        store.set("board/friend", sign_entry(friend, "board/friend", "hi", now=1))
        store.set("board/stranger", sign_entry(stranger, "board/stranger", "spam", now=1))
        store.set("board/raw", "no signature")
        store.set("board/moved", sign_entry(friend, "board/elsewhere", "hi", now=1))
        store.set("board/edited", {**sign_entry(friend, "board/edited", "yes", now=1), "value": "no"})
        assert memory.get("board/mine") == {"n": 1} and memory.get("board/friend") == "hi"
        assert memory.writer("board/mine") == me.node_id
        assert memory.list("board/") == ["board/friend", "board/mine"]
        for key in ("board/stranger", "board/raw", "board/moved", "board/edited", "board/absent"):
            with pytest.raises(KeyError):
                memory.get(key)
        assert store.get("board/stranger")["writer"] == stranger.node_id  # dropped from reads, not deleted
        valid.add(stranger.node_id)  # once the stranger is valid here, its entry shows
        assert memory.get("board/stranger") == "spam"
        with pytest.raises(UnsignedEntry, match="does not verify"):
            open_entry("board/moved", store.get("board/moved"))


@pytest.fixture(scope="module")
def pub(tmp_path_factory):
    root = tmp_path_factory.mktemp("public")
    tracker = start_tracker(root / "tracker.log")
    loop = Loop()
    names = "pabcd"
    homes = {n: root / n for n in names}
    ports = {n: free_port() for n in names}
    url = {n: f"http://127.0.0.1:{ports[n]}" for n in names}
    private_secret = strong_secret()
    common = {**FAST, "p2p.tracker": tracker.url}
    for n in names:
        (homes[n] / "shared_models").mkdir(parents=True)
    write_tiny_gguf(homes["a"] / "shared_models" / "a-tiny.gguf")
    write_tiny_gguf(homes["a"] / "shared_models" / "a-secret-notes.gguf")  # on disk, never shared
    place_default_model(homes["b"] / "shared_models")
    place_default_model(homes["d"] / "shared_models")
    nodes, clients = {}, []
    mallory_id = Identity.generate()
    mallory = stranger_mesh(mallory_id)
    try:
        nodes["p"] = start_node(homes["p"], port=ports["p"], secret=private_secret, extra=common)
        nodes["a"] = start_node(homes["a"], port=ports["a"], secret=private_secret,
                                extra={**common, "p2p.peers": [url["p"]]})
        nodes["b"] = start_node(homes["b"], port=ports["b"], extra=common)
        nodes["c"] = start_node(homes["c"], port=ports["c"], extra={**common, "credit.initial_balance": 0.0})
        nodes["d"] = start_node(homes["d"], port=ports["d"], extra={**common, "mesh.stealth": True,
                                                                    "mesh.public": True})
        ids = {n: node.get("/api/ping").json()["node_id"] for n, node in nodes.items()}
        for n, model in (("a", "a-tiny"), ("b", DEFAULT_NAME), ("d", DEFAULT_NAME)):
            with nodes[n].client() as c:
                c.timeout = 180  # reading the real model's GGUF header takes seconds of CPU, more when busy
                r = c.post(f"/api/models/{model}/share")
            assert r.status_code == 200, r.text
        r = nodes["a"].post("/api/memory/set", json={"key": PRIVATE_KEY, "value": PRIVATE_VALUE})
        assert r.status_code == 200, r.text
        for voucher, subject in (("a", "d"), ("d", "a"), ("b", "a"), ("c", "a")):
            r = nodes[voucher].post("/api/trust/vouch", json={"node_id": ids[subject], "level": "full"})
            assert r.status_code == 200, r.text
        wait_for(lambda: ids["p"] in {p["node_id"] for p in nodes["a"].get("/api/peers").json()["peers"]},
                 30, "a's private link to p")
        # The tracker's view from the test process: a plain client whose raw list calls are checked too.
        watcher = TrackerClient(tracker.url, Identity.generate(), request_timeout=5)
        clients.append(watcher)
        loop.run(watcher.connect())
        yield {"nodes": nodes, "ids": ids, "tracker": tracker, "loop": loop, "watcher": watcher, "url": url,
               "mallory": mallory, "mallory_id": mallory_id, "homes": homes, "secret": private_secret}
    finally:
        for client in clients:
            loop.run(client.close(), 10)
        loop.run(mallory.stop(), 15)
        loop.close()
        for node in nodes.values():
            node.stop()
        tracker.stop()


def raw_list(pub) -> list[dict]:
    """The tracker's own answer, before the client's checks drop anything."""
    reply = pub["loop"].run(pub["watcher"]._request(ListQuery(limit=200).to_message(0)))
    return reply["records"]


def connect_mallory(pub) -> None:
    """Mallory linked to a (it is when the tests run in order; not when one is picked alone)."""
    mallory, loop, a = pub["mallory"], pub["loop"], pub["nodes"]["a"]
    if not mallory._started:
        loop.run(mallory.start())
    if not mallory.connected(pub["ids"]["a"]):
        loop.run(mallory.connect(f"127.0.0.1:{a.port}"))


def public_ids(node) -> set[str]:
    return {p["node_id"] for p in node.get("/api/peers").json()["public"]}


def query(node, prompt: str, **kw):
    with node.client() as c:
        c.timeout = 180
        return c.post("/api/query", json={"prompt": prompt, "mode": "single", **kw})


def test_join_lists_every_non_stealth_node_and_links_them(pub):
    nodes, ids = pub["nodes"], pub["ids"]
    for n in "abc":
        r = nodes[n].post("/api/network/mesh/join")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["joined"] is True and body["tracker"] == pub["tracker"].url and body["stealth"] is False
        assert body["addresses"] == [f"ws://127.0.0.1:{nodes[n].port}{PUBLIC_PATH}"]
    assert nodes["a"].post("/api/network/mesh/join").json()["joined"] is True  # joining twice is harmless

    listed = wait_for(lambda: (lambda s: s if {ids[n] for n in "abc"} <= s else None)(ids_of(raw_list(pub))),
                      20, "a, b and c on the tracker")
    assert ids["d"] not in listed and ids["p"] not in listed
    for n in "abc":
        others = {ids[m] for m in "abc" if m != n}
        wait_for(lambda n=n, others=others: others <= public_ids(nodes[n]), 30, f"{n} linked to its public peers")
        state = nodes[n].get("/api/status").json()["mesh"]["public"]
        assert state["joined"] and state["tracker_connected"] and state["peers"] >= 2
    d_state = nodes["d"].get("/api/status").json()["mesh"]["public"]
    assert d_state["joined"] and d_state["stealth"] and d_state["addresses"] == "(stealth)"
    # A public link has no trust by itself: b and c are linked to a, but a finds neither valid.
    trusted = {p["node_id"]: p["trusted"] for p in nodes["a"].get("/api/peers").json()["public"]}
    assert trusted[ids["b"]] is False and trusted[ids["c"]] is False


def test_private_and_public_handshakes_never_cross(pub):
    a, loop = pub["nodes"]["a"], pub["loop"]
    with_private_secret = stranger_mesh(Identity.generate(), secret=pub["secret"])
    with pytest.raises((DialError, HandshakeError)):
        loop.run(with_private_secret.connect(f"127.0.0.1:{a.port}"))  # the public route, the private PSK
    public_on_private = stranger_mesh(Identity.generate(), path="/p2p")
    with pytest.raises((DialError, HandshakeError)):
        loop.run(public_on_private.connect(f"127.0.0.1:{a.port}"))  # the private route, the public PSK
    for mesh in (with_private_secret, public_on_private):
        loop.run(mesh.stop())
    assert pub["ids"]["a"] not in {p["node_id"] for p in pub["nodes"]["p"].get("/api/peers").json()["public"]}


def test_stealth_d_serves_a_through_the_relay_and_credits_move(pub):
    nodes, ids = pub["nodes"], pub["ids"]
    a, d = nodes["a"], nodes["d"]
    wait_for(lambda: a.get("/api/status").json()["mesh"]["public"]["stealth_peers"] >= 1, 30,
             "d to link to a through the relay")
    wait_for(lambda: DEFAULT_NAME in [m["id"] for m in a.get("/v1/models").json()["data"]], 20,
             "a to see d's model")
    before = {n: nodes[n].get("/api/credits").json() for n in "ad"}
    r = query(a, f"{MARKER} Say hello in one word.", model=DEFAULT_NAME, max_tokens=8)
    assert r.status_code == 200, r.text
    result = r.json()
    (answer,) = result["answers"]
    # Served by d (over its relay circuit; d has no address), never by b, whose link is direct and cheaper.
    assert answer["node"] == ids["d"] and answer["model"] == DEFAULT_NAME and answer["text"].strip()
    assert result["session_id"] is None and result["recorded"] is False
    # Serving a public query leaves no line at all (logging.public_mesh is off by default): no asker id,
    # model, size or timing.
    for n in "abd":
        assert "serving a remote" not in nodes[n].log() and "served a remote" not in nodes[n].log(), n
    assert f"from {ids['a'][:7]} on" not in d.log()
    assert d.get("/api/status").json()["mesh"]["public"]["relay_circuits"] >= 1

    after = {n: nodes[n].get("/api/credits?receipts=5").json() for n in "ad"}
    assert after["a"]["balance"] == pytest.approx(before["a"]["balance"] - 1.0)
    assert after["d"]["balance"] == pytest.approx(before["d"]["balance"] + 1.0)
    (mine,) = [x for x in after["a"]["latest_receipts"] if x["commitment"]["server"] == ids["d"]]
    (theirs,) = [x for x in after["d"]["latest_receipts"] if x["commitment"]["asker"] == ids["a"]]
    assert mine == theirs  # one receipt, signed by both, held by both
    receipt = Receipt.from_dict(mine)
    receipt.check()
    assert receipt.amount == to_micro(1.0) and receipt.success

    # Replayed or altered: refused (the same checks the node's ledger runs).
    ledger = Ledger.restore(ids["a"], to_micro(10.0), [("asker", receipt.commitment)], [])
    ledger.record_receipt(receipt, now=receipt.delivered_at)
    with pytest.raises(ReplayError):
        ledger.record_receipt(receipt, now=receipt.delivered_at)
    altered = Receipt.from_dict({**mine, "latency_ms": mine["latency_ms"] + 1})
    with pytest.raises(InvalidReceipt):
        altered.check()
    fresh = Ledger.restore(ids["a"], to_micro(10.0), [("asker", receipt.commitment)], [])
    with pytest.raises(InvalidReceipt):
        fresh.record_receipt(receipt, now=receipt.delivered_at, expected_digest="0" * 64)  # another answer


def test_stealth_d_is_in_no_peer_list(pub):
    nodes, ids = pub["nodes"], pub["ids"]
    d_port = str(nodes["d"].port)
    mallory, loop = pub["mallory"], pub["loop"]
    connect_mallory(pub)
    # One message: a passes nobody on to mallory's peers (mallory is not valid for them), so b and c
    # never dial it and send it none of their own.
    wait_for(lambda: len(mallory.pex) >= 1 and mallory.connected(ids["a"]), 20, "peer exchange from a")
    assert ids["d"] not in ids_of(raw_list(pub))
    assert ids["d"] not in ids_of(loop.run(pub["watcher"].list_peers()))
    for n in "abcp":
        text = nodes[n].get("/api/peers").text
        assert ids["d"] not in text and f":{d_port}" not in text, n
    for entries in mallory.pex:
        assert ids["d"] not in json.dumps(entries) and f":{d_port}" not in json.dumps(entries)
    assert nodes["a"].get("/api/peers").json()["public_stealth_peers"] >= 1  # counted, never named


def test_untrusted_b_is_refused_even_after_forged_and_expired_vouches(pub):
    nodes, ids = pub["nodes"], pub["ids"]
    a, b = nodes["a"], nodes["b"]
    wait_for(lambda: "a-tiny" in [m["id"] for m in b.get("/v1/models").json()["data"]], 20,
             "b to see a's shared model")

    def b_asks_a():
        r = query(b, f"{MARKER} Tell me something.", model="a-tiny", max_tokens=8)
        assert r.status_code == 502, r.text
        assert "not_trusted" in r.text and "not trusted" in r.text, r.text

    b_asks_a()
    # Mallory offers a a forged vouch for b (a's id as issuer, mallory's signature) and an expired one
    # truly signed by a; a takes what trust.exchange offers on link-up and every refresh.
    now = int(time.time())
    key_a = load_identity(pub["homes"]["a"] / "identity.key")
    expired = Attestation.sign(key_a, ids["b"], "full", ttl=60, now=now - 3600)
    unsigned = Attestation(ids["a"], ids["b"], "full", now, now + 86400, uuid.uuid4().hex, b"")
    forged = Attestation(**{**unsigned.__dict__, "signature": pub["mallory_id"].sign(unsigned.signed_bytes())})

    async def offer(ctx, payload):
        return {"attestations": [forged.to_dict(), expired.to_dict()], "revocations": []}

    pub["mallory"].register_handler(TRUST_EXCHANGE, offer)

    def a_has_the_expired_one():
        shown = a.get(f"/api/trust/{ids['b']}").json()
        return shown if any(x["serial"] == expired.serial for x in shown["attestations"]) else None

    shown = wait_for(a_has_the_expired_one, 20, "a to take the statements mallory offers")
    assert shown["verdict"]["valid"] is False
    assert {x["serial"]: x["status"] for x in shown["attestations"]} == {expired.serial: "expired"}
    b_asks_a()
    # A vouch a takes back counts for nothing either.
    assert a.post("/api/trust/vouch", json={"node_id": ids["b"]}).json()["verdict"]["valid"] is True
    assert a.post("/api/trust/revoke", json={"node_id": ids["b"]}).json()["verdict"]["valid"] is False
    b_asks_a()
    assert "serving a remote query" not in a.log()
    # The stranger asking directly is refused the same way, before anything else is looked at.
    from pinkybrain.node.core.sealed import REQUEST, Sealer, new_query_id

    envelope = Sealer(pub["mallory_id"]).seal(ids["a"], REQUEST, {
        "qid": new_query_id(), "ts": time.time(), "model": "a-tiny",
        "messages": [{"role": "user", "content": MARKER}], "settings": {}})
    with pytest.raises(RemoteError) as info:
        pub["loop"].run(pub["mallory"].request(ids["a"], "infer.chat", envelope, timeout=10))
    assert info.value.code == "not_trusted"


def test_a_broke_node_is_refused_with_the_hint(pub):
    c = pub["nodes"]["c"]
    wait_for(lambda: "a-tiny" in [m["id"] for m in c.get("/v1/models").json()["data"]], 20,
             "c to see a's shared model")
    r = query(c, f"{MARKER} Anything.", model="a-tiny", max_tokens=8)
    assert r.status_code == 402, r.text
    assert r.json()["error"] == "insufficient_credit" and EARN_HINT in r.json()["detail"]
    assert c.get("/api/credits").json()["balance"] == 0


def test_a_peer_that_is_not_valid_gets_only_the_handshake_and_trust_exchange(pub, tmp_path):
    """Mallory (valid for nobody) writes public memory, asks a query, and hopes to be passed on by peer
    exchange: all refused, each refusal an operational log line with no content. Trudy and Victor, whom
    a vouches for, see each other in a's peer exchange and never mallory."""
    nodes, ids, loop, mallory = pub["nodes"], pub["ids"], pub["loop"], pub["mallory"]
    a = nodes["a"]
    a_id, m_id = ids["a"], pub["mallory_id"].node_id
    connect_mallory(pub)
    # A genuine public-memory update, as a peer's store would push it.
    from pinkybrain.node.services.memory_store import MemoryStore

    secret_value = f"mallory-wrote-{uuid.uuid4().hex}"
    with MemoryStore.open(tmp_path, "public") as scratch:
        update = scratch.set("board/mallory", secret_value)
    refused = {}
    for method, payload in (("memory.public.update", update), ("memory.public.sync", b"\x00"),
                            ("infer.chat", b"sealed-" + MARKER.encode()), ("mesh.info", None), ("mesh.echo", "x")):
        with pytest.raises(RemoteError) as info:
            loop.run(mallory.request(a_id, method, payload, timeout=10))
        refused[method] = info.value.code
    assert set(refused.values()) == {"not_trusted"}, refused
    assert a.get("/api/memory/board/mallory", params={"network": "public"}).status_code == 404
    # Trust exchange stays open (that is how a vouch for mallory could ever reach a), within a budget.
    assert isinstance(loop.run(mallory.request(a_id, TRUST_EXCHANGE, None, timeout=10)), dict)

    strangers = {name: stranger_mesh(Identity.generate()) for name in ("trudy", "victor")}
    for name, mesh in strangers.items():
        assert a.post("/api/trust/vouch", json={"node_id": mesh.node_id}).json()["verdict"]["valid"], name
        loop.run(mesh.start())
        loop.run(mesh.connect(f"127.0.0.1:{a.port}"))
    trudy, victor = strangers["trudy"], strangers["victor"]
    try:
        seen = wait_for(lambda: [e for msg in trudy.pex for e in msg or [] if e.get("id") == victor.node_id],
                        20, "a to pass victor on to trudy")
        assert seen[0]["url"].endswith(f":{victor.listen_port}/p2p/public")
        assert loop.run(trudy.request(a_id, "mesh.echo", "hi", timeout=10)) == "hi"  # valid: served
        # Trudy, valid, passes on public-memory entries: her own (signed), one mallory signed, one with no
        # signature. a takes the update from a valid peer, but shows only what a valid writer signed.
        from pinkybrain.node.core.signed_memory import sign_entry

        now = time.time()
        entries = {"board/trudy": sign_entry(trudy.identity, "board/trudy", "from trudy", now=now),
                   "board/by-mallory": sign_entry(pub["mallory_id"], "board/by-mallory", secret_value, now=now),
                   "board/unsigned": "no signature"}
        with MemoryStore.open(tmp_path / "trudy", "public") as scratch:
            for key, value in entries.items():
                reply = loop.run(trudy.request(a_id, "memory.public.update", scratch.set(key, value), timeout=10))
                assert reply == {"changed": True}, key
        assert a.get("/api/memory/board/trudy", params={"network": "public"}).json()["value"] == "from trudy"
        for key in ("board/by-mallory", "board/unsigned"):
            assert a.get(f"/api/memory/{key}", params={"network": "public"}).status_code == 404, key
        listed = a.get("/api/memory", params={"network": "public", "prefix": "board/"}).json()["keys"]
        assert "board/trudy" in listed and "board/by-mallory" not in listed and "board/unsigned" not in listed
        passed_on = json.dumps(trudy.pex) + json.dumps(victor.pex)
        assert m_id not in passed_on and ids["b"] not in passed_on  # a finds neither valid
        state = a.get("/api/status").json()["mesh"]["public"]["refused_untrusted"]
        assert state["refused memory.public.update"] >= 1 and state["refused infer.chat"] >= 1
        log = a.log()
        for method in ("memory.public.update", "infer.chat"):
            assert f"refused {method} from {m_id[:7]}: not valid in this node's Web of Trust" in log
        assert secret_value not in log and MARKER not in log and "board/mallory" not in log
    finally:
        for mesh in strangers.values():
            loop.run(mesh.stop(), 15)
            a.post("/api/trust/revoke", json={"node_id": mesh.node_id})


def test_a_peer_that_is_not_valid_is_cut_off_past_its_byte_budget(pub):
    a, loop = pub["nodes"]["a"], pub["loop"]
    flooder = stranger_mesh(Identity.generate())
    loop.run(flooder.start())
    try:
        loop.run(flooder.connect(f"127.0.0.1:{a.port}"))
        a_id = pub["ids"]["a"]
        codes = []
        for _ in range(6):  # the request budget: a burst of 3, then one each 5 s
            try:
                loop.run(flooder.request(a_id, TRUST_EXCHANGE, None, timeout=10))
                codes.append("ok")
            except RemoteError as exc:
                codes.append(exc.code)
        assert codes[:3] == ["ok"] * 3 and "not_trusted" in codes[3:], codes
        blob = b"x" * (512 * 1024)
        for _ in range(8):  # 4 MiB against a 2 MiB budget
            if not flooder.connected(a_id):
                break
            with contextlib.suppress(MeshError):
                loop.run(flooder.request(a_id, "mesh.echo", blob, timeout=10))
        wait_for(lambda: not flooder.connected(a_id), 15, "a to close the flooder's link")
        assert "over the byte budget of a peer that is not valid" in a.log()
    finally:
        loop.run(flooder.stop(), 15)


def test_private_memory_peers_and_models_never_reach_a_public_peer(pub):
    nodes, ids, loop, mallory = pub["nodes"], pub["ids"], pub["loop"], pub["mallory"]
    a_id, p = ids["a"], nodes["p"]
    # Even as a peer a finds valid, mallory finds nothing private on the public mesh.
    assert nodes["a"].post("/api/trust/vouch", json={"node_id": pub["mallory_id"].node_id}).status_code == 200
    seen = []
    try:
        connect_mallory(pub)
        for method, payload in (("mesh.info", None), ("mesh.echo", "x"), (TRUST_EXCHANGE, None),
                                ("memory.public.sync", b"\x00")):
            seen.append(loop.run(mallory.request(a_id, method, payload, timeout=10)))
        for method, payload in (("memory.private.sync", b"\x00"), ("memory.private.update", b"\x00"),
                                ("conversations.list", None), ("infer.chat", b"junk")):
            with pytest.raises(RemoteError) as info:
                loop.run(mallory.request(a_id, method, payload, timeout=10))
            if method != "infer.chat":
                assert info.value.code == "unknown_method", method
            seen.append(str(info.value))
    finally:
        nodes["a"].post("/api/trust/revoke", json={"node_id": pub["mallory_id"].node_id})
    seen.append(mallory.peer(a_id))  # a's hello and status as a public peer sees them
    seen.append(mallory.pex)
    seen.append(nodes["b"].get("/api/peers").json())
    blob = json.dumps(seen, default=lambda v: v.hex() if isinstance(v, bytes) else str(v))
    blob += "".join(x.decode("latin-1") for x in _flatten(seen) if isinstance(x, bytes))
    assert "a-tiny" in blob  # the shared model is public...
    for secret in (PRIVATE_KEY, PRIVATE_VALUE, ids["p"], f":{p.port}", "a-secret-notes", pub["secret"]):
        assert secret not in blob, secret  # ...nothing private is


def test_public_memory_converges_on_the_public_mesh_and_never_mixes_with_private(pub):
    nodes = pub["nodes"]
    a, b, d, p = nodes["a"], nodes["b"], nodes["d"], nodes["p"]
    r = a.post("/api/memory/set", json={"key": "board/notice", "value": {"hello": "public"}, "network": "public"})
    assert r.status_code == 200 and r.json()["network"] == "public"
    # d and a vouch for each other: the key reaches d. a does not find b valid: it never reaches b.
    wait_for(lambda: d.get("/api/memory/board/notice", params={"network": "public"}).status_code == 200,
             30, "the public key on d")
    assert d.get("/api/memory/board/notice", params={"network": "public"}).json()["value"] == {"hello": "public"}
    time.sleep(2)  # a push reaches a linked peer that a finds valid within this; b is linked too
    assert b.get("/api/memory/board/notice", params={"network": "public"}).status_code == 404
    # The two documents stay apart on both nodes: public keys are not private ones and vice versa.
    assert a.get("/api/memory/board/notice").status_code == 404
    assert d.get("/api/memory/board/notice").status_code == 404
    assert PRIVATE_KEY not in a.get("/api/memory", params={"network": "public"}).json()["keys"]
    assert PRIVATE_KEY not in d.get("/api/memory", params={"network": "public"}).json()["keys"]
    # p is only on the private network: it has no public memory to read or write.
    r = p.get("/api/memory", params={"network": "public"})
    assert r.status_code == 409 and "mesh join" in r.json()["detail"]


def _flatten(value):
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _flatten(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _flatten(item)
    else:
        yield value


def test_no_public_query_text_is_written_anywhere(pub):
    nodes = pub["nodes"]
    needle = MARKER.encode()
    scanned = 0
    paths = [pub["tracker"].log_path] + [p for home in pub["homes"].values() for p in Path(home).rglob("*")]
    for path in paths:
        if path.is_file() and not path.is_symlink():
            scanned += 1
            assert needle not in path.read_bytes(), f"the marker was written to {path}"
    assert scanned > 20
    for node in nodes.values():
        with node.client() as c:
            assert c.post("/api/conversations/search", params={"q": MARKER}).json()["count"] == 0
            # No query in this module was private, so no node holds a conversation at all.
            assert c.get("/api/conversations").json()["count"] == 0


def test_leave_withdraws_the_record_and_closes_public_links(pub):
    nodes, ids = pub["nodes"], pub["ids"]
    c = nodes["c"]
    r = c.post("/api/network/mesh/leave")
    assert r.status_code == 200 and r.json()["left"] is True, r.text
    assert ids["c"] not in ids_of(raw_list(pub))
    for n in "ab":
        wait_for(lambda n=n: ids["c"] not in public_ids(nodes[n]), 15, f"{n} to lose its link to c")
    state = c.get("/api/status").json()["mesh"]["public"]
    assert state["joined"] is False and state["peers"] == 0
    assert c.get("/api/peers").json()["public"] == []
    assert c.post("/api/network/mesh/leave").json()["left"] is False
