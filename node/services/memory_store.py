"""Durable CRDT memory: a MemoryDoc whose every accepted update is in SQLite before the write returns.

One SQLite file per network namespace (memory-private.sqlite3, memory-public.sqlite3, ...), in WAL mode
with synchronous=FULL so a committed row survives a crash or power loss. The file holds at most one
snapshot (the whole document as one Yjs update) plus the log of updates accepted since, each with its
SHA-256. Opening replays snapshot + log; compaction folds the log into the snapshot every N updates.

A damaged file is never silently replaced by an empty store: opening it raises MemoryStoreCorrupt,
naming the file and the way out (move it aside, restart, let peers resync it), and leaves it untouched.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pinkybrain.node.core.memory_doc import (
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_KEY_BYTES,
    DEFAULT_MAX_VALUE_BYTES,
    MemoryDoc,
    MemoryUpdateError,
)
from pinkybrain.node.services.sqlite_store import (
    DbSpec,
    StoreCorrupt,
    StoreError,
    StoreLocked,
    open_db,
    sqlite_failure,
)

log = logging.getLogger("pinkybrain.memory")

FORMAT_VERSION = 1
DEFAULT_COMPACT_EVERY = 1000
_NAMESPACE_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}\Z")
_TABLES = ("meta", "snapshot", "updates")
_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE snapshot (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    data BLOB NOT NULL,
    sha256 BLOB NOT NULL
);
CREATE TABLE updates (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    data BLOB NOT NULL,
    sha256 BLOB NOT NULL,
    origin TEXT NOT NULL CHECK (origin IN ('local', 'remote'))
);
"""

Listener = Callable[[bytes], None]


class MemoryStoreError(StoreError):
    """The memory store cannot be used; str() says which file and why."""


class MemoryStoreCorrupt(MemoryStoreError, StoreCorrupt):
    """The store file is damaged. It has not been modified; str() says how to recover."""

    what = "memory store"
    recovery = "and restart; peers will resync it"


class MemoryStoreLocked(MemoryStoreError, StoreLocked):
    """Another process (normally a running node) has the store open."""


_SPEC = DbSpec("memory store", _SCHEMA, _TABLES, FORMAT_VERSION, MemoryStoreError, MemoryStoreCorrupt,
               MemoryStoreLocked,
               # Before any table exists: compaction then gives the log's pages back to the file system.
               create_pragmas=("auto_vacuum=FULL",))


def store_path(directory: Path, namespace: str) -> Path:
    """The database file of `namespace` under `directory` (ValueError for an unsafe namespace)."""
    if not isinstance(namespace, str) or not _NAMESPACE_RE.match(namespace):
        raise ValueError(f"memory namespace must match [a-z0-9][a-z0-9_-]{{0,63}}, got {namespace!r}")
    return Path(directory) / f"memory-{namespace}.sqlite3"


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


