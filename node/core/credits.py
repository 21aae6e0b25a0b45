"""Credits: signed payment commitments, two-signature receipts, and the ledger and peer score derived
from them. Pure logic: no I/O, time is passed in.

The exchange, for one query:
1. the asker signs a PaymentCommitment (amount, server, a random query id, expiry) BEFORE any work, which
   reserves that much of its credit;
2. the server checks it (signature, addressed to itself, not expired, query id never seen) and does the work;
3. the server signs delivery (the whole signed commitment + delivered_at + success + latency_ms + SHA-256
   of the response) and so completes a Receipt; holding it, the server has earned the amount;
4. the asker checks the receipt against the commitment it signed (and, optionally, the response it got)
   and records it, which turns the reservation into a spend.
Only successful deliveries move credit; failed ones are kept as evidence for the score.

The server does not take the asker's word for its balance (its software or config may lie): in step 2 it
also checks the asker's bilateral credit line (CREDIT_LINE_RULE), from receipts the server holds itself.

Amounts are integer micro-credits (1 credit = 1_000_000) so that signed bytes and sums are exact; the
config's float credits convert with to_micro().
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pinkybrain.node.core.identity import Identity, IdentityError, require_signature, validate_node_id

DOMAIN_COMMITMENT = b"PINKYBRAIN-CREDIT-COMMITMENT-V1\n"
DOMAIN_DELIVERY = b"PINKYBRAIN-CREDIT-DELIVERY-V1\n"
MICRO = 1_000_000
DEFAULT_COMMITMENT_TTL_SECS = 600
MAX_COMMITMENT_TTL_SECS = 86400
CLOCK_SKEW_SECS = 300  # a commitment dated this far in the future is still accepted
EARN_HINT = "earn by sharing compute or set initial_balance"
SCORE_VOLUME_SCALE = 10.0
SCORE_LATENCY_SCALE_MS = 2000.0

SCORE_FORMULA = (
    "score = success_rate * volume_factor * latency_factor, in [0, 1], computed only from the receipts "
    "this node holds in which the peer served this node (both signatures verified). "
    "volume = number of such receipts; success_rate = successful / volume; "
    "volume_factor = 1 - exp(-volume / 10) (confidence grows with volume: 10 queries give 0.63, 30 give "
    "0.95); median_latency_ms = median of latency_ms over the successful receipts; "
    "latency_factor = 1 / (1 + median_latency_ms / 2000) (a 2 s median halves the score). "
    "A peer with no receipts, or no successful one, scores 0."
)


class CreditError(ValueError):
    """A commitment, receipt or spend that cannot be accepted; str() says why."""


class InvalidCommitment(CreditError):
    pass


class InvalidReceipt(CreditError):
    pass


class ExpiredCommitment(CreditError):
    pass


class ReplayError(CreditError):
    """The query id was already used: a replayed commitment or receipt."""


class UnknownCommitment(CreditError):
    """A receipt or delivery for a commitment this node never made or accepted."""


class InsufficientCredit(CreditError):
    """The node cannot back the amount with receipts; the message carries EARN_HINT."""


class CreditLineExceeded(CreditError):
    """The server's credit line to this asker is used up (CREDIT_LINE_RULE); the message says by how much."""


CREDIT_LINE_RULE = (
    "A server extends to each asker a credit line of its own credit.initial_balance plus what that asker "
    "has served it; it accepts a commitment only if what it has already served that asker (successful "
    "receipts it signed) plus the commitments it accepted from that asker and has not delivered yet, plus "
    "the new amount, stays within the line. Both sums come from receipts in the server's own ledger, so "
    "nothing the asker claims about its balance counts. A cheating asker (any patched client, any "
    "configured initial balance) thus takes at most initial_balance of work from each honest server per "
    "identity without serving it back: at most the sum of the honest servers' initial_balance per identity, "
    "and S times that for S identities, each of which must also be valid in each server's Web of Trust."
)


def to_micro(credits: float) -> int:
    if isinstance(credits, bool) or not isinstance(credits, (int, float)) or not math.isfinite(credits):
        raise ValueError(f"an amount of credit must be a finite number, got {credits!r}")
    if credits < 0:
        raise ValueError(f"an amount of credit cannot be negative, got {credits!r}")
    return round(credits * MICRO)


def from_micro(units: int) -> float:
    return units / MICRO


