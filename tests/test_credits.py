"""Credits: commitments signed by the asker before work, receipts signed by both sides, a durable ledger
(exact transfers, the broke-node hint, replay and alteration refused, also after a restart, expiry) and
the peer score formula with its inputs."""

import dataclasses
import json
import math
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from pinkybrain.node.core.credits import (
    EARN_HINT,
    MICRO,
    SCORE_FORMULA,
    CreditError,
    CreditLineExceeded,
    ExpiredCommitment,
    InsufficientCredit,
    InvalidCommitment,
    InvalidReceipt,
    Ledger,
    PaymentCommitment,
    Receipt,
    ReplayError,
    UnknownCommitment,
    response_digest,
    to_micro,
)
from pinkybrain.node.core.identity import Identity
from pinkybrain.node.services.ledger_store import LedgerStore, LedgerStoreCorrupt, LedgerStoreError

NOW = 1_750_000_000
EARN = 1.0  # credit.earn_per_query
INITIAL = 10.0  # credit.initial_balance


@pytest.fixture
def asker():
    return Identity.generate()


@pytest.fixture
def server():
    return Identity.generate()


def stores(tmp_path, asker, server, *, asker_balance=INITIAL, server_balance=INITIAL):
    return (LedgerStore.open(tmp_path / "asker", asker.node_id, asker_balance, clock=lambda: NOW),
            LedgerStore.open(tmp_path / "server", server.node_id, server_balance, clock=lambda: NOW))


def exchange(a_store, s_store, asker, server, *, amount=EARN, success=True, latency_ms=250, reply="the answer",
             now=NOW):
    """One query, as the mesh will run it: commit, accept, work, deliver, record."""
    commitment = a_store.commit_payment(asker, server.node_id, amount, now=now)
    s_store.accept_commitment(commitment, min_amount=amount, now=now)
    receipt = s_store.deliver(server, commitment, success=success, latency_ms=latency_ms,
                              response_sha256=response_digest(reply), now=now + 1)
    a_store.record_receipt(receipt, expected_digest=response_digest(reply), now=now + 2)
    return commitment, receipt


# -- the exchange --------------------------------------------------------------------------------------
def test_balance_starts_at_initial_balance(tmp_path, asker):
    with LedgerStore.open(tmp_path, asker.node_id, INITIAL) as store:
        assert store.balance() == INITIAL
        summary = store.summary()
        assert summary["initial_balance"] == INITIAL and summary["receipts"] == 0


def test_a_served_query_moves_exactly_earn_per_query(tmp_path, asker, server):
    a_store, s_store = stores(tmp_path, asker, server)
    with a_store, s_store:
        commitment = a_store.commit_payment(asker, server.node_id, EARN)
        assert a_store.balance() == INITIAL and a_store.available() == INITIAL - EARN  # reserved
        s_store.accept_commitment(commitment, min_amount=EARN)
        receipt = s_store.deliver(server, commitment, success=True, latency_ms=120,
                                  response_sha256=response_digest("42"))
        assert s_store.balance() == INITIAL + EARN  # the server holds a receipt both sides signed
        a_store.record_receipt(receipt, expected_digest=response_digest("42"))
        assert a_store.balance() == INITIAL - EARN and a_store.available() == INITIAL - EARN
        assert receipt.verify() and receipt.amount == to_micro(EARN)
        assert a_store.receipts(server.node_id) == s_store.receipts(asker.node_id) == [receipt]


def test_fractional_prices_add_up_exactly(tmp_path, asker, server):
    a_store, s_store = stores(tmp_path, asker, server, asker_balance=1.0, server_balance=1.0)
    with a_store, s_store:
        for i in range(10):  # ten tenths fill the server's credit line of 1.0 exactly
            exchange(a_store, s_store, asker, server, amount=0.1, now=NOW + i)
        assert a_store.balance() == 0.0 and s_store.balance() == 2.0
        assert s_store.credit_line(asker.node_id, now=NOW + 20) == {"limit": 1.0, "used": 1.0, "available": 0.0}


def test_a_failed_delivery_moves_no_credit(tmp_path, asker, server):
    a_store, s_store = stores(tmp_path, asker, server)
    with a_store, s_store:
        exchange(a_store, s_store, asker, server, success=False)
        assert a_store.balance() == INITIAL and s_store.balance() == INITIAL
        assert a_store.available() == INITIAL  # the reservation was released


