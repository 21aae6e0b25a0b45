"""The SQLite plumbing every durable store of the node shares (memory, ledger, trust).

A store is one file in WAL mode with synchronous=FULL, owned by one process (exclusive lock, taken at
open), created under a temporary name and renamed into place so an empty or table-less file can only be
damage. Opening checks the header, SQLite's integrity and the schema before changing anything; damage
raises the store's Corrupt error, which names the file and says how to recover, and the file is left as
it is. SQLite errors are mapped to corrupt / locked / other, so only real damage says "corrupt".
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote


class StoreError(Exception):
    """A store cannot be used; str() says which file and why."""


class StoreCorrupt(StoreError):
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


class StoreLocked(StoreError):
    """Another process (normally a running node) has the file open."""


@dataclass(frozen=True)
class DbSpec:
    what: str  # "ledger", "trust store", "memory store": used in messages
    schema: str
    tables: tuple[str, ...]
    format_version: int
    error: type[StoreError]
    corrupt: type[StoreCorrupt]
    locked: type[StoreError]
    create_pragmas: tuple[str, ...] = ()  # run on a new file before any table exists (e.g. auto_vacuum)


def _wal_path(path: Path) -> Path:
    return path.with_name(path.name + "-wal")


def sqlite_failure(spec: DbSpec, path: Path, exc: sqlite3.Error) -> StoreError:
    """Map an sqlite3 error to corrupt / locked / other, so only real damage says 'corrupt'."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc)
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or "malformed" in text or "not a database" in text:
        return spec.corrupt(path, f"SQLite reports {text!r}")
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "database is locked" in text:
        return spec.locked(f"{spec.what} {path} is open in another process (is a node already running?)")
    return spec.error(f"{spec.what} {path}: {text}")


def open_db(spec: DbSpec, path: Path, meta: dict[str, str]) -> tuple[sqlite3.Connection, dict[str, str]]:
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
        for pragma in spec.create_pragmas:
            conn.execute(f"PRAGMA {pragma}")
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


Clock = Callable[[], float]


class SqliteStore:
    """What the SQLite stores share: one lock, one connection, a clock, and a closed state."""

    label = "store"  # how messages name the store
    error = StoreError  # the store's own error class

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
