"""Credit a server checks itself: cheating askers against honest servers, all on 127.0.0.1.

Two honest servers (real nodes sharing the real default model, credit.initial_balance 2, one credit a
query) and an honest asker (a real node) meet through a real tracker. Two cheaters (in-process public-mesh
clients, Sybil identities of one attacker) run a patched client: their own credit check is switched off
and their configured initial balance is a million credits. Both servers vouch for all of them, so the
Web of Trust is no obstacle: only the servers' credit lines (credits.CREDIT_LINE_RULE) stand in the way.

Checked: each cheater gets exactly its line from each server and then `payment_refused`, so the total it
takes is the README's bound (the sum of the honest servers' initial_balance per identity, times the number
of identities), while the honest asker's query still goes through and is paid by a dual-signed receipt.
"""

from __future__ import annotations

import time

import pytest
from test_public_mesh import FAST, Loop, stranger_mesh, wait_for
from test_tracker import start_tracker

from model import DEFAULT_NAME, place_default_model
from nodes import free_port, start_node
from pinkybrain.node.core.credits import CREDIT_LINE_RULE, Ledger, Receipt, response_digest
from pinkybrain.node.core.identity import Identity
from pinkybrain.node.core.sealed import REPLY, REQUEST, Sealer, new_query_id
from pinkybrain.node.services.ledger_store import LedgerStore
from pinkybrain.node.services.mesh import RemoteError

SERVER_LINE = 2.0  # the honest servers' credit.initial_balance
PRICE = 1.0  # credit.earn_per_query
CHEATER_BALANCE = 1_000_000.0
TRIES = 4  # queries each cheater sends each server: twice its line


class Cheater:
    """A patched public-mesh client: signs commitments it cannot back and keeps what it is given."""

    def __init__(self, home, loop: Loop):
        self.identity = Identity.generate()
        self.mesh = stranger_mesh(self.identity)
        self.ledger = LedgerStore.open(home, self.identity.node_id, CHEATER_BALANCE)
        self.sealer = Sealer(self.identity)
        self.loop = loop
        self.answers: dict[str, int] = {}
        self.refusals: dict[str, list[str]] = {}

    def ask(self, server: str) -> None:
        commitment = self.ledger.commit_payment(self.identity, server, PRICE, ttl=300)
        qid = new_query_id()
        envelope = self.sealer.seal(server, REQUEST, {
            "qid": qid, "ts": time.time(), "model": DEFAULT_NAME, "commitment": commitment.to_dict(),
            "messages": [{"role": "user", "content": "Say yes."}],
            "settings": {"max_tokens": 2, "temperature": 0.0, "top_p": 1.0}})
        try:
            reply = self.loop.run(self.mesh.request(server, "infer.chat", envelope, timeout=120), timeout=130)
        except RemoteError as exc:
            self.refusals.setdefault(server, []).append(f"{exc.code}: {exc}")
            return
        body = self.sealer.open(reply, REPLY, sender=server).body
        receipt = Receipt.from_dict(body["receipt"])
        receipt.check()  # what the cheater gained is proven by the server's own signature
        assert receipt.query_id == commitment.query_id and receipt.response_sha256 == response_digest(body["text"])
        self.answers[server] = self.answers.get(server, 0) + 1


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    root = tmp_path_factory.mktemp("credit")
    tracker = start_tracker(root / "tracker.log")
    loop = Loop()
    common = {**FAST, "p2p.tracker": tracker.url, "credit.earn_per_query": PRICE}
    nodes, cheaters = {}, []
    try:
        for name in ("s1", "s2"):
            place_default_model(root / name / "shared_models")
            nodes[name] = start_node(root / name, port=free_port(),
                                     extra={**common, "credit.initial_balance": SERVER_LINE})
        nodes["h"] = start_node(root / "h", port=free_port(), extra={**common, "credit.initial_balance": 10.0})
        ids = {n: node.get("/api/ping").json()["node_id"] for n, node in nodes.items()}
        for name in ("s1", "s2"):
            with nodes[name].client() as c:
                c.timeout = 180  # reading the real model's GGUF header takes seconds of CPU, more when busy
                assert c.post(f"/api/models/{DEFAULT_NAME}/share").status_code == 200
        cheaters = [Cheater(root / f"cheater{i}", loop) for i in range(2)]
        for server in ("s1", "s2"):
            for who in [ids["h"]] + [c.identity.node_id for c in cheaters]:
                assert nodes[server].post("/api/trust/vouch", json={"node_id": who}).status_code == 200
            assert nodes["h"].post("/api/trust/vouch", json={"node_id": ids[server]}).status_code == 200
        for node in nodes.values():
            assert node.post("/api/network/mesh/join").status_code == 200
        for cheater in cheaters:
            loop.run(cheater.mesh.start())
            for server in ("s1", "s2"):
                loop.run(cheater.mesh.connect(f"127.0.0.1:{nodes[server].port}"))
        yield {"nodes": nodes, "ids": ids, "cheaters": cheaters}
    finally:
        for cheater in cheaters:
            loop.run(cheater.mesh.stop(), 15)
            cheater.ledger.close()
        loop.close()
        for node in nodes.values():
            node.stop()
        tracker.stop()