def test_a_broke_node_is_refused_with_the_hint(tmp_path, asker, server):
    a_store, s_store = stores(tmp_path, asker, server, asker_balance=EARN)
    with a_store, s_store:
        exchange(a_store, s_store, asker, server)
        with pytest.raises(InsufficientCredit) as err:
            a_store.commit_payment(asker, server.node_id, EARN, now=NOW + 5)
        assert "earn by sharing compute or set initial_balance" in str(err.value)
        assert EARN_HINT == "earn by sharing compute or set initial_balance"
        assert not a_store.can_commit(EARN, now=NOW + 5)
        # Credit earned by serving can then be spent.
        exchange(s_store, a_store, server, asker, now=NOW + 10)
        assert a_store.balance() == EARN
        exchange(a_store, s_store, asker, server, now=NOW + 20)
        with pytest.raises(InsufficientCredit, match=EARN_HINT):
            a_store.commit_payment(asker, server.node_id, EARN, now=NOW + 30)


def test_the_server_extends_each_asker_a_line_it_checks_from_its_own_receipts(tmp_path, asker, server):
    """A cheater's commitments (signed without any credit check, from a huge configured balance) are
    accepted only up to the server's line; serving the server extends it; a restart forgets nothing."""
    cheat = Ledger(asker.node_id, to_micro(1_000_000))  # the asker's own ledger: the server never reads it
    with LedgerStore.open(tmp_path, server.node_id, 3.0, clock=lambda: NOW) as s_store:
        def commitment(now=NOW):
            return PaymentCommitment.create(asker, server.node_id, to_micro(EARN), now=now)

        first, second = commitment(), commitment()
        s_store.accept_commitment(first)
        s_store.accept_commitment(second)
        assert s_store.credit_line(asker.node_id) == {"limit": 3.0, "used": 2.0, "available": 1.0}
        s_store.deliver(server, first, success=True, latency_ms=1, response_sha256="0" * 64)
        s_store.deliver(server, second, success=False, latency_ms=1, response_sha256="0" * 64)  # free
        s_store.accept_commitment(commitment())
        s_store.accept_commitment(commitment())
        with pytest.raises(CreditLineExceeded, match="serve this node to extend it"):
            s_store.accept_commitment(commitment())
        assert cheat.balance() == to_micro(1_000_000)  # the asker's balance was never the server's business
        # Accepted but never delivered: held until the commitment expires, then the line is free again.
        later = NOW + 601
        s_store.accept_commitment(commitment(now=later), now=later)
        assert s_store.credit_line(asker.node_id, now=later) == {"limit": 3.0, "used": 2.0, "available": 1.0}
        # What the asker serves this node extends its line by exactly that much.
        mine = s_store.commit_payment(server, asker.node_id, 2 * EARN, now=later)
        receipt = Receipt.deliver(asker, mine, success=True, latency_ms=5, response_sha256="1" * 64, now=later)
        s_store.record_receipt(receipt, now=later)
        assert s_store.credit_line(asker.node_id, now=later) == {"limit": 5.0, "used": 2.0, "available": 3.0}
    with LedgerStore.open(tmp_path, server.node_id, 3.0, clock=lambda: later) as s_store:
        assert s_store.credit_line(asker.node_id) == {"limit": 5.0, "used": 2.0, "available": 3.0}
        other = Identity.generate()  # another identity (a Sybil) starts with its own line, no more
        assert s_store.credit_line(other.node_id)["available"] == 3.0


def test_outstanding_commitments_reserve_credit(tmp_path, asker, server):
    with LedgerStore.open(tmp_path, asker.node_id, 2.0, clock=lambda: NOW) as store:
        store.commit_payment(asker, server.node_id, 1.5, ttl=60)
        with pytest.raises(InsufficientCredit, match="reserved by outstanding commitments"):
            store.commit_payment(asker, server.node_id, 1.0, ttl=60)
        # Once the unanswered commitment has expired its reservation is released.
        store.commit_payment(asker, server.node_id, 1.0, now=NOW + 61)


