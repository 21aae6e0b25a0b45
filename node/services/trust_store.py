"""Durable Web of Trust: every attestation and revocation this node knows (its own and its peers'), in
SQLite (WAL, synchronous=FULL) before the call returns, loaded into a TrustGraph at open.

trust.sqlite3 holds signed statements only, as canonical JSON; every signature is checked again at open,
so an edited row is reported as damage instead of changing who is trusted. Owner-trust (how far the
owner trusts a key to introduce others: none, marginal, full) is this node's own setting, kept in the same
file and never sent to anyone. Moving a damaged file aside
loses this node's own vouches (re-vouch your peers); peers' statements come back at the next exchange.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pinkybrain.node.core.identity import Identity, IdentityError, validate_node_id
from pinkybrain.node.core.trust import (
    DEFAULT_MARGINALS_NEEDED,
    DEFAULT_MAX_DEPTH,
    DEFAULT_TTL_SECS,
    INTRODUCER_LEVELS,
    VALIDITY_RULE,
    Attestation,
    MergeResult,
    Revocation,
    Statement,
    TrustError,
    TrustGraph,
    Verdict,
    statement_from_dict,
)
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

TRUST_FILE = "trust.sqlite3"
TRUST_FORMAT = 1


class TrustStoreError(StoreError):
    pass


class TrustStoreCorrupt(TrustStoreError, StoreCorrupt):
    what = "trust store"
    recovery = ("and restart; this node's own vouches in it are lost (vouch again), peers' attestations "
                "return at the next exchange")


class TrustStoreLocked(TrustStoreError, StoreLocked):
    pass


_TRUST_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE attestations (
    issuer TEXT NOT NULL,
    serial TEXT NOT NULL,
    subject TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (issuer, serial)
);
CREATE TABLE revocations (
    issuer TEXT NOT NULL,
    serial TEXT NOT NULL,
    subject TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (issuer, serial)
);
CREATE TABLE owner_trust (subject TEXT PRIMARY KEY, level TEXT NOT NULL);
"""
# Added after format 1 first shipped: created on open when an older file lacks it (nothing to migrate).
_OWNER_TRUST_TABLE = "CREATE TABLE IF NOT EXISTS owner_trust (subject TEXT PRIMARY KEY, level TEXT NOT NULL)"
_TRUST_SPEC = DbSpec("trust store", _TRUST_SCHEMA, ("meta", "attestations", "revocations"), TRUST_FORMAT,
                     TrustStoreError, TrustStoreCorrupt, TrustStoreLocked)



