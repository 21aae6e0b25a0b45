"""Durable credit ledger: every commitment this node makes or accepts and every receipt it holds, in
SQLite (WAL, synchronous=FULL) before the call returns.

ledger.sqlite3 holds signed objects only, as canonical JSON, and every signature is checked again when the
file is opened, so an edited row is reported as damage instead of changing the balance. The query id is
the primary key of both tables: a replayed commitment or receipt is refused here even after a restart.

A damaged file is never silently replaced: opening it raises LedgerStoreCorrupt, names the file, and
says what moving it aside costs (the receipts in it; the balance starts again from initial_balance).

The SQLite plumbing (create-then-rename, header check, exclusive lock, error mapping) is shared with the
other stores through sqlite_store.py.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pinkybrain.node.core.credits import (
    DEFAULT_COMMITMENT_TTL_SECS,
    CreditError,
    Ledger,
    PaymentCommitment,
    Receipt,
    ReplayError,
    from_micro,
    to_micro,
)
from pinkybrain.node.core.identity import Identity, IdentityError, validate_node_id
from pinkybrain.node.services.sqlite_store import (
    Clock,
    DbSpec,
    SqliteStore,
    StoreCorrupt,
    StoreError,
    StoreLocked,
    dumps,
    open_db,
    sqlite_failure,
    write_transaction,
)

LEDGER_FILE = "ledger.sqlite3"
LEDGER_FORMAT = 1


# -- the ledger ---------------------------------------------------------------------------------------
class LedgerStoreError(StoreError):
    pass


class LedgerStoreCorrupt(LedgerStoreError, StoreCorrupt):
    what = "ledger"
    recovery = ("and restart; the receipts in it are lost and the balance starts again from "
                "credit.initial_balance")


class LedgerStoreLocked(LedgerStoreError, StoreLocked):
    pass


_LEDGER_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE commitments (
    query_id TEXT PRIMARY KEY,
    role TEXT NOT NULL CHECK (role IN ('asker', 'server')),
    data TEXT NOT NULL
);
CREATE TABLE receipts (
    query_id TEXT PRIMARY KEY,
    data TEXT NOT NULL
);
"""
_LEDGER_SPEC = DbSpec("ledger", _LEDGER_SCHEMA, ("meta", "commitments", "receipts"), LEDGER_FORMAT,
                      LedgerStoreError, LedgerStoreCorrupt, LedgerStoreLocked)