# -- refusals ------------------------------------------------------------------------------------------
def test_a_replayed_receipt_is_rejected_also_after_reopen(tmp_path, asker, server):
    a_store, s_store = stores(tmp_path, asker, server)
    with a_store, s_store:
        commitment, receipt = exchange(a_store, s_store, asker, server)
        with pytest.raises(ReplayError, match="already recorded"):
            a_store.record_receipt(receipt, now=NOW + 3)
        with pytest.raises(ReplayError):
            s_store.accept_commitment(commitment)  # the server will not do the work twice for one payment
    a_store, s_store = stores(tmp_path, asker, server)
    with a_store, s_store:
        with pytest.raises(ReplayError):
            a_store.record_receipt(receipt, now=NOW + 3)
        with pytest.raises(ReplayError):
            s_store.accept_commitment(commitment)
        with pytest.raises(ReplayError):
            s_store.deliver(server, commitment, success=True, latency_ms=1, response_sha256="0" * 64)
        assert a_store.balance() == INITIAL - EARN and s_store.balance() == INITIAL + EARN


def test_a_commitment_accepted_before_a_restart_is_still_refused_after_it(tmp_path, asker, server):
    a_store, s_store = stores(tmp_path, asker, server)
    with a_store, s_store:
        commitment = a_store.commit_payment(asker, server.node_id, EARN)
        s_store.accept_commitment(commitment)
    a_store, s_store = stores(tmp_path, asker, server)
    with a_store, s_store:
        assert a_store.available() == INITIAL - EARN  # the reservation survived too
        with pytest.raises(ReplayError, match="replayed commitment"):
            s_store.accept_commitment(commitment)
        receipt = s_store.deliver(server, commitment.query_id, success=True, latency_ms=5,
                                  response_sha256=response_digest("late but fine"))
        a_store.record_receipt(receipt)
        assert a_store.balance() == INITIAL - EARN


@pytest.mark.parametrize("change", ["amount", "server", "asker", "query_id", "digest", "success", "latency",
                                    "delivered_at"])
def test_an_altered_receipt_is_rejected(tmp_path, asker, server, change):
    a_store, s_store = stores(tmp_path, asker, server)
    with a_store, s_store:
        commitment = a_store.commit_payment(asker, server.node_id, EARN)
        s_store.accept_commitment(commitment)
        receipt = s_store.deliver(server, commitment, success=True, latency_ms=100,
                                  response_sha256=response_digest("x"))
        other = Identity.generate().node_id
        c = receipt.commitment
        altered = {
            "amount": lambda: dataclasses.replace(receipt, commitment=dataclasses.replace(c, amount=c.amount * 100)),
            "server": lambda: dataclasses.replace(receipt, commitment=dataclasses.replace(c, server=other)),
            "asker": lambda: dataclasses.replace(receipt, commitment=dataclasses.replace(c, asker=other)),
            "query_id": lambda: dataclasses.replace(receipt, commitment=dataclasses.replace(c, query_id="f" * 32)),
            "digest": lambda: dataclasses.replace(receipt, response_sha256=response_digest("y")),
            "success": lambda: dataclasses.replace(receipt, success=False),
            "latency": lambda: dataclasses.replace(receipt, latency_ms=1),
            "delivered_at": lambda: dataclasses.replace(receipt, delivered_at=receipt.delivered_at - 1),
        }[change]()
        assert not altered.verify()
        with pytest.raises(InvalidReceipt, match="does not verify"):
            a_store.record_receipt(altered)
        # Through the wire form too.
        with pytest.raises(InvalidReceipt):
            a_store.record_receipt(Receipt.from_dict(json.loads(json.dumps(altered.to_dict()))))
        a_store.record_receipt(receipt)  # the genuine one is still accepted
        assert a_store.balance() == INITIAL - EARN


def test_a_receipt_for_a_different_response_is_rejected(tmp_path, asker, server):
    a_store, s_store = stores(tmp_path, asker, server)
    with a_store, s_store:
        commitment = a_store.commit_payment(asker, server.node_id, EARN)
        s_store.accept_commitment(commitment)
        receipt = s_store.deliver(server, commitment, success=True, latency_ms=100,
                                  response_sha256=response_digest("what the server signed"))
        with pytest.raises(InvalidReceipt, match="different response"):
            a_store.record_receipt(receipt, expected_digest=response_digest("what the asker got"))