class TrustStore(SqliteStore):
    """Thread-safe (one lock) durable trust graph, evaluated from `anchor` (this node's id) with the
    configured max_depth and marginals_needed."""

    label = "trust store"
    error = TrustStoreError

    def __init__(self, path: Path, conn: sqlite3.Connection, graph: TrustGraph, anchor: str, max_depth: int,
                 marginals_needed: int, clock: Clock, owner_trust: dict[str, str] | None = None):
        super().__init__(path, conn, clock)
        self.anchor = anchor
        self.max_depth = max_depth
        self.marginals_needed = marginals_needed
        self._graph = graph
        self._owner_trust: dict[str, str] = dict(owner_trust or {})
        # Bumped on every change, so callers may cache what they computed from the store (validity also
        # changes with time: vouches expire, so caches must age out too).
        self.revision = 0

    @classmethod
    def open(cls, directory: Path, anchor: str, *, max_depth: int = DEFAULT_MAX_DEPTH,
             marginals_needed: int = DEFAULT_MARGINALS_NEEDED, clock: Clock = time.time) -> TrustStore:
        """Open (creating if absent) `directory`/trust.sqlite3. Raises TrustStoreCorrupt for a damaged or
        edited file, TrustStoreLocked if another process has it open."""
        try:
            anchor = validate_node_id(anchor)
        except IdentityError as exc:
            raise TrustStoreError(str(exc)) from None
        if max_depth < 0 or marginals_needed < 1:
            raise ValueError("max_depth must be >= 0 and marginals_needed >= 1")
        path = Path(directory) / TRUST_FILE
        conn, _meta = open_db(_TRUST_SPEC, path, {})
        try:
            graph = _load_graph(conn, path)
            conn.execute(_OWNER_TRUST_TABLE)
            owner_trust = _load_owner_trust(conn, path)
        except sqlite3.Error as exc:
            conn.close()
            raise sqlite_failure(_TRUST_SPEC, path, exc) from exc
        except BaseException:
            conn.close()
            raise
        return cls(path, conn, graph, anchor, max_depth, marginals_needed, clock, owner_trust)

    # -- this node's own statements -------------------------------------------------------------------
    def vouch(self, identity: Identity, subject: str, level: str = "full", *, ttl: int = DEFAULT_TTL_SECS,
              now: float | None = None) -> Attestation:
        """`trust vouch ID`: sign and store an attestation (this node's owner says the key is who it claims
        to be: it becomes valid here); return it. `level` is a note for others, not a weight."""
        with self._lock:
            self._check_usable()
            now = self._now(now)
            try:
                subject = validate_node_id(subject)
            except IdentityError as exc:
                raise TrustError(str(exc)) from None
            # A revocation wins ties (same second), so a re-vouch right after a revoke is dated after it.
            last_revoked = max((r.issued_at for r in self._graph.revocations()
                                if r.issuer == identity.node_id and r.subject == subject
                                and r.attestation_serial is None and r.issued_at <= now), default=None)
            if last_revoked is not None and int(now) <= last_revoked:
                now = last_revoked + 1
            att = Attestation.sign(identity, subject, level, ttl=ttl, now=now)
            self._persist([att])
            return att

    def revoke(self, identity: Identity, subject: str, *, attestation_serial: str | None = None,
               now: float | None = None) -> Revocation:
        """`trust revoke ID`: withdraw every attestation this node made about `subject` so far (or only
        `attestation_serial`). The revocation is kept and sent to peers like attestations are."""
        with self._lock:
            self._check_usable()
            rev = Revocation.sign(identity, subject, now=self._now(now), attestation_serial=attestation_serial)
            self._persist([rev])
            return rev

    def set_owner_trust(self, subject: str, level: str) -> None:
        """`trust set ID --introducer none|marginal|full`: how far this node trusts `subject` to introduce
        others. Local only; it matters once `subject` is valid."""
        if level not in INTRODUCER_LEVELS:
            raise TrustError(f"introducer trust must be one of {', '.join(INTRODUCER_LEVELS)}, not {level!r}")
        try:
            subject = validate_node_id(subject)
        except IdentityError as exc:
            raise TrustError(str(exc)) from None
        if subject == self.anchor:
            raise TrustError("this node's own key is always fully trusted: it is the anchor")
        with self._lock:
            self._check_usable()
            with write_transaction(_TRUST_SPEC, self.path, self._conn) as conn:
                if level == "none":
                    conn.execute("DELETE FROM owner_trust WHERE subject = ?", (subject,))
                else:
                    conn.execute("INSERT OR REPLACE INTO owner_trust (subject, level) VALUES (?, ?)",
                                 (subject, level))
            if level == "none":
                self._owner_trust.pop(subject, None)
            else:
                self._owner_trust[subject] = level
            self.revision += 1

    def owner_trust(self, subject: str | None = None) -> Any:
        """The owner-trust of `subject` ('none' when unset), or with no argument a copy of the whole map."""
        with self._lock:
            if subject is None:
                return dict(self._owner_trust)
            return self._owner_trust.get(subject, "none")

    # -- statements from anywhere ---------------------------------------------------------------------
    def add(self, item: Statement | dict[str, Any]) -> bool:
        """Store one statement (object or wire dict) from any source; True if new. Raises TrustError for
        a malformed or forged one (nothing stored)."""
        with self._lock:
            self._check_usable()
            item = item if isinstance(item, (Attestation, Revocation)) else statement_from_dict(item)
            if not self._graph.validate(item):
                return False
            self._persist([item])
            return True

    def merge(self, items: Iterable[Any], *, only_from_valid: bool = False,
              now: float | None = None) -> MergeResult:
        """Store a batch from a peer in one transaction; bad items are listed in the result, not raised.

        With `only_from_valid`, statements whose issuer is not valid for this node are refused, so an
        unknown peer cannot fill the store with attestations among keys of its own making. Items may
        depend on each other (A vouches B, B vouches C): the batch is passed over until nothing changes.
        """
        with self._lock:
            self._check_usable()
            now = self._now(now)
            result = MergeResult()
            pending: list[Statement] = []
            for raw in items:
                try:
                    item = raw if isinstance(raw, (Attestation, Revocation)) else statement_from_dict(raw)
                    if self._graph.validate(item):
                        pending.append(item)
                    else:
                        result.duplicates += 1
                except TrustError as exc:
                    result.rejected.append(str(exc))
            trial = TrustGraph()
            for item in self._graph.attestations() + self._graph.revocations():
                trial.add(item)
            accepted: list[Statement] = []
            while pending:
                valid = self._valid_in(trial, now) if only_from_valid else None
                waiting: list[Statement] = []
                for item in pending:
                    if valid is not None and item.issuer not in valid:
                        waiting.append(item)  # its issuer may become valid through this same batch
                        continue
                    try:
                        if trial.add(item):
                            accepted.append(item)
                        else:  # the same statement twice in one batch is one statement
                            result.duplicates += 1
                    except TrustError as exc:  # one serial used for two different statements in the batch
                        result.rejected.append(str(exc))
                if len(waiting) == len(pending):
                    break
                pending = waiting
            result.rejected += [f"{type(i).__name__.lower()} by {i.issuer}: its issuer is not valid for this node"
                                for i in pending]
            if accepted:
                self._persist(accepted)
            result.accepted = len(accepted)
            return result

    # -- reading --------------------------------------------------------------------------------------
    def is_valid(self, subject: str, *, now: float | None = None) -> Verdict:
        """May this peer take part in the public mesh? Verdict with path and reasons (VALIDITY_RULE)."""
        with self._lock:
            self._check_usable()
            return self._graph.is_valid(subject, anchor=self.anchor, now=self._now(now),
                                        owner_trust=self._owner_trust, max_depth=self.max_depth,
                                        marginals_needed=self.marginals_needed)

    def valid_keys(self, *, now: float | None = None) -> dict[str, int]:
        """Every valid node id with its depth (the anchor at 0)."""
        with self._lock:
            self._check_usable()
            return self._valid_in(self._graph, self._now(now))

    def show(self, subject: str, *, now: float | None = None) -> dict[str, Any]:
        """`trust show ID`: the verdict, the rule, and every known attestation about ID with its status."""
        with self._lock:
            self._check_usable()
            now = self._now(now)
            verdict = self.is_valid(subject, now=now)
            atts = self._graph.attestations_about(verdict.subject)
            return {
                **verdict.to_dict(),
                "anchor": self.anchor,
                "introducer": self._owner_trust.get(verdict.subject, "none"),
                "max_depth": self.max_depth,
                "marginals_needed": self.marginals_needed,
                "attestations": [{**a.to_dict(), "status": self._graph.status(a, now)} for a in atts],
                "revocations": [r.to_dict() for r in self._graph.revocations() if r.subject == verdict.subject],
                "rule": VALIDITY_RULE,
            }

    def export_for_peer(self, *, now: float | None = None) -> dict[str, list[dict[str, Any]]]:
        """What to send a public peer: attestations that count now and whose issuer is valid for this
        node (its own and those it relies on; never strangers' spam), plus the revocations by those
        issuers that can still matter, so a withdrawn vouch stops counting on the peer too."""
        with self._lock:
            self._check_usable()
            now = self._now(now)
            valid = self._valid_in(self._graph, now)
            atts = [a.to_dict() for a in self._graph.attestations()
                    if a.issuer in valid and self._graph.status(a, now) == "counts"]
            revs = [r.to_dict() for r in self._graph.revocations()
                    if r.issuer in valid and now < r.prunable_after]
            return {"attestations": atts, "revocations": revs}

    def graph(self) -> TrustGraph:
        """A copy of the graph (safe to evaluate outside the lock)."""
        with self._lock:
            self._check_usable()
            copy = TrustGraph()
            for item in self._graph.attestations() + self._graph.revocations():
                copy.add(item)
            return copy

    def prune(self, *, now: float | None = None) -> int:
        """Forget expired attestations and revocations too old to matter; returns how many."""
        with self._lock:
            self._check_usable()
            old = self._graph.prunable(self._now(now))
            if not old:
                return 0
            with write_transaction(_TRUST_SPEC, self.path, self._conn) as conn:
                for item in old:
                    table = "attestations" if isinstance(item, Attestation) else "revocations"
                    conn.execute(f"DELETE FROM {table} WHERE issuer = ? AND serial = ?",  # noqa: S608 fixed names
                                 (item.issuer, item.serial))
            for item in old:
                self._graph.remove(item)
            self.revision += 1
            return len(old)

    def __len__(self) -> int:
        with self._lock:
            return len(self._graph)

    # -- internals ------------------------------------------------------------------------------------
    def _valid_in(self, graph: TrustGraph, now: float) -> dict[str, int]:
        return graph.valid_keys(anchor=self.anchor, now=now, owner_trust=self._owner_trust,
                                max_depth=self.max_depth, marginals_needed=self.marginals_needed)

    def _persist(self, items: list[Statement]) -> None:
        """Write `items` in one transaction, then (only then) add them to the graph."""
        with write_transaction(_TRUST_SPEC, self.path, self._conn) as conn:
            for item in items:
                table = "attestations" if isinstance(item, Attestation) else "revocations"
                # OR IGNORE: (issuer, serial) already stored means the same statement (validate() refused a
                # different one), so nothing is lost.
                conn.execute(f"INSERT OR IGNORE INTO {table} (issuer, serial, subject, data) "  # noqa: S608
                             "VALUES (?, ?, ?, ?)", (item.issuer, item.serial, item.subject, dumps(item.to_dict())))
        for item in items:
            self._graph.add(item)
        self.revision += 1