class MemoryStore:
    """Thread-safe (one lock) durable memory. Open with MemoryStore.open(); call from a thread pool."""

    def __init__(self, path: Path, namespace: str, conn: sqlite3.Connection, doc: MemoryDoc, pending: int,
                 compact_every: int):
        self.path = path
        self.namespace = namespace
        self.compact_every = compact_every
        self._conn = conn
        self._doc = doc
        self._pending = pending
        self._lock = threading.RLock()  # re-entrant so a listener may read the store it is called from
        self._listeners: list[Listener] = []
        self._closed = False
        self._failed: MemoryStoreError | None = None
        self.commits = 0  # durable transactions (fsyncs of the log), for status and benchmarks

    @classmethod
    def open(
        cls,
        directory: Path,
        namespace: str,
        max_key_bytes: int = DEFAULT_MAX_KEY_BYTES,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        *,
        compact_every: int = DEFAULT_COMPACT_EVERY,
        max_depth: int = DEFAULT_MAX_DEPTH,
    ) -> MemoryStore:
        """Open (creating if absent) the store of `namespace` in `directory`.

        Raises MemoryStoreCorrupt for a damaged file, MemoryStoreLocked if another process has it open.
        """
        if compact_every < 1:
            raise ValueError("compact_every must be at least 1")
        path = store_path(directory, namespace)
        conn, _ = open_db(_SPEC, path, {"namespace": namespace})
        try:
            doc, pending = _load(conn, path, max_key_bytes, max_value_bytes, max_depth)
        except sqlite3.Error as exc:
            conn.close()
            raise sqlite_failure(_SPEC, path, exc) from exc
        except BaseException:
            conn.close()
            raise
        store = cls(path, namespace, conn, doc, pending, compact_every)
        if pending >= compact_every:
            store._auto_compact()
        return store

    # -- reads --------------------------------------------------------------------------------------
    def get(self, key: str) -> Any:
        """The value under `key`; KeyError if absent."""
        with self._lock:
            self._check_usable()
            return self._doc.get(key)

    def list(self, prefix: str = "") -> list[str]:
        with self._lock:
            self._check_usable()
            return self._doc.list(prefix)

    def items(self, prefix: str = "") -> list[tuple[str, Any]]:
        with self._lock:
            self._check_usable()
            return self._doc.items(prefix)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            self._check_usable()
            return key in self._doc

    def __len__(self) -> int:
        with self._lock:
            self._check_usable()
            return len(self._doc)

    @property
    def update_count(self) -> int:
        """Updates logged since the last snapshot (compaction resets it to 0)."""
        with self._lock:
            return self._pending

    # -- local writes -------------------------------------------------------------------------------
    def set(self, key: str, value: Any) -> bytes:
        """Store `value` under `key`; returns once durable, with the Yjs update to send to peers."""
        return self._single(self.write_batch([("set", key, value)]))

    def delete(self, key: str) -> bytes:
        """Remove `key` (KeyError if absent); returns once durable, with the Yjs update."""
        return self._single(self.write_batch([("delete", key, None)]))

    def write_batch(self, ops: list[tuple[str, str, Any]]) -> list[bytes | Exception]:
        """Local writes made durable together: one transaction, so one fsync for all (group commit).

        `ops` are ("set", key, value) or ("delete", key, None). Each op's own refusal (bad key or value,
        a limit, an absent key) takes its place in the result instead of its Yjs update and changes
        nothing; a commit that fails raises for all of them, and none is visible or sent to peers.
        """
        with self._lock:
            self._check_usable()
            results: list[bytes | Exception] = []
            for kind, key, value in ops:
                try:
                    results.append(self._doc.set(key, value) if kind == "set" else self._doc.delete(key))
                except Exception as exc:  # noqa: BLE001 - the document refused this op alone, in memory
                    results.append(exc)
            updates = [r for r in results if isinstance(r, bytes)]
            if updates:
                self._persist(updates, "local")
                for update in updates:
                    self._notify(update)
            return results

    @staticmethod
    def _single(results: list[bytes | Exception]) -> bytes:
        if isinstance(results[0], Exception):
            raise results[0]
        return results[0]

    # -- sync ---------------------------------------------------------------------------------------
    def add_listener(self, callback: Listener) -> Callable[[], None]:
        """Call `callback(update)` after each durable local write; returns a function that removes it.

        It runs on the writing thread with the store locked, so updates arrive in write order: keep it
        short (hand the bytes to an event loop with call_soon_threadsafe, say). Its errors are logged.
        """
        with self._lock:
            self._listeners.append(callback)
        return lambda: self.remove_listener(callback)

    def remove_listener(self, callback: Listener) -> None:
        with self._lock:
            if callback in self._listeners:
                self._listeners.remove(callback)

    def apply_remote(self, update: bytes) -> bool:
        """Validate, apply and persist a peer's update; returns whether it changed anything.

        Raises MemoryUpdateError (nothing applied or stored) for an invalid update. Already-known
        updates are not logged again.
        """
        with self._lock:
            self._check_usable()
            # What was applied, not the raw update: content left waiting for its dependencies is not
            # stored, so a restart can never merge in an entry that was not checked.
            applied = self._doc.integrate_remote(update)
            if applied is not None:
                self._persist([applied], "remote")
            return applied is not None

    def state_vector(self) -> bytes:
        with self._lock:
            self._check_usable()
            return self._doc.state_vector()

    def diff(self, remote_state_vector: bytes) -> bytes:
        with self._lock:
            self._check_usable()
            return self._doc.diff(remote_state_vector)

    def full_update(self) -> bytes:
        with self._lock:
            self._check_usable()
            return self._doc.full_update()

    def diff_and_fingerprint(self, remote_state_vector: bytes) -> tuple[bytes, dict[str, str]]:
        """diff() and the fingerprint of the document it came from, taken together."""
        with self._lock:
            self._check_usable()
            return self._doc.diff(remote_state_vector), self._doc.fingerprint()

    def fingerprint(self) -> dict[str, str]:
        with self._lock:
            self._check_usable()
            return self._doc.fingerprint()

    def entry_digests(self) -> tuple[dict[str, str], dict[str, str]]:
        """(fingerprint, digest of each entry), taken together."""
        with self._lock:
            self._check_usable()
            return self._doc.fingerprint(), self._doc.entry_digests()

    def drop_diverged(self, peer_state: str, peer_digests: dict[str, str]) -> list[str]:
        """Delete the entries a peer holding the same Yjs items shows differently; returns their keys.

        Same items, different values means someone equivocated (one client id and clock, two contents).
        Deleting an entry deletes its item id, whatever content each copy holds under it, so the delete
        reaches every copy and they agree again: a value that was given out two ways is not kept. Nothing
        happens unless our fingerprint's state still equals `peer_state` (no write in between).
        """
        with self._lock:
            self._check_usable()
            if self._doc.fingerprint()["state"] != peer_state:
                return []
            mine = self._doc.entry_digests()
            diverged = sorted(key for key, digest in mine.items() if peer_digests.get(key) != digest)
            for key in diverged:
                self.delete(key)
            return diverged

    # -- maintenance --------------------------------------------------------------------------------
    def compact(self) -> None:
        """Fold the snapshot and all logged updates into one snapshot row, in one transaction."""
        with self._lock:
            self._check_usable()
            snapshot = self._doc.full_update()
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.execute(
                    "INSERT OR REPLACE INTO snapshot (id, data, sha256) VALUES (1, ?, ?)",
                    (snapshot, _digest(snapshot)),
                )
                # The file is locked to this connection, so every logged row is already in the document.
                self._conn.execute("DELETE FROM updates")
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise sqlite_failure(_SPEC, self.path, exc) from exc
            self._pending = 0

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()  # the last connection checkpoints the WAL into the file

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self._closed:
            raise MemoryStoreError(f"memory store {self.path} is closed")
        if self._failed is not None:
            raise self._failed

    def _persist(self, updates: list[bytes], origin: str) -> None:
        try:
            # One transaction: with WAL + synchronous=FULL, COMMIT fsyncs every row at once.
            self._conn.execute("BEGIN IMMEDIATE")
            for update in updates:
                self._conn.execute(
                    "INSERT INTO updates (data, sha256, origin) VALUES (?, ?, ?)", (update, _digest(update), origin)
                )
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            failure = sqlite_failure(_SPEC, self.path, exc)
            self._reload_after_failed_write()
            raise failure from exc
        self.commits += 1
        self._pending += len(updates)
        if self._pending >= self.compact_every:
            self._auto_compact()

    def _reload_after_failed_write(self) -> None:
        # The document already holds the write the disk refused; rebuild it from what is durable so
        # readers and peers never see a value that a restart would lose.
        try:
            self._doc, self._pending = _load(self._conn, self.path, self._doc.max_key_bytes,
                                             self._doc.max_value_bytes, self._doc.max_depth)
        except (sqlite3.Error, MemoryStoreError) as exc:
            self._failed = (sqlite_failure(_SPEC, self.path, exc) if isinstance(exc, sqlite3.Error) else exc)
            log.error("memory store %s unusable after a failed write: %s", self.path, self._failed)

    def _auto_compact(self) -> None:
        try:
            self.compact()
        except MemoryStoreError as exc:  # the write itself is durable; a later compaction can retry
            log.warning("memory store %s: compaction failed: %s", self.path, exc)

    def _notify(self, update: bytes) -> None:
        for callback in list(self._listeners):
            try:
                callback(update)
            except Exception:
                log.exception("memory store %s: listener %r failed", self.path, callback)