def test_a_commitment_signed_by_someone_else_is_rejected(tmp_path, asker, server):
    mallory = Identity.generate()
    with LedgerStore.open(tmp_path, server.node_id, INITIAL, clock=lambda: NOW) as s_store:
        genuine = PaymentCommitment.create(asker, server.node_id, to_micro(EARN), now=NOW)
        forged = dataclasses.replace(genuine, signature=mallory.sign(genuine.signed_bytes()))
        with pytest.raises(InvalidCommitment, match="asker signature does not verify"):
            s_store.accept_commitment(forged)
        for_someone_else = PaymentCommitment.create(asker, mallory.node_id, to_micro(EARN), now=NOW)
        with pytest.raises(InvalidCommitment, match="not this node"):
            s_store.accept_commitment(for_someone_else)
        with pytest.raises(InvalidCommitment, match="offers"):
            s_store.accept_commitment(genuine, min_amount=2 * EARN)
        with pytest.raises(UnknownCommitment):  # no work was accepted, so nothing can be delivered
            s_store.deliver(server, genuine, success=True, latency_ms=1, response_sha256="0" * 64)
        # A receipt the asker never committed to is refused by the asker.
        ledger = Ledger(server.node_id, to_micro(INITIAL))
        ledger.accept(genuine, now=NOW)
        stray = ledger.deliver(server, genuine, success=True, latency_ms=1, response_sha256="0" * 64, now=NOW)
    with LedgerStore.open(tmp_path / "a", asker.node_id, INITIAL, clock=lambda: NOW) as a_store:
        with pytest.raises(UnknownCommitment):
            a_store.record_receipt(stray)
        assert a_store.balance() == INITIAL
    with pytest.raises(InvalidReceipt, match="not"):
        Receipt.deliver(mallory, genuine, success=True, latency_ms=1, response_sha256="0" * 64, now=NOW)


def test_an_expired_commitment_cannot_be_redeemed(tmp_path, asker, server):
    a_store, s_store = stores(tmp_path, asker, server)
    with a_store, s_store:
        late = a_store.commit_payment(asker, server.node_id, EARN, ttl=60)
        with pytest.raises(ExpiredCommitment):
            s_store.accept_commitment(late, now=NOW + 61)
        commitment = a_store.commit_payment(asker, server.node_id, EARN, ttl=60)
        s_store.accept_commitment(commitment)
        with pytest.raises(ExpiredCommitment, match="cannot be redeemed"):
            s_store.deliver(server, commitment, success=True, latency_ms=1, response_sha256="0" * 64,
                            now=NOW + 61)
        receipt = s_store.deliver(server, commitment, success=True, latency_ms=1, response_sha256="0" * 64,
                                  now=NOW + 59)
        with pytest.raises(ExpiredCommitment):  # the asker released the reservation at expiry
            a_store.record_receipt(receipt, now=NOW + 61)
        assert a_store.balance() == INITIAL and a_store.available(now=NOW + 61) == INITIAL
    # A receipt claiming delivery after expiry is malformed whoever signs it.
    c = PaymentCommitment.create(asker, server.node_id, 1, now=NOW, ttl=60)
    with pytest.raises(InvalidReceipt, match="lifetime"):
        Receipt.deliver(server, c, success=True, latency_ms=1, response_sha256="0" * 64, now=NOW + 61)


def test_wire_forms_are_domain_separated_and_round_trip(asker, server):
    c = PaymentCommitment.create(asker, server.node_id, 7, now=NOW)
    assert c.signed_bytes().startswith(b"PINKYBRAIN-CREDIT-COMMITMENT-V1\n")
    r = Receipt.deliver(server, c, success=True, latency_ms=3, response_sha256=response_digest(b"r"), now=NOW)
    assert r.signed_bytes().startswith(b"PINKYBRAIN-CREDIT-DELIVERY-V1\n")
    assert Receipt.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    # The asker's signature over a commitment is no server signature over a delivery, and vice versa.
    assert not dataclasses.replace(r, server_signature=c.signature).verify()
    with pytest.raises(CreditError):
        PaymentCommitment.create(asker, asker.node_id, 1, now=NOW)  # paying oneself
    with pytest.raises(ValueError):
        to_micro(-1)