def test_cheaters_take_no_more_than_the_bound_and_an_honest_asker_is_served(market, monkeypatch):
    nodes, ids, cheaters = market["nodes"], market["ids"], market["cheaters"]
    servers = [ids["s1"], ids["s2"]]
    # The patch: the cheater's own software never checks whether it can pay.
    monkeypatch.setattr(Ledger, "require_credit", lambda self, amount, now: None)
    before = {s: nodes[s].get("/api/credits").json()["balance"] for s in ("s1", "s2")}
    for cheater in cheaters:
        for server in servers:
            for _ in range(TRIES):
                cheater.ask(server)

    per_identity_bound = SERVER_LINE * len(servers)  # the README's bound: sum of the servers' lines
    for cheater in cheaters:
        gained = sum(cheater.answers.values()) * PRICE
        assert gained <= per_identity_bound
        for server in servers:
            # Exactly its line from each server, then refused by the server's own check.
            assert cheater.answers.get(server, 0) == SERVER_LINE / PRICE, cheater.refusals
            refusals = cheater.refusals[server]
            assert len(refusals) == TRIES - SERVER_LINE / PRICE
            assert all(r.startswith("payment_refused") and "credit line" in r for r in refusals), refusals
    total = sum(sum(c.answers.values()) for c in cheaters) * PRICE
    assert total == per_identity_bound * len(cheaters)  # S identities: S times the bound, no more
    assert "S times" in CREDIT_LINE_RULE and "initial_balance" in CREDIT_LINE_RULE
    for s in ("s1", "s2"):  # what the servers did is what their ledgers say they are owed
        after = nodes[s].get("/api/credits").json()
        assert after["balance"] == pytest.approx(before[s] + SERVER_LINE * len(cheaters))

    # The honest asker, with its own line untouched at both servers, is served and pays by receipt.
    h = nodes["h"]
    wait_for(lambda: DEFAULT_NAME in [m["id"] for m in h.get("/v1/models").json()["data"]], 30,
             "h to see the servers' model")
    with h.client() as c:
        c.timeout = 180
        r = c.post("/api/query", json={"prompt": "Say hello.", "mode": "single", "model": DEFAULT_NAME,
                                       "max_tokens": 4})
    assert r.status_code == 200, r.text
    (answer,) = r.json()["answers"]
    assert answer["node"] in servers
    credits = h.get("/api/credits?receipts=5").json()
    assert credits["balance"] == pytest.approx(10.0 - PRICE)
    (receipt,) = credits["latest_receipts"]
    assert receipt["commitment"]["server"] == answer["node"] and receipt["success"] is True