def format_credits(units: int) -> str:
    return (f"{units / MICRO:.6f}".rstrip("0").rstrip(".")) or "0"


def response_digest(response: bytes | str) -> str:
    """The SHA-256 (hex) a receipt carries instead of the response itself."""
    data = response.encode() if isinstance(response, str) else bytes(response)
    return hashlib.sha256(data).hexdigest()


def _canonical(domain: bytes, body: dict[str, Any]) -> bytes:
    return domain + json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_hex(value: object, length: int) -> bool:
    return isinstance(value, str) and len(value) == length and all(c in "0123456789abcdef" for c in value)


def _check_id(value: object, what: str, error: type[CreditError]) -> None:
    if not isinstance(value, str):
        raise error(f"{what} must be a node id")
    try:
        canonical = validate_node_id(value)
    except IdentityError as exc:
        raise error(f"{what}: {exc}") from None
    if canonical != value:
        raise error(f"{what} is not in canonical form ({canonical})")


def _hex_bytes(data: dict[str, Any], key: str, error: type[CreditError]) -> bytes:
    try:
        return bytes.fromhex(data[key])
    except KeyError:
        raise error(f"missing {key!r}") from None
    except (TypeError, ValueError):
        raise error(f"{key} must be hex") from None


@dataclass(frozen=True)
class PaymentCommitment:
    """The asker's signed promise to pay `amount` micro-credits to `server` for query `query_id`."""

    asker: str
    server: str
    query_id: str
    amount: int
    issued_at: int
    expires_at: int
    signature: bytes = field(repr=False)

    @classmethod
    def create(cls, identity: Identity, server: str, amount: int, *, now: float,
               ttl: int = DEFAULT_COMMITMENT_TTL_SECS, query_id: str | None = None) -> PaymentCommitment:
        try:
            server = validate_node_id(server)
        except IdentityError as exc:
            raise InvalidCommitment(f"server: {exc}") from None
        if not _is_int(ttl) or not 0 < ttl <= MAX_COMMITMENT_TTL_SECS:
            raise InvalidCommitment(f"ttl must be 1..{MAX_COMMITMENT_TTL_SECS} seconds, got {ttl!r}")
        issued = int(now)
        unsigned = cls(identity.node_id, server, query_id or os.urandom(16).hex(), amount, issued,
                       issued + ttl, b"")
        commitment = cls(**{**unsigned.__dict__, "signature": identity.sign(unsigned.signed_bytes())})
        commitment.check()
        return commitment

    def body(self) -> dict[str, Any]:
        return {"asker": self.asker, "server": self.server, "query_id": self.query_id, "amount": self.amount,
                "issued_at": self.issued_at, "expires_at": self.expires_at}

    def signed_bytes(self) -> bytes:
        return _canonical(DOMAIN_COMMITMENT, self.body())

    def check(self) -> None:
        """Raise InvalidCommitment naming the first fault; return if well formed and signed by the asker."""
        _check_id(self.asker, "asker", InvalidCommitment)
        _check_id(self.server, "server", InvalidCommitment)
        if self.asker == self.server:
            raise InvalidCommitment("a node cannot pay itself")
        if not _is_hex(self.query_id, 32):
            raise InvalidCommitment("query_id must be 32 lowercase hex characters (16 random bytes)")
        if not _is_int(self.amount) or self.amount < 0:
            raise InvalidCommitment("amount must be a non-negative integer of micro-credits")
        if not (_is_int(self.issued_at) and _is_int(self.expires_at)):
            raise InvalidCommitment("issued_at and expires_at must be integers (unix seconds)")
        if not 0 < self.expires_at - self.issued_at <= MAX_COMMITMENT_TTL_SECS:
            raise InvalidCommitment(f"lifetime must be 1..{MAX_COMMITMENT_TTL_SECS} seconds")
        require_signature(self.asker, self.signed_bytes(), self.signature, InvalidCommitment, "asker signature")

    def verify(self) -> bool:
        try:
            self.check()
        except CreditError:
            return False
        return True

    def to_dict(self) -> dict[str, Any]:
        return {**self.body(), "signature": self.signature.hex()}

    @classmethod
    def from_dict(cls, data: Any) -> PaymentCommitment:
        """Parse (without verifying: call check()); raise InvalidCommitment for a malformed dict."""
        if not isinstance(data, dict):
            raise InvalidCommitment("a commitment must be an object")
        try:
            return cls(data["asker"], data["server"], data["query_id"], data["amount"], data["issued_at"],
                       data["expires_at"], _hex_bytes(data, "signature", InvalidCommitment))
        except KeyError as exc:
            raise InvalidCommitment(f"commitment lacks {exc.args[0]!r}") from None