# -- score ---------------------------------------------------------------------------------------------
def test_score_formula_matches_hand_computed_values(tmp_path, asker, server):
    a_store, s_store = stores(tmp_path, asker, server)
    with a_store, s_store:
        for i, (ok, ms) in enumerate([(True, 100), (True, 300), (True, 500), (False, 50)]):
            exchange(a_store, s_store, asker, server, success=ok, latency_ms=ms, now=NOW + 10 * i)
        exchange(s_store, a_store, server, asker, now=NOW + 100)  # the peer as asker: not in its score
        result = a_store.score(server.node_id)
        none = a_store.score(Identity.generate().node_id)
        # The server holds the same receipts, but none in which the asker served it.
        assert s_store.score(asker.node_id)["inputs"]["volume"] == 1
    volume_factor = 1 - math.exp(-4 / 10)  # 0.32968
    latency_factor = 1 / (1 + 300 / 2000)  # median of 100, 300, 500 (failures excluded) -> 0.869565
    assert result["peer"] == server.node_id
    assert result["inputs"] == pytest.approx({
        "volume": 4, "successes": 3, "success_rate": 0.75, "volume_factor": volume_factor,
        "median_latency_ms": 300.0, "latency_factor": latency_factor,
    })
    assert result["score"] == pytest.approx(0.75 * volume_factor * latency_factor)
    assert result["score"] == pytest.approx(0.215009, abs=1e-6)
    assert result["formula"] == SCORE_FORMULA and "1 - exp(-volume / 10)" in SCORE_FORMULA
    assert none["score"] == 0 and none["inputs"]["volume"] == 0 and none["inputs"]["median_latency_ms"] is None


def test_score_survives_reopen(tmp_path, asker, server):
    a_store, s_store = stores(tmp_path, asker, server)
    with a_store, s_store:
        exchange(a_store, s_store, asker, server, latency_ms=2000)
        before = a_store.score(server.node_id)
    a_store, s_store = stores(tmp_path, asker, server)
    with a_store, s_store:
        assert a_store.score(server.node_id) == before
        assert before["inputs"]["latency_factor"] == 0.5


# -- the store -----------------------------------------------------------------------------------------
def test_an_edited_ledger_is_reported_as_corruption(tmp_path, asker, server):
    a_store, s_store = stores(tmp_path, asker, server)
    with a_store, s_store:
        exchange(a_store, s_store, asker, server)
    path = tmp_path / "server" / "ledger.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute(f"UPDATE receipts SET data = replace(data, '\"amount\":{MICRO}', '\"amount\":{100 * MICRO}')")
    assert conn.total_changes == 1
    conn.commit()
    conn.close()
    with pytest.raises(LedgerStoreCorrupt, match="altered.*was left as it is"):
        LedgerStore.open(tmp_path / "server", server.node_id, INITIAL)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "ledger.sqlite3").write_bytes(b"\0" * 4096)
    with pytest.raises(LedgerStoreCorrupt, match="SQLite header"):
        LedgerStore.open(tmp_path / "junk", server.node_id, INITIAL)


def test_a_ledger_belongs_to_one_node(tmp_path, asker, server):
    LedgerStore.open(tmp_path, asker.node_id, INITIAL).close()
    with pytest.raises(LedgerStoreError, match="belongs to node"):
        LedgerStore.open(tmp_path, server.node_id, INITIAL)
    with LedgerStore.open(tmp_path, asker.node_id, INITIAL) as store:
        with pytest.raises(InvalidCommitment, match="belongs to"):
            store.commit_payment(server, asker.node_id, EARN)


def test_a_receipt_is_durable_when_deliver_returns(tmp_path, asker, server):
    """The server process is SIGKILLed right after deliver() returns; the receipt is there on reopen."""
    key_hex = bytes(server.signing_key).hex()
    commitment = PaymentCommitment.create(asker, server.node_id, to_micro(EARN), now=NOW)
    script = textwrap.dedent(f"""
        import json, os, signal, sys
        from nacl.signing import SigningKey
        from pinkybrain.node.core.credits import PaymentCommitment, response_digest
        from pinkybrain.node.core.identity import Identity
        from pinkybrain.node.services.ledger_store import LedgerStore
        server = Identity(SigningKey(bytes.fromhex({key_hex!r})))
        store = LedgerStore.open({str(tmp_path)!r}, server.node_id, {INITIAL}, clock=lambda: {NOW})
        c = PaymentCommitment.from_dict(json.loads(sys.argv[1]))
        store.accept_commitment(c)
        store.deliver(server, c, success=True, latency_ms=9, response_sha256=response_digest("ok"))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(commitment.to_dict())],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    with LedgerStore.open(tmp_path, server.node_id, INITIAL, clock=lambda: NOW) as store:
        assert store.balance() == INITIAL + EARN
        with pytest.raises(ReplayError):
            store.accept_commitment(commitment)