def _load_owner_trust(conn: sqlite3.Connection, path: Path) -> dict[str, str]:
    out = {}
    for subject, level in conn.execute("SELECT subject, level FROM owner_trust").fetchall():
        try:
            canonical = validate_node_id(subject)
        except IdentityError:
            canonical = None
        if canonical != subject or level not in INTRODUCER_LEVELS:
            raise TrustStoreCorrupt(path, f"owner_trust row ({subject!r}, {level!r}) is not a node id and level")
        out[subject] = level
    return out


def _load_graph(conn: sqlite3.Connection, path: Path) -> TrustGraph:
    graph = TrustGraph()
    for table in ("attestations", "revocations"):
        rows = conn.execute(f"SELECT issuer, serial, data FROM {table}").fetchall()  # noqa: S608 fixed names
        for issuer, serial, data in rows:
            try:
                item = statement_from_dict(json.loads(data))
                graph.add(item)
            except (TypeError, ValueError) as exc:  # TrustError is a ValueError
                raise TrustStoreCorrupt(path, f"{table} row ({issuer}, {serial}) fails its check ({exc}); "
                                              "it was altered") from None
            if (item.issuer, item.serial) != (issuer, serial) or table[:-1] != type(item).__name__.lower():
                raise TrustStoreCorrupt(path, f"{table} row ({issuer}, {serial}) holds a different statement")
    return graph
