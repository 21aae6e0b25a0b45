"""Split lending to the public mesh (node/split/public.py), with a real tracker and real nodes on 127.0.0.1.

    L  lends: sharing.split and sharing.split_public on, credit.earn_per_split 2, credit.initial_balance 3
       (so a stranger's credit line here is one lend), on the public mesh and on a private mesh.
    O  sharing.split on, sharing.split_public off (the default), on the public mesh.
Public borrowers are in-process public-mesh clients with their own ledgers (real commitments and
receipts): V and W are vouched for by L and O, S is vouched for by nobody. P is a member of L's private
mesh (it holds the network secret).

Checked: V pays by commitment and reaches L's rpc-server (its HELLO answered) through a public tunnel,
with the receipt recorded on both sides and the balances moved by exactly the price; L advertises public
lending and O does not; S (not valid) and everyone at O are refused, and no rpc-server starts for them;
a borrower past its credit line at L, or paying less than the price, is refused before any rpc-server
starts; a borrower whose own ledger cannot back the price never sends a tunnel; P borrows free, from an
rpc-server of its own (not a public one); a marker sent in every public open is in no file under L's or
O's home.
"""

from __future__ import annotations

import json
import struct
import uuid

import psutil
import pytest
from test_public_mesh import FAST, Loop, stranger_mesh, wait_for
from test_tracker import start_tracker

from nodes import free_port, start_node, strong_secret
from pinkybrain.node.core.credits import EARN_HINT, InsufficientCredit
from pinkybrain.node.core.identity import Identity
from pinkybrain.node.services.ledger_store import LedgerStore
from pinkybrain.node.services.mesh import Mesh, MeshSettings, RemoteError
from pinkybrain.node.split.borrower import TUNNEL_KIND
from pinkybrain.node.split.public import lend_digest, open_payload, settle
from pinkybrain.node.split.tools import find_tools
from pinkybrain.skill.output import split_capability

PRICE = 2.0  # credit.earn_per_split at L
LINE = 3.0  # L's credit.initial_balance: a stranger's line at L is one lend
SHA = "ab" * 32  # any model hash: the HELLO needs no weights
MARKER = f"pb-split-public-{uuid.uuid4().hex}"
RPC_HELLO = struct.pack("<BQ", 14, 24) + bytes(24)  # ggml-rpc v7 HELLO: command 14, 24 bytes of caps


class Borrower:
    """A public-mesh client with a real ledger: what a public borrower's node does, in-process."""

    def __init__(self, home, loop: Loop, balance: float = 10.0):
        self.identity = Identity.generate()
        self.id = self.identity.node_id
        self.mesh = stranger_mesh(self.identity)
        self.ledger = LedgerStore.open(home, self.id, balance)
        self.loop = loop

    def open(self, lender: str, *, price: float = PRICE, note: str = MARKER):
        """A paid split.rpc tunnel to `lender` (RemoteError when refused) and its commitment."""
        payload, commitment = open_payload(self.ledger, self.identity, lender, SHA, 1024, price)
        payload["note"] = note  # a field the lender does not read: it must not be written anywhere
        tunnel = self.loop.run(self.mesh.open_tunnel(lender, TUNNEL_KIND, payload, timeout=60), 70)
        return tunnel, commitment

    def hello(self, tunnel) -> int:
        """Send rpc-server's HELLO through the tunnel; the major protocol version it answers."""
        return self.loop.run(_hello(tunnel), 30)