class LedgerStore(SqliteStore):
    """Thread-safe (one lock) durable ledger of one node. Amounts in and out are credits (floats); the
    signed objects carry integer micro-credits. Every write is durable before the method returns, and the
    in-memory Ledger changes only after the write committed."""

    label = "ledger"
    error = LedgerStoreError

    def __init__(self, path: Path, conn: sqlite3.Connection, ledger: Ledger, clock: Clock):
        super().__init__(path, conn, clock)
        self._ledger = ledger

    @classmethod
    def open(cls, directory: Path, node_id: str, initial_balance: float, *,
             clock: Clock = time.time) -> LedgerStore:
        """Open (creating if absent) `directory`/ledger.sqlite3 for `node_id`.

        `initial_balance` is the config's credit.initial_balance (read at every start). Raises
        LedgerStoreCorrupt for a damaged or edited file, LedgerStoreLocked if another process has it, and
        LedgerStoreError if it belongs to another node id.
        """
        try:
            node_id = validate_node_id(node_id)
        except IdentityError as exc:
            raise LedgerStoreError(str(exc)) from None
        path = Path(directory) / LEDGER_FILE
        conn, meta = open_db(_LEDGER_SPEC, path, {"node_id": node_id})
        try:
            if meta.get("node_id") != node_id:
                raise LedgerStoreError(f"ledger {path} belongs to node {meta.get('node_id')}, not {node_id}; "
                                       "receipts are signed for one identity")
            ledger = _load_ledger(conn, path, node_id, to_micro(initial_balance))
        except sqlite3.Error as exc:
            conn.close()
            raise sqlite_failure(_LEDGER_SPEC, path, exc) from exc
        except BaseException:
            conn.close()
            raise
        return cls(path, conn, ledger, clock)

    # -- asker side -----------------------------------------------------------------------------------
    def commit_payment(self, identity: Identity, server_id: str, amount: float, *,
                       ttl: int = DEFAULT_COMMITMENT_TTL_SECS, now: float | None = None) -> PaymentCommitment:
        """Sign and store a commitment to pay `amount` credits to `server_id`, reserving that credit.
        Send it with the query. Raises InsufficientCredit (carrying EARN_HINT) if it cannot be backed."""
        with self._lock:
            self._check_usable()
            now = self._now(now)
            commitment = self._ledger.prepare_commitment(identity, server_id, to_micro(amount), now=now, ttl=ttl)
            self._insert_commitment("asker", commitment)
            self._ledger.add_outstanding(commitment)
            return commitment

    def record_receipt(self, receipt: Receipt, *, expected_digest: str | None = None,
                       now: float | None = None) -> None:
        """Check the server's receipt against this node's own outstanding commitment (both signatures,
        not replayed, not expired; and, with `expected_digest`, that it is for the response received),
        then store it, turning the reservation into a spend. Raises CreditError naming the fault."""
        with self._lock:
            self._check_usable()
            self._ledger.check_receipt(receipt, now=self._now(now), expected_digest=expected_digest)
            self._insert_receipt(receipt)
            self._ledger.add_receipt(receipt)

    # -- server side ----------------------------------------------------------------------------------
    def accept_commitment(self, commitment: PaymentCommitment, *, min_amount: float = 0.0,
                          now: float | None = None) -> None:
        """Before doing any work: verify the asker's commitment (signature, addressed here, unexpired, at
        least `min_amount`, within the asker's credit line: credits.CREDIT_LINE_RULE) and store its query
        id, so the same commitment is refused forever after. Raises CreditError (CreditLineExceeded...)."""
        with self._lock:
            self._check_usable()
            self._ledger.check_accept(commitment, now=self._now(now), min_amount=to_micro(min_amount))
            self._insert_commitment("server", commitment)
            self._ledger.add_accepted(commitment)

    def deliver(self, identity: Identity, commitment: PaymentCommitment | str, *, success: bool,
                latency_ms: int, response_sha256: str, now: float | None = None) -> Receipt:
        """Sign delivery of an accepted commitment and store the receipt (earning its amount if
        `success`); return it to send to the asker. `response_sha256` is credits.response_digest(reply)."""
        with self._lock:
            self._check_usable()
            receipt = self._ledger.prepare_delivery(identity, commitment, success=success,
                                                    latency_ms=latency_ms, response_sha256=response_sha256,
                                                    now=self._now(now))
            self._insert_receipt(receipt)
            self._ledger.add_receipt(receipt)
            return receipt

    # -- reading --------------------------------------------------------------------------------------
    def balance(self) -> float:
        with self._lock:
            return from_micro(self._ledger.balance())

    def available(self, now: float | None = None) -> float:
        with self._lock:
            return from_micro(self._ledger.available(self._now(now)))

    def can_commit(self, amount: float, now: float | None = None) -> bool:
        with self._lock:
            return self._ledger.can_commit(to_micro(amount), self._now(now))

    def require_credit(self, amount: float, now: float | None = None) -> None:
        """Raise InsufficientCredit (with EARN_HINT) unless `amount` credits can be committed now."""
        with self._lock:
            self._ledger.require_credit(to_micro(amount), self._now(now))

    def credit_line(self, asker: str, now: float | None = None) -> dict[str, float]:
        """The credit line this node extends to `asker` (credits.CREDIT_LINE_RULE), in credits."""
        with self._lock:
            line = self._ledger.credit_line(validate_node_id(asker), self._now(now))
            return {k: from_micro(v) for k, v in line.items()}

    def score(self, peer: str) -> dict[str, Any]:
        """credits.SCORE_FORMULA for `peer`, with its inputs (for /api/score/{peer})."""
        with self._lock:
            return self._ledger.score(peer)

    def receipts(self, peer: str | None = None) -> list[Receipt]:
        with self._lock:
            return self._ledger.receipts(peer)

    def summary(self, now: float | None = None) -> dict[str, Any]:
        with self._lock:
            return self._ledger.summary(self._now(now))

    @property
    def node_id(self) -> str:
        return self._ledger.node_id

    # -- internals ------------------------------------------------------------------------------------
    def _insert_commitment(self, role: str, commitment: PaymentCommitment) -> None:
        try:
            with write_transaction(_LEDGER_SPEC, self.path, self._conn) as conn:
                conn.execute("INSERT INTO commitments (query_id, role, data) VALUES (?, ?, ?)",
                             (commitment.query_id, role, dumps(commitment.to_dict())))
        except sqlite3.IntegrityError:
            # The unique key is the last word on replays, whatever the in-memory state believed.
            raise ReplayError(f"query id {commitment.query_id} was already used (replayed commitment)") from None

    def _insert_receipt(self, receipt: Receipt) -> None:
        try:
            with write_transaction(_LEDGER_SPEC, self.path, self._conn) as conn:
                conn.execute("INSERT INTO receipts (query_id, data) VALUES (?, ?)",
                             (receipt.query_id, dumps(receipt.to_dict())))
        except sqlite3.IntegrityError:
            raise ReplayError(f"receipt for query {receipt.query_id} was already recorded (replay)") from None


def _load_ledger(conn: sqlite3.Connection, path: Path, node_id: str, initial_balance: int) -> Ledger:
    def parse(table: str, qid: str, data: Any, parser: Callable[[Any], Any]) -> Any:
        try:
            obj = parser(json.loads(data))
        except (TypeError, ValueError) as exc:  # CreditError is a ValueError
            raise LedgerStoreCorrupt(path, f"{table} row {qid!r} cannot be read ({exc})") from None
        if obj.query_id != qid:
            raise LedgerStoreCorrupt(path, f"{table} row {qid!r} holds query {obj.query_id}")
        return obj

    commitments = [(role, parse("commitments", qid, data, PaymentCommitment.from_dict))
                   for qid, role, data in conn.execute("SELECT query_id, role, data FROM commitments")]
    receipts = [parse("receipts", qid, data, Receipt.from_dict)
                for qid, data in conn.execute("SELECT query_id, data FROM receipts")]
    try:
        return Ledger.restore(node_id, initial_balance, commitments, receipts)
    except CreditError as exc:
        raise LedgerStoreCorrupt(path, f"a stored commitment or receipt fails its check ({exc}); "
                                       "it was altered") from None
