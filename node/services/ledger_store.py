"""Durable credit ledger: every commitment this node makes or accepts and every receipt it holds, in
SQLite (WAL, synchronous=FULL) before the call returns.

ledger.sqlite3 holds signed objects only, as canonical JSON, and every signature is checked again when the
file is opened, so an edited row is reported as damage instead of changing the balance. The query id is
the primary key of both tables: a replayed commitment or receipt is refused here even after a restart.

A damaged file is never silently replaced: opening it raises LedgerStoreCorrupt, names the file, and
says what moving it aside costs (the receipts in it; the balance starts again from initial_balance).

The SQLite plumbing (create-then-rename, header check, exclusive lock, error mapping) follows
memory_store.py and is shared with trust_store.py through open_signed_db().
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

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

LEDGER_FILE = "ledger.sqlite3"
LEDGER_FORMAT = 1


# -- shared SQLite plumbing ---------------------------------------------------------------------------
class SignedStoreError(Exception):
    """A signed-object store cannot be used; str() says which file and why."""


class SignedStoreCorrupt(SignedStoreError):
    """The file is damaged. It has not been modified; str() says how to recover and what that costs."""

    what = "store"
    recovery = "and restart"

    def __init__(self, path: Path, detail: str):
        self.path = path
        self.detail = detail
        wal = _wal_path(path)
        if path.exists():
            how = f"move it aside (mv {path} {path}.corrupt"
            if wal.exists() and wal.stat().st_size > 0:
                how += f" && mv {wal} {path}.corrupt-wal"
            how += f") {self.recovery}"
        else:
            how = f"move the leftover log aside (mv {wal} {wal}.corrupt) {self.recovery}"
        super().__init__(f"{self.what} {path} is corrupt: {detail}. The file was left as it is; {how}.")


class SignedStoreLocked(SignedStoreError):
    """Another process (normally a running node) has the file open."""


@dataclass(frozen=True)
class DbSpec:
    what: str  # "ledger", "trust store": used in messages
    schema: str
    tables: tuple[str, ...]
    format_version: int
    error: type[SignedStoreError]
    corrupt: type[SignedStoreCorrupt]
    locked: type[SignedStoreError]


def _wal_path(path: Path) -> Path:
    return path.with_name(path.name + "-wal")


def sqlite_failure(spec: DbSpec, path: Path, exc: sqlite3.Error) -> SignedStoreError:
    """Map an sqlite3 error to corrupt / locked / other, so only real damage says 'corrupt'."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc)
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or "malformed" in text or "not a database" in text:
        return spec.corrupt(path, f"SQLite reports {text!r}")
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "database is locked" in text:
        return spec.locked(f"{spec.what} {path} is open in another process (is a node already running?)")
    return spec.error(f"{spec.what} {path}: {text}")


def open_signed_db(spec: DbSpec, path: Path, meta: dict[str, str]) -> tuple[sqlite3.Connection, dict[str, str]]:
    """Open (creating with `meta` if absent) an exclusive WAL + synchronous=FULL connection; return it and
    the stored meta rows. Raises spec.corrupt for damage, spec.locked if another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        wal = _wal_path(path)
        if wal.exists() and wal.stat().st_size > 0:
            # SQLite would replay a stray log into a fresh file: someone removed the database only.
            raise spec.corrupt(path, f"the database file is missing but its write-ahead log {wal} is still there")
        _create(spec, path, meta)
    _check_header(spec, path)
    uri = f"file:{quote(str(path))}?mode=rw"  # never let SQLite create an empty file in place of a lost one
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=2.0)
    except sqlite3.Error as exc:
        raise sqlite_failure(spec, path, exc) from exc
    try:
        # One process owns the file (its in-memory state is the truth); the empty write transaction takes
        # the lock now, so a second node fails here rather than on its first write.
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("COMMIT")
        rows = conn.execute("PRAGMA quick_check").fetchall()
        if rows != [("ok",)]:
            raise spec.corrupt(path, f"SQLite integrity check failed ({'; '.join(str(r[0]) for r in rows[:3])})")
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        missing = [t for t in spec.tables if t not in tables]
        if missing:
            raise spec.corrupt(path, f"not a {spec.what}: table(s) {', '.join(missing)} missing")
        stored = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        fmt = stored.get("format", "")
        if fmt != str(spec.format_version):
            if fmt.isdigit() and int(fmt) > spec.format_version:
                raise spec.error(f"{spec.what} {path} was written by a newer PinkyBrain (format {fmt}); "
                                 "upgrade this node")
            raise spec.corrupt(path, f"unknown {spec.what} format {fmt!r}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
    except sqlite3.Error as exc:
        conn.close()
        raise sqlite_failure(spec, path, exc) from exc
    except BaseException:
        conn.close()
        raise
    return conn, stored


@contextmanager
def write_transaction(spec: DbSpec, path: Path, conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One transaction per write: durable (WAL + synchronous=FULL) when the block exits, rolled back on error.

    sqlite3.IntegrityError propagates as is, so callers can turn a unique-key clash into a replay error.
    """
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield conn
        conn.execute("COMMIT")
    except BaseException as exc:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:  # the original failure is the one worth reporting
                pass
        if isinstance(exc, sqlite3.Error) and not isinstance(exc, sqlite3.IntegrityError):
            raise sqlite_failure(spec, path, exc) from exc
        raise


def _create(spec: DbSpec, path: Path, meta: dict[str, str]) -> None:
    """Build the file under a temporary name and rename it into place, so a table-less file is damage."""
    tmp = path.with_name(f"{path.name}.new-{os.getpid()}")
    for leftover in (tmp, _wal_path(tmp), tmp.with_name(tmp.name + "-shm"), tmp.with_name(tmp.name + "-journal")):
        leftover.unlink(missing_ok=True)
    conn = sqlite3.connect(tmp, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript("BEGIN;" + spec.schema)
        conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                         [("format", str(spec.format_version)), *meta.items()])
        conn.execute("COMMIT")
    finally:
        conn.close()
    os.chmod(tmp, 0o600)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _check_header(spec: DbSpec, path: Path) -> None:
    try:
        with open(path, "rb") as f:
            header = f.read(100)
    except OSError as exc:
        raise spec.error(f"{spec.what} {path} cannot be read: {exc}") from exc
    if not header:
        raise spec.corrupt(path, "the file is empty (truncated)")
    if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
        raise spec.corrupt(path, "the file does not start with an SQLite header (overwritten or truncated)")


def dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


# -- the ledger ---------------------------------------------------------------------------------------
class LedgerStoreError(SignedStoreError):
    pass


class LedgerStoreCorrupt(LedgerStoreError, SignedStoreCorrupt):
    what = "ledger"
    recovery = ("and restart; the receipts in it are lost and the balance starts again from "
                "credit.initial_balance")


class LedgerStoreLocked(LedgerStoreError, SignedStoreLocked):
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

Clock = Callable[[], float]


class SignedStore:
    """What the signed SQLite stores share: one lock, one connection, a clock, and a closed state."""

    label = "store"  # how messages name the store
    error = SignedStoreError  # the store's own error class

    def __init__(self, path: Path, conn: sqlite3.Connection, clock: Clock):
        self.path = path
        self._conn = conn
        self._clock = clock
        self._lock = threading.RLock()
        self._closed = False

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else now

    def _check_usable(self) -> None:
        if self._closed:
            raise self.error(f"{self.label} {self.path} is closed")


class LedgerStore(SignedStore):
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
        conn, meta = open_signed_db(_LEDGER_SPEC, path, {"node_id": node_id})
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
        least `min_amount`) and store its query id, so the same commitment is refused forever after."""
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