async def _hello(tunnel) -> int:
    await tunnel.write(RPC_HELLO)
    data = b""
    while len(data) < 8 or len(data) < 8 + struct.unpack("<Q", data[:8])[0]:
        piece = await tunnel.read()
        assert piece, f"the tunnel closed before rpc-server answered: {tunnel.close_reason}"
        data += piece
    size = struct.unpack("<Q", data[:8])[0]
    assert size >= 4 and len(data) == 8 + size
    return data[8]


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    tools = find_tools()
    if not tools.usable:  # a failure, never a skip: install.sh builds the tools
        pytest.fail(f"split lending needs llama.cpp's RPC tools: {tools.problem}")
    root = tmp_path_factory.mktemp("splitpub")
    tracker = start_tracker(root / "tracker.log")
    loop = Loop()
    common = {**FAST, "p2p.tracker": tracker.url, "sharing.split": True, "sharing.split_idle_secs": 2,
              "credit.earn_per_split": PRICE, "credit.initial_balance": LINE, "logging.public_mesh": True}
    nodes, borrowers, private = {}, {}, None
    try:
        secret = strong_secret()
        nodes["L"] = start_node(root / "L", port=free_port(), secret=secret,
                                extra={**common, "sharing.split_public": True})
        nodes["O"] = start_node(root / "O", port=free_port(), extra=common)
        ids = {n: node.get("/api/ping").json()["node_id"] for n, node in nodes.items()}
        borrowers = {name: Borrower(root / name, loop) for name in ("V", "W", "S")}
        borrowers["B"] = Borrower(root / "B", loop, balance=0.0)
        for node in nodes.values():
            for name in ("V", "W", "B"):
                assert node.post("/api/trust/vouch", json={"node_id": borrowers[name].id}).status_code == 200
            assert node.post("/api/network/mesh/join").status_code == 200
        for borrower in borrowers.values():
            loop.run(borrower.mesh.start())
            for node in nodes.values():
                loop.run(borrower.mesh.connect(f"127.0.0.1:{node.port}"))
        private = Mesh(Identity.generate(), secret, name="member", version="test", listen_host="127.0.0.1",
                       listen_port=free_port(), settings=MeshSettings())
        loop.run(private.start())
        loop.run(private.connect(f"ws://127.0.0.1:{nodes['L'].port}/p2p"))
        yield {"nodes": nodes, "ids": ids, "b": borrowers, "loop": loop, "private": private}
    finally:
        for borrower in borrowers.values():
            loop.run(borrower.mesh.stop(), 15)
            borrower.ledger.close()
        if private is not None:
            loop.run(private.stop(), 15)
        loop.close()
        for node in nodes.values():
            node.stop()
        tracker.stop()


def split_caps(node) -> dict:
    return node.get("/api/capabilities").json()["split"]


def borrowers_served(node, key: str = "public_lending") -> set[str]:
    return {s["borrower"] for s in split_caps(node)[key]}


def receipts(node) -> list[dict]:
    return node.get("/api/credits?receipts=20").json()["latest_receipts"]


def test_a_valid_public_peer_pays_and_reaches_the_rpc_server(net):
    L, ids, v, loop = net["nodes"]["L"], net["ids"], net["b"]["V"], net["loop"]
    caps = split_caps(L)
    assert caps["can_lend_public"] and caps["lend_public_enabled"] and caps["public_price"] == PRICE
    assert "also to valid public peers (2.0 credits a tunnel)" in split_capability(caps)  # `capabilities`
    # What public peers see: L lends, O (switch off) does not.
    status = {p["node_id"]: p["split"] for p in v.mesh.peers()}
    assert status[ids["L"]]["lend"] is True and status[ids["L"]]["free_bytes"] > 0
    assert status[ids["O"]] == {"lend": False, "free_bytes": None}

    before = L.get("/api/credits").json()["balance"]
    tunnel, commitment = v.open(ids["L"])
    try:
        receipt = settle(v.ledger, tunnel, commitment, SHA)
        assert receipt.success and receipt.server == ids["L"] and receipt.response_sha256 == lend_digest(SHA)
        assert v.hello(tunnel) >= 1  # rpc-server's own answer, through the tunnel
        assert borrowers_served(L) == {v.id} and not split_caps(L)["lending"]  # a public rpc-server only
        with L.member() as c:  # a private-mesh member sees that a public peer borrows, never which
            seen = c.get("/api/capabilities").json()["split"]
        assert len(seen["public_lending"]) == 1 and v.id not in json.dumps(seen)
        (server,) = split_caps(L)["public_lending"]
        listening = [c for c in psutil.Process(server["pid"]).net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN]
        assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening)
        loop.run(tunnel.write(MARKER.encode()))  # tunnel bytes: never logged or stored either
    finally:
        tunnel.close()
    assert v.ledger.balance() == pytest.approx(10.0 - PRICE)
    assert L.get("/api/credits").json()["balance"] == pytest.approx(before + PRICE)
    mine = [r for r in receipts(L) if r["commitment"]["query_id"] == commitment.query_id]
    assert mine and mine[0]["success"] is True and mine[0]["commitment"]["asker"] == v.id
    # The commitment cannot buy a second lend.
    with pytest.raises(RemoteError) as info:
        loop.run(v.mesh.open_tunnel(ids["L"], TUNNEL_KIND,
                                    {"sha256": SHA, "commitment": commitment.to_dict()}))
    assert info.value.code == "payment_refused" and "replay" in info.value.message