@dataclass(frozen=True)
class Receipt:
    """A commitment plus the server's signed statement of delivery: both sides have signed."""

    commitment: PaymentCommitment
    delivered_at: int
    success: bool
    latency_ms: int
    response_sha256: str
    server_signature: bytes = field(repr=False)

    @classmethod
    def deliver(cls, identity: Identity, commitment: PaymentCommitment, *, success: bool, latency_ms: int,
                response_sha256: str, now: float) -> Receipt:
        if identity.node_id != commitment.server:
            raise InvalidReceipt(f"the commitment is addressed to {commitment.server}, not {identity.node_id}")
        unsigned = cls(commitment, int(now), bool(success), int(latency_ms), response_sha256, b"")
        receipt = cls(**{**unsigned.__dict__, "server_signature": identity.sign(unsigned.signed_bytes())})
        receipt.check()
        return receipt

    @property
    def query_id(self) -> str:
        return self.commitment.query_id

    @property
    def asker(self) -> str:
        return self.commitment.asker

    @property
    def server(self) -> str:
        return self.commitment.server

    @property
    def amount(self) -> int:
        return self.commitment.amount

    @property
    def transferred(self) -> int:
        """Micro-credits this receipt moves from asker to server: the amount if delivery succeeded."""
        return self.commitment.amount if self.success else 0

    def body(self) -> dict[str, Any]:
        # The whole signed commitment, asker signature included, is inside what the server signs.
        return {"commitment": self.commitment.to_dict(), "delivered_at": self.delivered_at,
                "success": self.success, "latency_ms": self.latency_ms, "response_sha256": self.response_sha256}

    def signed_bytes(self) -> bytes:
        return _canonical(DOMAIN_DELIVERY, self.body())

    def check(self) -> None:
        """Raise InvalidReceipt naming the first fault; return if both signatures verify."""
        if not isinstance(self.commitment, PaymentCommitment):
            raise InvalidReceipt("a receipt must carry a payment commitment")
        try:
            self.commitment.check()
        except InvalidCommitment as exc:
            raise InvalidReceipt(f"its commitment is invalid: {exc}") from None
        if not _is_int(self.delivered_at):
            raise InvalidReceipt("delivered_at must be an integer (unix seconds)")
        if not self.commitment.issued_at - CLOCK_SKEW_SECS <= self.delivered_at <= self.commitment.expires_at:
            raise InvalidReceipt("delivered outside the commitment's lifetime")
        if not isinstance(self.success, bool):
            raise InvalidReceipt("success must be true or false")
        if not _is_int(self.latency_ms) or self.latency_ms < 0:
            raise InvalidReceipt("latency_ms must be a non-negative integer")
        if not _is_hex(self.response_sha256, 64):
            raise InvalidReceipt("response_sha256 must be 64 lowercase hex characters")
        require_signature(self.commitment.server, self.signed_bytes(), self.server_signature, InvalidReceipt,
                          "server signature")

    def verify(self) -> bool:
        try:
            self.check()
        except CreditError:
            return False
        return True

    def to_dict(self) -> dict[str, Any]:
        return {**self.body(), "server_signature": self.server_signature.hex()}

    @classmethod
    def from_dict(cls, data: Any) -> Receipt:
        if not isinstance(data, dict):
            raise InvalidReceipt("a receipt must be an object")
        try:
            commitment = PaymentCommitment.from_dict(data["commitment"])
            return cls(commitment, data["delivered_at"], data["success"], data["latency_ms"],
                       data["response_sha256"], _hex_bytes(data, "server_signature", InvalidReceipt))
        except InvalidCommitment as exc:
            raise InvalidReceipt(f"its commitment is malformed: {exc}") from None
        except KeyError as exc:
            raise InvalidReceipt(f"receipt lacks {exc.args[0]!r}") from None


