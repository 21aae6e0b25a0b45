"""Remote inference: the sealed envelope (pure), then three real node processes on 127.0.0.1.

A has no model, B and C hold the embedded default model and share it, B's resource guard has paused
sharing. Queries on A are served by C (the answer says so), streaming works through A, B is skipped
while paused and refuses when asked directly, C refuses anything it does not share (unshared files,
path tricks, its cloud model), envelopes that are tampered with, misaddressed or replayed are refused,
and no prompt text reaches a log or the serving node's conversation store. Then B resumes, the node
serving a long query is killed mid-query and A fails over to the other within a bound, and a stream whose
last peer dies ends with a clear error event.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import pytest
import yaml

from model import DEFAULT_NAME, place_default_model, write_tiny_gguf
from nodes import free_port, query_events, start_node, strong_secret
from pinkybrain.node.core.identity import Identity
from pinkybrain.node.core.sealed import CHUNK, REPLY, REQUEST, ReplayGuard, Sealer, SealError, new_query_id
from pinkybrain.node.services.mesh import Mesh, MeshSettings, RemoteError

FAST = {"p2p.heartbeat_secs": 0.5, "p2p.dead_after_secs": 2.0}
MARKER = "zanzibar-quokka-7731"  # in every prompt: must never appear in a log
BOUND_SECS = 60  # failover or a clear error within this (a bound, not a speed target)
# Greedy decoding, so the long answer the failover tests need is long every time.
COUNTER = {"counter": {"description": "Counts, deterministically.", "system_prompt": "You count numbers.",
                       "temperature": 0.0, "top_p": 1.0, "max_tokens": 200}}
LONG_PROMPT = f"{MARKER} Count from 1 to 300, one number per line."


# -- the envelope, pure ------------------------------------------------------------------------------
def test_sealed_request_opens_only_for_its_recipient_and_names_the_sender():
    alice, bob, carol = Identity.generate(), Identity.generate(), Identity.generate()
    body = {"qid": new_query_id(), "ts": time.time(), "messages": [{"role": "user", "content": MARKER}]}
    envelope = Sealer(alice).seal(bob.node_id, REQUEST, body)
    assert MARKER.encode() not in envelope  # a relay sees ciphertext only
    opened = Sealer(bob).open(envelope, REQUEST, sender=alice.node_id)
    assert (opened.sender, opened.body) == (alice.node_id, body)
    with pytest.raises(SealError) as info:
        Sealer(carol).open(envelope, REQUEST)
    assert info.value.code == "wrong_recipient"
    with pytest.raises(SealError) as info:
        Sealer(bob).open(envelope, REPLY)  # a request passed off as a reply
    assert info.value.code == "malformed"
    with pytest.raises(SealError) as info:
        Sealer(bob).open(envelope, REQUEST, sender=carol.node_id)
    assert info.value.code == "unexpected_sender"


def test_tampered_envelopes_are_refused():
    alice, bob = Identity.generate(), Identity.generate()
    envelope = Sealer(alice).seal(bob.node_id, REQUEST, {"x": 1})
    for index in (1, 10, 50, 100, len(envelope) - 1):  # kind, sender key, recipient key, signature, box
        altered = bytearray(envelope)
        altered[index] ^= 0x01
        with pytest.raises(SealError) as info:
            Sealer(bob).open(bytes(altered), REQUEST)
        assert info.value.code in ("malformed", "wrong_recipient", "bad_signature"), index
    with pytest.raises(SealError):
        Sealer(bob).open(envelope[:-5], REQUEST)
    with pytest.raises(SealError) as info:
        Sealer(bob).open(b"\x01\x01" + b"\x00" * 200, REQUEST)
    assert info.value.code in ("wrong_recipient", "bad_signature")


def test_a_box_re_signed_by_someone_else_is_refused():
    alice, bob, mallory = Identity.generate(), Identity.generate(), Identity.generate()
    envelope = Sealer(alice).seal(bob.node_id, CHUNK, {"text": "hi"})
    # Mallory keeps Alice's box but signs it as her own: the signature is valid, the box is not hers.
    from pinkybrain.node.core.sealed import _HEAD, _signed_part

    _, kind, _, recipient, _ = _HEAD.unpack_from(envelope)
    box = envelope[_HEAD.size :]
    forged_sig = mallory.sign(_signed_part(kind, mallory.public_key, recipient, box))
    forged = _HEAD.pack(1, kind, mallory.public_key, recipient, forged_sig) + box
    with pytest.raises(SealError) as info:
        Sealer(bob).open(forged, CHUNK)
    assert info.value.code == "tampered"
    # Alice's key with Mallory's signature does not verify.
    swapped = _HEAD.pack(1, kind, alice.public_key, recipient, forged_sig) + box
    with pytest.raises(SealError) as info:
        Sealer(bob).open(swapped, CHUNK)
    assert info.value.code == "bad_signature"


def test_replay_guard_refuses_repeats_stale_requests_and_bounds_memory():
    guard = ReplayGuard(window_secs=60, max_entries=3)
    qid = new_query_id()
    guard.check("alice", qid, 1000.0, now=1000.0)
    with pytest.raises(SealError) as info:
        guard.check("alice", qid, 1000.0, now=1001.0)
    assert info.value.code == "replay"
    guard.check("bob", qid, 1000.0, now=1001.0)  # ids are per sender
    for ts in (900.0, 1100.0):
        with pytest.raises(SealError) as info:
            guard.check("alice", new_query_id(), ts, now=1000.0)
        assert info.value.code == "stale"
    guard.check("alice", new_query_id(), 1001.0, now=1001.0)
    with pytest.raises(SealError) as info:
        guard.check("alice", new_query_id(), 1001.0, now=1001.0)
    assert info.value.code == "busy"
    # Once out of the window an id is forgotten, and its request would be stale anyway.
    with pytest.raises(SealError) as info:
        guard.check("alice", qid, 1000.0, now=1061.0)
    assert info.value.code == "stale"
    guard.check("alice", new_query_id(), 1062.0, now=1062.0)
    assert len(guard) == 1
    with pytest.raises(SealError):
        guard.check("alice", "short", 1061.0, now=1061.0)


# -- peer choice and failover, against a stand-in mesh ------------------------------------------------------
class FakeMesh:
    """Peers as `mesh.peer()` describes them; `replies[peer]` is what a call to that peer does."""

    def __init__(self):
        self.views: dict[str, dict] = {}
        self.replies: dict[str, object] = {}
        self.calls: list[str] = []

    def register_handler(self, name, handler):
        pass

    def peer_ids(self):
        return list(self.views)

    def peer(self, peer_id):
        return self.views.get(peer_id)

    async def request(self, peer_id, name, payload, *, timeout):
        self.calls.append(peer_id)
        reply = self.replies[peer_id]
        if isinstance(reply, BaseException):
            raise reply
        return await reply(payload)

    def stream(self, peer_id, name, payload, *, timeout):
        self.calls.append(peer_id)
        return FakeStream(self.replies[peer_id], payload)


class FakeStream:
    def __init__(self, script, payload):
        self.script, self.payload, self.items = script, payload, None

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.items is None:
            self.items = iter(await self.script(self.payload))
        item = next(self.items, None)
        if item is None:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item


def signed_entry(owner: Identity, name: str, **changes) -> dict:
    from pinkybrain.node.services.models import entry_bytes

    entry = {"name": name, "file": f"{name}.gguf", "size_bytes": 1, "sha256": "0" * 64, "owner": owner.node_id,
             "signed_at": 1}
    entry["signature"] = owner.sign(entry_bytes(entry)).hex()
    return {**entry, **changes}


def view(peer: Identity, entries: list[dict], *, cpu=10.0, ram=40.0, latency=1.0, paused=False) -> dict:
    return {"node_id": peer.node_id, "name": peer.node_id[:5], "latency_ms": latency, "models": entries,
            "load": {"cpu_percent": cpu, "ram_percent": ram}, "sharing": not paused,
            "guard": {"sharing_paused": paused, "reason": "RAM 99% > 85%" if paused else None}}


def remote_service(mesh: FakeMesh, timeout: float = 5.0):
    from types import SimpleNamespace

    from pinkybrain.node.services.remote import RemoteInference

    me = Identity.generate()
    runtime = SimpleNamespace(mesh=mesh, identity=me, cfg={"p2p.remote_timeout_secs": timeout})
    return RemoteInference(runtime), me


def serving(peer: Identity, asker: Identity, pieces: list[str] | None = None, fail_after: BaseException | None = None):
    """A peer that answers properly: opens the request, seals the reply (or stream pieces) to the asker."""
    sealer = Sealer(peer)

    async def reply(payload):
        body = sealer.open(payload, REQUEST, sender=asker.node_id).body
        if pieces is None:
            return sealer.seal(asker.node_id, REPLY, {"qid": body["qid"], "text": f"from {peer.node_id[:5]}",
                                                      "usage": {"completion_tokens": 3}})
        out = [sealer.seal(asker.node_id, CHUNK, {"qid": body["qid"], "seq": i, "text": t})
               for i, t in enumerate(pieces)]
        if fail_after is not None:
            return [*out, fail_after]
        return [*out, sealer.seal(asker.node_id, CHUNK, {"qid": body["qid"], "seq": len(pieces), "done": True})]

    return reply


def test_candidates_skip_paused_forged_and_relayed_entries_and_rank_by_load_and_latency():
    mesh = FakeMesh()
    busy, idle, far, paused, forger, relay = (Identity.generate() for _ in range(6))
    mesh.views = {
        busy.node_id: view(busy, [signed_entry(busy, "m")], cpu=95, latency=0.5),
        idle.node_id: view(idle, [signed_entry(idle, "m"), signed_entry(idle, "m-large")], cpu=5, latency=2),
        far.node_id: view(far, [signed_entry(far, "m")], cpu=5, latency=400),
        paused.node_id: view(paused, [signed_entry(paused, "m")], paused=True),
        forger.node_id: view(forger, [signed_entry(forger, "m", size_bytes=2)]),  # altered after signing
        relay.node_id: view(relay, [signed_entry(idle, "m")]),  # someone else's entry, passed along
    }
    remote, _ = remote_service(mesh)
    ranked = remote.candidates("m")
    assert [c.peer_id for c in ranked] == [idle.node_id, far.node_id, busy.node_id]
    assert ranked[0].exact and "cpu 5%" in ranked[0].reasons
    pattern = remote.candidates("m*")
    assert {(c.peer_id, c.model) for c in pattern} == {
        (idle.node_id, "m"), (idle.node_id, "m-large"), (far.node_id, "m"), (busy.node_id, "m")}
    assert pattern[0].peer_id == idle.node_id and not any(c.exact for c in pattern)
    assert remote.model_names() == ["m", "m-large"]
    assert remote.candidates("other") == []


def test_chat_fails_over_and_reports_every_attempt():
    from pinkybrain.node.services.mesh import PeerGone, RpcTimeout
    from pinkybrain.node.services.remote import RemoteFailed

    mesh = FakeMesh()
    first, second, third = (Identity.generate() for _ in range(3))
    mesh.views = {p.node_id: view(p, [signed_entry(p, "m")], latency=i) for i, p in enumerate((first, second, third))}
    remote, me = remote_service(mesh)
    mesh.replies = {first.node_id: RemoteError("busy", "sharing is paused: RAM"),
                    second.node_id: PeerGone("peer went away"),
                    third.node_id: serving(third, me)}
    settings = {"max_tokens": 4, "temperature": 0.0, "top_p": 1.0}
    result = asyncio.run(remote.chat("m", [{"role": "user", "content": "hi"}], **settings))
    assert (result.node, result.model, result.text) == (third.node_id, "m", f"from {third.node_id[:5]}")
    assert [a["error"] for a in result.attempts] == ["busy", "peer_gone"]
    assert mesh.calls == [first.node_id, second.node_id, third.node_id]

    mesh.replies[third.node_id] = RpcTimeout("infer.chat timed out")
    with pytest.raises(RemoteFailed) as info:
        asyncio.run(remote.chat("m", [{"role": "user", "content": "hi"}], **settings))
    assert [a["error"] for a in info.value.attempts] == ["busy", "peer_gone", "timeout"]
    assert "no peer could run model 'm'" in str(info.value) and "busy: sharing is paused" in str(info.value)
    with pytest.raises(RemoteFailed, match="no connected peer shares model 'nope'"):
        asyncio.run(remote.chat("nope", [{"role": "user", "content": "hi"}], **settings))
    # A reply sealed by someone else than the peer asked is refused like any failure.
    mesh.replies[third.node_id] = serving(first, me)
    with pytest.raises(RemoteFailed) as info:
        asyncio.run(remote.chat("m", [{"role": "user", "content": "hi"}], **settings))
    assert info.value.attempts[-1]["error"] == "bad_reply"


def test_stream_fails_over_before_the_first_piece_and_breaks_clearly_after_it():
    from pinkybrain.node.services.mesh import PeerGone
    from pinkybrain.node.services.remote import StreamBroken

    mesh = FakeMesh()
    first, second = Identity.generate(), Identity.generate()
    mesh.views = {p.node_id: view(p, [signed_entry(p, "m")], latency=i) for i, p in enumerate((first, second))}
    remote, me = remote_service(mesh)
    settings = {"max_tokens": 4, "temperature": 0.0, "top_p": 1.0}

    async def collect(meta):
        return [p async for p in remote.stream("m", [{"role": "user", "content": "hi"}], meta=meta, **settings)]

    mesh.replies = {first.node_id: serving(first, me, [], fail_after=PeerGone("gone")),
                    second.node_id: serving(second, me, ["a", "b", "c"])}
    meta: dict = {}
    assert asyncio.run(collect(meta)) == ["a", "b", "c"]
    assert meta["node"] == second.node_id and [a["error"] for a in meta["attempts"]] == ["peer_gone"]

    mesh.replies[first.node_id] = serving(first, me, ["x", "y"], fail_after=PeerGone("gone"))
    got: list[str] = []

    async def partial():
        async for p in remote.stream("m", [{"role": "user", "content": "hi"}], **settings):
            got.append(p)

    with pytest.raises(StreamBroken, match="broke off after 2 pieces"):
        asyncio.run(partial())
    assert got == ["x", "y"]  # no failover once pieces were passed on: they cannot be taken back


# -- three real nodes ------------------------------------------------------------------------------------
def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def peers_of(node) -> dict:
    return {p["node_id"]: p for p in node.get("/api/peers").json()["peers"]}


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    secret = strong_secret()
    ports = {name: free_port() for name in "abc"}
    url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    homes = {name: tmp_path_factory.mktemp(f"remote-{name}") for name in "abc"}
    common = {**FAST, "inference.n_ctx": 1024, "p2p.remote_timeout_secs": 90, "specialists.profiles": COUNTER}
    place_default_model(homes["c"] / "shared_models")
    place_default_model(homes["b"] / "shared_models")
    write_tiny_gguf(homes["c"] / "shared_models" / "private-notes.gguf")  # on disk, never shared
    nodes = {}
    try:
        nodes["c"] = start_node(homes["c"], port=ports["c"], secret=secret, extra={
            **common, "cloud.models": [{"name": "c-cloud", "provider": "openai", "model": "gpt-4o-mini",
                                        "api_key_env": "PB_TEST_KEY_THAT_IS_NOT_SET"}]})
        nodes["b"] = start_node(homes["b"], port=ports["b"], secret=secret, extra={
            **common, "p2p.peers": [url["c"]], "resource_guard.ram_threshold": 1,
            "resource_guard.sustain_secs": 0.3, "resource_guard.sample_secs": 0.1,
            "resource_guard.cooldown_secs": 1})
        nodes["a"] = start_node(homes["a"], port=ports["a"], secret=secret,
                                extra={**common, "p2p.peers": [url["b"], url["c"]]})
        ids = {name: n.get("/api/ping").json()["node_id"] for name, n in nodes.items()}
        for name in "bc":
            r = nodes[name].post(f"/api/models/{DEFAULT_NAME}/share")
            assert r.status_code == 200, r.text
        wait_for(lambda: nodes["b"].get("/api/status").json()["resource_guard"]["sharing_paused"], 20,
                 "b's guard to pause sharing")

        def a_sees_them():
            peers = peers_of(nodes["a"])
            c, b = peers.get(ids["c"]), peers.get(ids["b"])
            return (c and b and c["shared_models"] == [DEFAULT_NAME] and b["guard"]["sharing_paused"]
                    and b["shared_models"] == [])

        wait_for(a_sees_them, 30, "a to see c's shared model and b paused")
        yield {"nodes": nodes, "ids": ids, "secret": secret}
    finally:
        for node in nodes.values():
            node.stop()


def query(node, prompt: str, **kw):
    with node.client() as c:
        c.timeout = 180
        return c.post("/api/query", json={"prompt": prompt, "mode": "single", **kw})


def test_a_query_on_a_is_served_by_c_and_says_so(net):
    a, b, c = (net["nodes"][n] for n in "abc")
    ids = net["ids"]
    for i in range(2):  # b shares the model too, but its guard has paused sharing: never b
        r = query(a, f"{MARKER} Say hello in one word. ({i})", max_tokens=6)
        assert r.status_code == 200, r.text
        result = r.json()
        assert result["node"] == ids["a"]  # the node that ran the query...
        (answer,) = result["answers"]
        assert answer["node"] == ids["c"] and answer["model"] == DEFAULT_NAME  # ...and who answered it
        assert answer["text"].strip() and not result["errors"]
    # A multi-specialist mode: every call goes to c.
    r = query(a, f"{MARKER} Is water wet?", mode="vote", specialists=["factchecker", "skeptic"], max_tokens=6)
    assert r.status_code == 200, r.text
    assert {(x["node"], x["model"]) for x in r.json()["answers"]} == {(ids["c"], DEFAULT_NAME)}
    guard_b = b.get("/api/status").json()["resource_guard"]
    assert guard_b["sharing_paused"] is True and "RAM" in guard_b["reason"]
    assert peers_of(a)[ids["b"]]["guard"]["sharing_paused"] is True
    assert "serving a remote" not in b.log() and "serving a remote query" in c.log()
    # /v1/models on a lists the model it can reach through c.
    assert DEFAULT_NAME in [m["id"] for m in a.get("/v1/models").json()["data"]]


def test_streaming_through_a(net):
    a = net["nodes"]["a"]
    events = query_events(a, {"prompt": f"{MARKER} Count from 1 to 20, separated by commas.", "mode": "single", "max_tokens": 12})
    kinds = [e for e, _ in events]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("token") >= 2, events
    start, end = events[0][1], events[-1][1]
    assert start["model"] == DEFAULT_NAME and start["remote"] is True
    assert end["node"] == net["ids"]["c"] and end["model"] == DEFAULT_NAME
    assert end["answer"] == "".join(d["text"] for e, d in events if e == "token").strip()


def test_unshared_and_cloud_models_are_never_served(net):
    a, c = net["nodes"]["a"], net["nodes"]["c"]
    view = peers_of(a)[net["ids"]["c"]]
    assert view["shared_models"] == [DEFAULT_NAME]  # not the unshared file, not the cloud model
    names = {m["name"] for m in c.get("/api/models").json()["models"]}
    assert {"private-notes", "c-cloud", DEFAULT_NAME} <= names  # c has them, it only does not share them
    for model in ("private-notes", "c-cloud", "../shared_models/private-notes"):
        r = query(a, f"{MARKER} hello", model=model, max_tokens=4)
        assert r.status_code == 502 and r.json()["error"] == "no_answer", r.text
        detail = r.json()["detail"]
        assert f"no model {model!r}; available: {DEFAULT_NAME} (on a peer)" in detail, detail


def test_serving_side_checks_when_asked_directly(net):
    """A client in this process links to c and b itself and sends hand-made envelopes."""
    b, c = net["nodes"]["b"], net["nodes"]["c"]
    ids = net["ids"]

    async def scenario():
        me = Identity.generate()
        sealer = Sealer(me)
        mesh = Mesh(me, net["secret"], name="probe", version="test", listen_host="127.0.0.1",
                    listen_port=free_port(), stealth=True,
                    settings=MeshSettings(heartbeat_secs=0.5, dead_after_secs=2.0))
        try:
            await mesh.connect(c.url)
            await mesh.connect(b.url)

            def envelope(model, to=ids["c"], max_tokens=2, **extra):
                body = {"qid": new_query_id(), "ts": time.time(), "model": model,
                        "messages": [{"role": "user", "content": f"{MARKER} hi"}],
                        "settings": {"max_tokens": max_tokens, "temperature": 0.0, "top_p": 1.0}, **extra}
                return sealer.seal(to, REQUEST, body)

            async def refused(payload, node=ids["c"], method="infer.chat"):
                with pytest.raises(RemoteError) as info:
                    await mesh.request(node, method, payload, timeout=30)
                return info.value.code

            good = envelope(DEFAULT_NAME)
            reply = await mesh.request(ids["c"], "infer.chat", good, timeout=60)
            body = sealer.open(reply, REPLY, sender=ids["c"]).body
            assert body["node"] == ids["c"] and body["model"] == DEFAULT_NAME and isinstance(body["text"], str)
            assert await refused(good) == "replay"
            for model in ("private-notes", "private-notes.gguf", "c-cloud", "../shared_models/private-notes",
                          "/etc/passwd", ""):
                code = await refused(envelope(model))
                assert code == ("invalid_request" if model == "" else "not_shared"), model
                assert await refused(envelope(model), method="infer.stream") in ("not_shared", "invalid_request")
            assert await refused(envelope(DEFAULT_NAME, to=ids["a"])) == "wrong_recipient"
            tampered = bytearray(envelope(DEFAULT_NAME))
            tampered[-3] ^= 0x40
            assert await refused(bytes(tampered)) == "bad_signature"
            assert await refused({"model": DEFAULT_NAME, "prompt": "plain"}) == "malformed"
            assert await refused(envelope(DEFAULT_NAME, max_tokens=0)) == "invalid_request"
            old = sealer.seal(ids["c"], REQUEST, {"qid": new_query_id(), "ts": time.time() - 3600,
                                                  "model": DEFAULT_NAME, "messages": [], "settings": {}})
            assert await refused(old) == "stale"
            # b has the model and shares it, but its guard has paused sharing.
            assert await refused(envelope(DEFAULT_NAME, to=ids["b"]), node=ids["b"]) == "busy"
            # A stream straight from c, opened piece by piece.
            pieces = []
            async with mesh.stream(ids["c"], "infer.stream", envelope(DEFAULT_NAME, max_tokens=6),
                                   timeout=60) as chunks:
                async for raw in chunks:
                    pieces.append(sealer.open(raw, CHUNK, sender=ids["c"]).body)
            assert [p["seq"] for p in pieces] == list(range(len(pieces))) and pieces[-1]["done"]
        finally:
            await mesh.stop()

    asyncio.run(asyncio.wait_for(scenario(), 120))


def test_no_prompt_text_in_logs_and_nothing_kept_by_the_serving_node(net):
    a, b, c = (net["nodes"][n] for n in "abc")
    for node in (a, b, c):
        assert MARKER not in node.log()
        assert "Traceback" not in node.log()
    # The asker keeps its conversations; the serving node keeps nothing of them.
    assert c.get("/api/conversations").json()["count"] == 0
    assert a.get("/api/conversations").json()["count"] >= 3


def test_killing_the_serving_peer_mid_query_fails_over_within_a_bound(net):
    a, b, c = (net["nodes"][n] for n in "abc")
    ids = net["ids"]
    cfg = yaml.safe_load(b.config_path.read_text())
    cfg["resource_guard"]["ram_threshold"] = 100
    b.config_path.write_text(yaml.safe_dump(cfg))
    b.proc.send_signal(signal.SIGHUP)  # b resumes sharing after its 1 s cooldown

    def b_serves():
        peer = peers_of(a).get(ids["b"])
        return peer and not peer["guard"]["sharing_paused"] and peer["shared_models"] == [DEFAULT_NAME]

    wait_for(b_serves, 30, "a to see b sharing again")
    before = {n: net["nodes"][n].log().count("serving a remote query") for n in "bc"}
    finished = {n: net["nodes"][n].log().count("served a remote query") for n in "bc"}
    out = {}

    def ask():
        out["response"] = query(a, LONG_PROMPT, specialist="counter")

    asker = threading.Thread(target=ask)
    asker.start()
    serving = wait_for(lambda: next((n for n in "bc" if net["nodes"][n].log().count("serving a remote query")
                                     > before[n]), None), 30, "a peer to start serving")
    killed_at = time.monotonic()
    net["nodes"][serving].stop(signal.SIGKILL)
    print(f"killed {serving} while it served")
    asker.join(BOUND_SECS + 30)
    assert not asker.is_alive()
    survivor = "c" if serving == "b" else "b"
    assert time.monotonic() - killed_at < BOUND_SECS
    print(f"answered {time.monotonic() - killed_at:.1f}s after the kill")
    r = out["response"]
    assert r.status_code == 200, r.text
    (answer,) = r.json()["answers"]
    assert answer["node"] == ids[survivor] and answer["model"] == DEFAULT_NAME and answer["text"].strip()
    assert answer["tokens"] > 50
    # The killed node had started and not finished: the answer came from the failover, not from it.
    assert net["nodes"][serving].log().count("served a remote query") == finished[serving]
    net["killed"] = serving
    assert f"remote {DEFAULT_NAME} on {ids[serving][:7]} failed (peer_gone)" in a.log()


def test_a_stream_whose_last_peer_dies_ends_with_a_clear_error(net):
    a = net["nodes"]["a"]
    survivor = net["nodes"]["c" if net.get("killed") == "b" else "b"]
    killed = {}

    def on_event(event, _data):
        if event == "token" and not killed:
            killed["at"] = time.monotonic()
            survivor.stop(signal.SIGKILL)

    events = query_events(a, {"prompt": LONG_PROMPT, "specialist": "counter"}, on_event)
    assert killed, "no token arrived before the stream ended"
    assert time.monotonic() - killed["at"] < BOUND_SECS
    kind, data = events[-1]
    assert kind == "error" and "broke off" in data["detail"] and "incomplete" in data["detail"], events[-3:]
    # With no peer left sharing it, a query is a clear error at once.
    started = time.monotonic()
    r = query(a, f"{MARKER} hello", max_tokens=4)
    assert r.status_code == 502 and "no usable model" in r.json()["detail"], r.text
    assert "link to a peer that shares one" in r.json()["detail"]
    assert time.monotonic() - started < 10
    assert MARKER not in a.log()