def test_a_peer_the_web_of_trust_does_not_find_valid_is_refused_before_any_rpc_server(net):
    L, ids, s = net["nodes"]["L"], net["ids"], net["b"]["S"]
    before = L.get("/api/credits").json()["balance"]
    with pytest.raises(RemoteError) as info:
        s.open(ids["L"])
    assert info.value.code == "not_trusted"
    assert s.id not in borrowers_served(L) and s.id not in borrowers_served(L, "lending")
    assert L.get("/api/credits").json()["balance"] == before
    assert not [r for r in receipts(L) if r["commitment"]["asker"] == s.id]


def test_with_the_owner_switch_off_even_a_valid_peer_is_refused(net):
    off, ids, v = net["nodes"]["O"], net["ids"], net["b"]["V"]
    caps = split_caps(off)
    assert caps["can_lend"] and not caps["lend_public_enabled"] and not caps["can_lend_public"]
    assert "public" not in split_capability(caps)
    with pytest.raises(RemoteError) as info:
        v.open(ids["O"])
    assert info.value.code == "unknown_tunnel"  # the public mesh of O never registered the kind
    assert not split_caps(off)["public_lending"] and not split_caps(off)["lending"]
    assert off.get("/api/credits").json()["balance"] == pytest.approx(LINE)


def test_a_peer_without_enough_credit_is_refused_before_any_rpc_server(net):
    L, ids, w, b = net["nodes"]["L"], net["ids"], net["b"]["W"], net["b"]["B"]
    # B's own ledger cannot back the price: no commitment, nothing sent.
    with pytest.raises(InsufficientCredit) as info:
        b.open(ids["L"])
    assert EARN_HINT in str(info.value)
    # W pays less than the price: refused.
    with pytest.raises(RemoteError) as refused:
        w.open(ids["L"], price=PRICE / 2)
    assert refused.value.code == "payment_refused" and "asks" in refused.value.message
    assert w.id not in borrowers_served(L)
    # W's first lend uses most of its credit line at L (LINE); once its rpc-server stopped, the second is
    # past the line: L's own check refuses it, whatever W's ledger says.
    tunnel, commitment = w.open(ids["L"])
    settle(w.ledger, tunnel, commitment, SHA)
    tunnel.close()
    wait_for(lambda: w.id not in borrowers_served(L), 30, "W's rpc-server to stop when idle")
    with pytest.raises(RemoteError) as refused:
        w.open(ids["L"])
    assert refused.value.code == "payment_refused" and "credit line" in refused.value.message
    assert w.id not in borrowers_served(L)
    paid = [r for r in receipts(L) if r["commitment"]["asker"] == w.id]
    assert len(paid) == 1 and paid[0]["success"] is True


def test_a_private_member_borrows_free_from_its_own_rpc_server(net):
    L, loop, private = net["nodes"]["L"], net["loop"], net["private"]
    before, paid = L.get("/api/credits").json()["balance"], len(receipts(L))
    (link,) = private.peer_ids()
    tunnel = loop.run(private.open_tunnel(link, TUNNEL_KIND, {"sha256": SHA, "bytes": 1024}), 70)
    try:
        assert tunnel.reply is None  # no receipt: nothing was paid
        assert loop.run(_hello(tunnel), 30) >= 1
        member = private.identity.node_id
        assert borrowers_served(L, "lending") == {member} and member not in borrowers_served(L)
    finally:
        tunnel.close()
    assert L.get("/api/credits").json()["balance"] == before and len(receipts(L)) == paid


def test_nothing_a_public_borrower_sent_is_written_anywhere(net):
    needle = MARKER.encode()
    for name in ("L", "O"):
        node = net["nodes"][name]
        assert MARKER not in node.log()
        for path in node.home.rglob("*"):
            if path.is_file():
                assert needle not in path.read_bytes(), path