def score_receipts(peer: str, receipts: Iterable[Receipt]) -> dict[str, Any]:
    """SCORE_FORMULA over `receipts` (the caller passes those in which `peer` served it)."""
    mine = [r for r in receipts if r.server == peer]
    volume = len(mine)
    successes = sum(1 for r in mine if r.success)
    success_rate = successes / volume if volume else 0.0
    volume_factor = 1.0 - math.exp(-volume / SCORE_VOLUME_SCALE)
    latencies = [r.latency_ms for r in mine if r.success]
    median_latency = float(statistics.median(latencies)) if latencies else None
    latency_factor = 1.0 / (1.0 + median_latency / SCORE_LATENCY_SCALE_MS) if latencies else 0.0
    return {
        "peer": peer,
        "score": success_rate * volume_factor * latency_factor,
        "inputs": {
            "volume": volume,
            "successes": successes,
            "success_rate": success_rate,
            "volume_factor": volume_factor,
            "median_latency_ms": median_latency,
            "latency_factor": latency_factor,
        },
        "formula": SCORE_FORMULA,
    }


class Ledger:
    """This node's credit, from the receipts it holds. Each operation has a check_* / prepare_* half that
    raises without changing anything and an add_* half that applies, so a store can persist in between."""

    def __init__(self, node_id: str, initial_balance: int):
        if not _is_int(initial_balance) or initial_balance < 0:
            raise ValueError("initial_balance must be a non-negative integer of micro-credits")
        self.node_id = validate_node_id(node_id)
        self.initial_balance = initial_balance
        self._receipts: dict[str, Receipt] = {}
        self._outstanding: dict[str, PaymentCommitment] = {}  # we asked; awaiting the receipt
        self._accepted: dict[str, PaymentCommitment] = {}  # we serve; awaiting our delivery
        self._seen: set[str] = set()  # every query id ever committed, accepted or receipted here
        self._earned = 0
        self._spent = 0
        self._served_to: dict[str, int] = {}  # asker -> what this node delivered to it (successful receipts)
        self._served_by: dict[str, int] = {}  # server -> what it delivered to this node

    @classmethod
    def restore(cls, node_id: str, initial_balance: int, commitments: Iterable[tuple[str, PaymentCommitment]],
                receipts: Iterable[Receipt]) -> Ledger:
        """Rebuild from storage: `commitments` are (role 'asker'|'server', commitment). Every signature is
        checked again; a bad one raises CreditError (the storage was altered)."""
        ledger = cls(node_id, initial_balance)
        for role, commitment in commitments:
            commitment.check()
            if role == "asker" and commitment.asker == ledger.node_id:
                ledger.add_outstanding(commitment)
            elif role == "server" and commitment.server == ledger.node_id:
                ledger.add_accepted(commitment)
            else:
                raise InvalidCommitment(f"stored commitment {commitment.query_id} is not this node's as {role}")
        for receipt in receipts:
            receipt.check()
            if ledger.node_id not in (receipt.asker, receipt.server):
                raise InvalidReceipt(f"stored receipt {receipt.query_id} does not involve this node")
            if receipt.query_id in ledger._receipts:
                raise ReplayError(f"receipt for query {receipt.query_id} is stored twice")
            ledger.add_receipt(receipt)
        return ledger

    # -- balance --------------------------------------------------------------------------------------
    def balance(self) -> int:
        """initial_balance + earned as server - spent as asker, over the receipts held (micro-credits)."""
        return self.initial_balance + self._earned - self._spent

    @property
    def earned(self) -> int:
        return self._earned

    @property
    def spent(self) -> int:
        return self._spent

    def reserved(self, now: float) -> int:
        """Credit promised by unexpired commitments whose receipts have not come back."""
        return sum(c.amount for c in self._outstanding.values() if now <= c.expires_at)

    def available(self, now: float) -> int:
        return self.balance() - self.reserved(now)

    def require_credit(self, amount: int, now: float) -> None:
        """Raise InsufficientCredit (with EARN_HINT) unless `amount` can be backed by receipts."""
        available = self.available(now)
        if amount > available:
            reserved = self.reserved(now)
            held = f" ({format_credits(reserved)} reserved by outstanding commitments)" if reserved else ""
            raise InsufficientCredit(
                f"not enough credit: {format_credits(amount)} needed, {format_credits(available)} available"
                f"{held}; {EARN_HINT}"
            )

    def can_commit(self, amount: int, now: float) -> bool:
        try:
            self.require_credit(amount, now)
        except InsufficientCredit:
            return False
        return True

    def seen(self, query_id: str) -> bool:
        return query_id in self._seen

    # -- asker side -----------------------------------------------------------------------------------
    def prepare_commitment(self, identity: Identity, server: str, amount: int, *, now: float,
                           ttl: int = DEFAULT_COMMITMENT_TTL_SECS) -> PaymentCommitment:
        if identity.node_id != self.node_id:
            raise InvalidCommitment(f"this ledger belongs to {self.node_id}, not {identity.node_id}")
        if not _is_int(amount) or amount < 0:
            raise InvalidCommitment("amount must be a non-negative integer of micro-credits")
        self.require_credit(amount, now)
        commitment = PaymentCommitment.create(identity, server, amount, now=now, ttl=ttl)
        if commitment.query_id in self._seen:  # 128 random bits: only a broken RNG gets here
            raise ReplayError(f"query id {commitment.query_id} was already used")
        return commitment

    def add_outstanding(self, commitment: PaymentCommitment) -> None:
        self._outstanding[commitment.query_id] = commitment
        self._seen.add(commitment.query_id)

    def commit(self, identity: Identity, server: str, amount: int, *, now: float,
               ttl: int = DEFAULT_COMMITMENT_TTL_SECS) -> PaymentCommitment:
        commitment = self.prepare_commitment(identity, server, amount, now=now, ttl=ttl)
        self.add_outstanding(commitment)
        return commitment

    def check_receipt(self, receipt: Receipt, *, now: float, expected_digest: str | None = None) -> None:
        """The asker's check of a receipt for its own commitment; raises CreditError naming the fault."""
        if not isinstance(receipt, Receipt):
            raise InvalidReceipt("not a receipt")
        receipt.check()
        qid = receipt.query_id
        if receipt.asker != self.node_id:
            raise InvalidReceipt(f"receipt {qid} is for asker {receipt.asker}, not this node")
        if qid in self._receipts:
            raise ReplayError(f"receipt for query {qid} was already recorded (replay)")
        mine = self._outstanding.get(qid)
        if mine is None:
            raise UnknownCommitment(f"this node has no outstanding commitment for query {qid}")
        if receipt.commitment != mine:
            raise InvalidReceipt(f"receipt {qid} does not carry the commitment this node signed")
        if now > mine.expires_at:
            raise ExpiredCommitment(f"the commitment for query {qid} expired at {mine.expires_at}; "
                                    "its reservation was released")
        if expected_digest is not None and receipt.response_sha256 != expected_digest:
            raise InvalidReceipt(f"receipt {qid} is for a different response than the one received")

    def add_receipt(self, receipt: Receipt) -> None:
        qid = receipt.query_id
        self._receipts[qid] = receipt
        self._seen.add(qid)
        self._outstanding.pop(qid, None)
        self._accepted.pop(qid, None)
        if receipt.server == self.node_id:
            self._earned += receipt.transferred
            self._served_to[receipt.asker] = self._served_to.get(receipt.asker, 0) + receipt.transferred
        if receipt.asker == self.node_id:
            self._spent += receipt.transferred
            self._served_by[receipt.server] = self._served_by.get(receipt.server, 0) + receipt.transferred

    def record_receipt(self, receipt: Receipt, *, now: float, expected_digest: str | None = None) -> None:
        self.check_receipt(receipt, now=now, expected_digest=expected_digest)
        self.add_receipt(receipt)

    # -- server side ----------------------------------------------------------------------------------
    def check_accept(self, commitment: PaymentCommitment, *, now: float, min_amount: int = 0) -> None:
        """The server's check before doing any work; raises CreditError naming the fault."""
        if not isinstance(commitment, PaymentCommitment):
            raise InvalidCommitment("not a payment commitment")
        commitment.check()
        qid = commitment.query_id
        if commitment.server != self.node_id:
            raise InvalidCommitment(f"commitment {qid} is addressed to {commitment.server}, not this node")
        if qid in self._seen:
            raise ReplayError(f"query id {qid} was already used (replayed commitment)")
        if now > commitment.expires_at:
            raise ExpiredCommitment(f"commitment {qid} expired at {commitment.expires_at}")
        if commitment.issued_at - CLOCK_SKEW_SECS > now:
            raise InvalidCommitment(f"commitment {qid} is dated in the future ({commitment.issued_at})")
        if commitment.amount < min_amount:
            raise InvalidCommitment(f"commitment {qid} offers {format_credits(commitment.amount)}, "
                                    f"this node asks {format_credits(min_amount)}")
        line = self.credit_line(commitment.asker, now)
        if commitment.amount > line["available"]:
            raise CreditLineExceeded(
                f"credit line to {commitment.asker} exhausted: {format_credits(commitment.amount)} asked, "
                f"{format_credits(line['available'])} left of {format_credits(line['limit'])} "
                "(initial_balance plus what it served this node); serve this node to extend it")

    def credit_line(self, asker: str, now: float) -> dict[str, int]:
        """CREDIT_LINE_RULE for `asker`, from this node's own receipts (micro-credits)."""
        limit = self.initial_balance + self._served_by.get(asker, 0)
        pending = sum(c.amount for c in self._accepted.values() if c.asker == asker and now <= c.expires_at)
        used = self._served_to.get(asker, 0) + pending
        return {"limit": limit, "used": used, "available": max(0, limit - used)}

    def add_accepted(self, commitment: PaymentCommitment) -> None:
        self._accepted[commitment.query_id] = commitment
        self._seen.add(commitment.query_id)

    def accept(self, commitment: PaymentCommitment, *, now: float, min_amount: int = 0) -> None:
        self.check_accept(commitment, now=now, min_amount=min_amount)
        self.add_accepted(commitment)

    def prepare_delivery(self, identity: Identity, commitment: PaymentCommitment | str, *, success: bool,
                         latency_ms: int, response_sha256: str, now: float) -> Receipt:
        """Sign delivery of an accepted commitment (or its query id); nothing changes until add_receipt."""
        qid = commitment if isinstance(commitment, str) else commitment.query_id
        if qid in self._receipts:
            raise ReplayError(f"query {qid} was already delivered")
        accepted = self._accepted.get(qid)
        if accepted is None:
            raise UnknownCommitment(f"this node never accepted a commitment for query {qid}")
        if not isinstance(commitment, str) and commitment != accepted:
            raise InvalidCommitment(f"commitment {qid} differs from the one this node accepted")
        if now > accepted.expires_at:
            raise ExpiredCommitment(f"commitment {qid} expired at {accepted.expires_at}; it cannot be redeemed")
        return Receipt.deliver(identity, accepted, success=success, latency_ms=latency_ms,
                               response_sha256=response_sha256, now=now)

    def deliver(self, identity: Identity, commitment: PaymentCommitment | str, *, success: bool,
                latency_ms: int, response_sha256: str, now: float) -> Receipt:
        receipt = self.prepare_delivery(identity, commitment, success=success, latency_ms=latency_ms,
                                        response_sha256=response_sha256, now=now)
        self.add_receipt(receipt)
        return receipt

    # -- reading --------------------------------------------------------------------------------------
    def receipts(self, peer: str | None = None) -> list[Receipt]:
        """Receipts held, oldest delivery first; with `peer`, those where it was the other side."""
        out = [r for r in self._receipts.values() if peer is None or peer in (r.asker, r.server)]
        return sorted(out, key=lambda r: (r.delivered_at, r.query_id))

    def receipt(self, query_id: str) -> Receipt | None:
        return self._receipts.get(query_id)

    def outstanding(self, now: float) -> list[PaymentCommitment]:
        return sorted((c for c in self._outstanding.values() if now <= c.expires_at),
                      key=lambda c: (c.issued_at, c.query_id))

    def accepted(self, now: float) -> list[PaymentCommitment]:
        """Commitments accepted as server and not yet delivered nor expired."""
        return sorted((c for c in self._accepted.values() if now <= c.expires_at),
                      key=lambda c: (c.issued_at, c.query_id))

    def score(self, peer: str) -> dict[str, Any]:
        """SCORE_FORMULA for `peer` from the receipts in which it served this node."""
        peer = validate_node_id(peer)
        served_us = [r for r in self._receipts.values() if r.server == peer and r.asker == self.node_id]
        return score_receipts(peer, served_us)

    def summary(self, now: float) -> dict[str, Any]:
        """For /api/status and `pinkybrain credit`: amounts in credits."""
        balance, reserved = self.balance(), self.reserved(now)
        return {
            "node_id": self.node_id,
            "balance": from_micro(balance),
            "available": from_micro(balance - reserved),
            "reserved": from_micro(reserved),
            "initial_balance": from_micro(self.initial_balance),
            "earned": from_micro(self._earned),
            "spent": from_micro(self._spent),
            "receipts": len(self._receipts),
        }