def _load(conn: sqlite3.Connection, path: Path, max_key_bytes: int, max_value_bytes: int,
          max_depth: int) -> tuple[MemoryDoc, int]:
    """The document from snapshot + log, and how many log rows there were."""
    count = 0

    def blobs() -> Iterator[bytes]:
        nonlocal count
        # CAST: a damaged row may come back as (undecodable) text; as bytes it fails the digest instead.
        row = conn.execute("SELECT CAST(data AS BLOB), sha256 FROM snapshot WHERE id = 1").fetchone()
        if row is not None:
            if _digest(row[0]) != row[1]:
                raise MemoryStoreCorrupt(path, "the snapshot fails its SHA-256 check")
            yield row[0]
        rows = conn.execute("SELECT seq, CAST(data AS BLOB), sha256 FROM updates ORDER BY seq").fetchall()
        for seq, data, digest in rows:
            if _digest(data) != digest:
                raise MemoryStoreCorrupt(path, f"logged update #{seq} fails its SHA-256 check")
            count += 1
            yield data

    try:
        doc = MemoryDoc.from_updates(blobs(), max_key_bytes, max_value_bytes, max_depth)
    except MemoryUpdateError as exc:
        raise MemoryStoreCorrupt(path, f"stored updates do not form a valid document ({exc})") from exc
    return doc, count
