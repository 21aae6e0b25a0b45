"""Conversation history: every query and its answer, per session, encrypted at rest and searchable.

Storage: one SQLite file, `<directory>/conversations.db`, in WAL mode with synchronous=FULL. Each
`record` is one transaction, so a crash loses at most the write in flight and never leaves the file
unreadable. Sessions idle for longer than `retention_days` are purged (at open and on the node's schedule).

Encryption at rest: the key given to `open` (32 bytes, derived by the node from its identity) and a random
per-store salt feed HKDF-SHA256, which derives two subkeys. Message bodies (prompt or answer text and the
exchange's metadata) and session titles are sealed with AES-256-GCM under the first; the associated data
binds each ciphertext to its session, message id and role, so rows cannot be swapped unnoticed. A sealed
known value in the meta table tells a wrong key apart from damage at open.

Search without plaintext on disk ("blind index"): text is cut into tokens (NFKC, case-folded, Unicode
words; CJK ideographs and kana one character each, since those scripts put no spaces between words).
Each distinct token is replaced by HMAC-SHA256(second subkey, token) truncated to 8 bytes, and the set of
those per message goes into a contentless FTS5 table with detail=none: no positions, no counts, no text.
A query is tokenized and hashed the same way and matches messages holding every query token (AND).
Hits are then decrypted, checked against the real tokens (a truncated-hash collision cannot produce a false
hit) and ranked by BM25 over token sets: all hits share the query's IDF, so shorter messages rank
first, then newer ones. Prefix, phrase and boolean syntax are not supported: every word is literal.

Trade-off, stated plainly: without the key the file shows no text, but the blind index still shows which
messages share a token (equality), how many messages hold each token (frequency, open to frequency
analysis over a large history) and how many distinct tokens each message has. Also in the clear:
session ids, timestamps, privacy levels, roles, message counts and ciphertext sizes (about the text size).
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
import math
import os
import re
import secrets
import sqlite3
import sys
import threading
import time
import unicodedata
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

log = logging.getLogger(__name__)

PRIVACY_LEVELS = ("private", "peers-only", "public")
EXPORT_FORMATS = ("json", "markdown")
DB_NAME = "conversations.db"
SCHEMA_VERSION = 1
INDEX_VERSION = 1  # bump whenever tokenization changes: the blind index is then rebuilt at open
TITLE_CHARS = 60
SNIPPET_CHARS = 160
MAX_TOKEN_CHARS = 64
MAX_QUERY_TOKENS = 64
MAX_LIMIT = 1000
DAY_SECS = 86400.0

_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_KEY_CHECK = b"pinkybrain conversation store key check v1"
_ENVELOPE = b"\x01"  # ciphertext layout version: 1 = AES-256-GCM, 12-byte random nonce
_NONCE_BYTES = 12
_HASH_BYTES = 8  # 2^-64 per-pair collisions, and hits are verified after decryption anyway
_BM25_K1, _BM25_B = 1.2, 0.75
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"

_SCHEMA = (
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL)",
    """CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        privacy TEXT NOT NULL,
        message_count INTEGER NOT NULL DEFAULT 0,
        title BLOB NOT NULL
    )""",
    "CREATE INDEX sessions_updated ON sessions(updated_at)",
    # AUTOINCREMENT: ids are never reused, so an index entry that outlives its message can never match
    # a newer message (search joins on messages).
    """CREATE TABLE messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        role TEXT NOT NULL,
        created_at REAL NOT NULL,
        ntok INTEGER NOT NULL,
        body BLOB NOT NULL
    )""",
    "CREATE INDEX messages_session ON messages(session_id, id)",
    "CREATE VIRTUAL TABLE message_index USING fts5(terms, content='', detail=none, tokenize='ascii')",
)


class ConversationStoreError(Exception):
    """The store cannot be used; str() names the file and says why."""


class WrongKeyError(ConversationStoreError):
    """The store was created with another key."""


class CorruptStoreError(ConversationStoreError):
    """The file is not a readable conversation store, or a record fails authentication."""


# -- tokenization ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _word_re() -> re.Pattern[str]:
    # \w leaves out combining marks (Devanagari vowel signs, viramas...), which would cut words apart:
    # add every Unicode mark, collected once (about 0.1 s).
    ranges: list[tuple[int, int]] = []
    for cp in range(sys.maxunicode + 1):
        if unicodedata.category(chr(cp))[0] == "M":
            if ranges and ranges[-1][1] == cp - 1:
                ranges[-1] = (ranges[-1][0], cp)
            else:
                ranges.append((cp, cp))
    marks = "".join(rf"\U{a:08x}" if a == b else rf"\U{a:08x}-\U{b:08x}" for a, b in ranges)
    return re.compile(rf"[{_CJK}]|(?:(?![{_CJK}])[^\W_]|[{marks}])+")


def _normalize(word: str) -> str:
    if word.isascii():
        return word.lower()
    # NFKC_Casefold: compatibility forms (ligatures, full-width letters) and case fold to one spelling.
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", word).casefold())


def tokenize(text: str) -> Iterator[tuple[str, int, int]]:
    """Yield (token, start, end) with start/end the span of the word in `text` the token comes from."""
    word = _word_re()
    for m in word.finditer(text):
        norm = _normalize(m.group())
        if norm == m.group():
            yield norm[:MAX_TOKEN_CHARS], m.start(), m.end()
            continue
        # Normalization can split a word (a ligature, a fraction, a run of half-width kana): re-cut it.
        for part in word.findall(norm):
            yield part[:MAX_TOKEN_CHARS], m.start(), m.end()


def terms(text: str) -> list[str]:
    """The distinct tokens of `text`, in order of first appearance."""
    return list(dict.fromkeys(tok for tok, _, _ in tokenize(text)))


def _snippet(text: str, wanted: set[str]) -> tuple[str, bool]:
    """A window of text around the first query word, and whether every wanted token occurs in text."""
    first: tuple[int, int] | None = None
    found: set[str] = set()
    for tok, start, end in tokenize(text):
        if tok in wanted:
            found.add(tok)
            if first is None:
                first = (start, end)
    if first is None:
        first = (0, 0)
    start = max(0, first[0] - SNIPPET_CHARS // 3)
    end = min(len(text), start + SNIPPET_CHARS)
    start = max(0, min(start, end - SNIPPET_CHARS))
    if start > 0:  # do not start in the middle of a word
        space = text.find(" ", start, first[0])
        start = space + 1 if space != -1 else start
    if end < len(text):
        space = text.rfind(" ", first[1], end)
        end = space if space != -1 else end
    body = " ".join(text[start:end].split())
    return ("…" if start > 0 else "") + body + ("…" if end < len(text) else ""), found == wanted


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _check_session_id(session_id: Any) -> str:
    if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
        raise ValueError(
            f"invalid session id {session_id!r}: use 1-64 characters from A-Z, a-z, 0-9, '_' and '-'"
        )
    return session_id


def _check_levels(privacy: str | Iterable[str] | None) -> tuple[str, ...] | None:
    if privacy is None:
        return None
    levels = (privacy,) if isinstance(privacy, str) else tuple(privacy)
    for level in levels:
        _check_privacy(level)
    return levels


def _check_privacy(level: Any) -> str:
    if level not in PRIVACY_LEVELS:
        raise ValueError(f"unknown privacy level {level!r}: use one of {', '.join(PRIVACY_LEVELS)}")
    return level


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, not {value!r}")
    return value


def _sql_database_errors(method):
    """Report SQLite's 'malformed'/'not a database' errors as CorruptStoreError naming the file."""

    @functools.wraps(method)
    def wrapper(self: ConversationStore, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as exc:
            if type(exc) is not sqlite3.DatabaseError:  # locked, I/O, constraint: not damage to the file
                raise
            raise CorruptStoreError(f"{self.path}: the conversation store is damaged ({exc})") from exc

    return wrapper


# -- the store ------------------------------------------------------------------------------------------


class ConversationStore:
    """Thread-safe: one connection, guarded by a lock; crypto and formatting happen outside it."""

    def __init__(self, path: Path, conn: sqlite3.Connection, key: bytes, *, default_privacy: str,
                 retention_days: int) -> None:
        self.path = path
        self.default_privacy = default_privacy
        self.retention_days = retention_days
        self._conn: sqlite3.Connection | None = conn
        self._key = key
        self._lock = threading.RLock()
        self._aead: AESGCM | None = None
        self._index_key = b""

    # -- lifecycle ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, directory: Path, key: bytes, *, default_privacy: str = "private",
             retention_days: int = 90) -> ConversationStore:
        """Open (or create) `<directory>/conversations.db`; raises WrongKeyError or CorruptStoreError."""
        if not isinstance(key, bytes | bytearray) or len(key) != 32:
            raise ValueError("the conversation store key must be 32 bytes")
        _check_privacy(default_privacy)
        _check_count("retention_days", retention_days, 0)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = directory / DB_NAME
        if not path.exists():
            # Create it owner-only; SQLite gives the -wal and -shm files the same permissions.
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        try:
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        except sqlite3.Error as exc:
            raise ConversationStoreError(f"{path}: cannot open the conversation store ({exc})") from exc
        store = cls(path, conn, bytes(key), default_privacy=default_privacy, retention_days=retention_days)
        try:
            store._setup()
            store.purge_expired()
        except sqlite3.OperationalError as exc:  # read-only or full disk, locked by another process
            store.close()
            raise ConversationStoreError(f"{path}: cannot open the conversation store ({exc})") from exc
        except BaseException:
            store.close()
            raise
        return store

    @_sql_database_errors
    def _setup(self) -> None:
        conn = self._require()
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise ConversationStoreError(f"{self.path}: cannot switch to WAL mode (got {mode!r})")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA secure_delete=ON")  # purged rows are zeroed, not left in free pages
        conn.execute("PRAGMA journal_size_limit=8388608")
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")}
        if "meta" not in tables:
            if tables:
                raise CorruptStoreError(
                    f"{self.path} is an SQLite database but not a conversation store "
                    f"(tables: {', '.join(sorted(tables))}); move it aside"
                )
            self._create()
            return
        meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
        missing = {"schema", "salt", "key_check", "index_version", "docs", "tokens"} - meta.keys()
        if missing:
            raise CorruptStoreError(f"{self.path}: the meta table lacks {', '.join(sorted(missing))}")
        if int(meta["schema"]) > SCHEMA_VERSION:
            raise ConversationStoreError(
                f"{self.path} has schema {meta['schema']}, newer than this PinkyBrain ({SCHEMA_VERSION}); upgrade"
            )
        self._derive(bytes(meta["salt"]))
        try:
            ok = self._open_blob(bytes(meta["key_check"]), b"key-check") == _KEY_CHECK
        except InvalidTag:
            ok = False
        if not ok:
            raise WrongKeyError(
                f"{self.path}: the key does not open this conversation store; it was created with another "
                "node identity. Restore that identity, or move the file aside to start a new history."
            )
        if int(meta["index_version"]) != INDEX_VERSION:
            self._rebuild_index()

    def _create(self) -> None:
        salt = secrets.token_bytes(16)
        self._derive(salt)
        with self._write() as conn:
            for statement in _SCHEMA:  # not executescript(): it would commit the open transaction
                conn.execute(statement)
            conn.executemany("INSERT INTO meta(name, value) VALUES (?, ?)", [
                ("schema", SCHEMA_VERSION),
                ("index_version", INDEX_VERSION),
                ("salt", salt),
                ("key_check", self._seal(_KEY_CHECK, b"key-check")),
                ("created_at", time.time()),
                ("docs", 0),  # indexed messages and their token total: BM25's average length
                ("tokens", 0),
            ])

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()  # the last connection checkpoints and removes the WAL
                self._conn = None

    def __enter__(self) -> ConversationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- crypto ------------------------------------------------------------------------------------

    def _derive(self, salt: bytes) -> None:
        def subkey(purpose: bytes) -> bytes:
            return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt,
                        info=b"pinkybrain/conversations/v1/" + purpose).derive(self._key)

        self._aead = AESGCM(subkey(b"seal"))
        self._index_key = subkey(b"blind-index")

    def _seal(self, plaintext: bytes, aad: bytes) -> bytes:
        assert self._aead is not None
        nonce = secrets.token_bytes(_NONCE_BYTES)
        return _ENVELOPE + nonce + self._aead.encrypt(nonce, plaintext, _ENVELOPE + aad)

    def _open_blob(self, blob: bytes, aad: bytes) -> bytes:
        assert self._aead is not None
        if len(blob) < 1 + _NONCE_BYTES + 16 or blob[:1] != _ENVELOPE:
            raise InvalidTag
        nonce, sealed = blob[1 : 1 + _NONCE_BYTES], blob[1 + _NONCE_BYTES :]
        return self._aead.decrypt(nonce, sealed, _ENVELOPE + aad)

    @staticmethod
    def _message_aad(session_id: str, message_id: int, role: str) -> bytes:
        return f"message|{session_id}|{message_id}|{role}".encode()

    @staticmethod
    def _title_aad(session_id: str) -> bytes:
        return f"title|{session_id}".encode()

    def _hash(self, token: str) -> str:
        return hmac.digest(self._index_key, token.encode("utf-8"), "sha256")[:_HASH_BYTES].hex()

    def _index_doc(self, text: str) -> tuple[str, int]:
        # Sorted distinct hashes: the index learns the token set, not order or repetition.
        hashed = sorted({self._hash(t) for t in terms(text)})
        return " ".join(hashed), len(hashed)

    def _decrypt_message(self, session_id: str, message_id: int, role: str, body: bytes) -> dict:
        try:
            plain = self._open_blob(bytes(body), self._message_aad(session_id, message_id, role))
        except InvalidTag:
            raise CorruptStoreError(
                f"{self.path}: message {message_id} of {session_id!r} fails authentication (damaged or tampered)"
            ) from None
        return json.loads(plain)

    def _decrypt_title(self, session_id: str, blob: bytes) -> str | None:
        try:
            return self._open_blob(bytes(blob), self._title_aad(session_id)).decode()
        except InvalidTag:
            log.warning("%s: the title of %r fails authentication", self.path, session_id)
            return None

    # -- plumbing ----------------------------------------------------------------------------------

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ConversationStoreError(f"{self.path}: the conversation store is closed")
        return self._conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction under the lock: all of it is committed, or none of it."""
        with self._lock:
            conn = self._require()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # -- writing -----------------------------------------------------------------------------------

    @_sql_database_errors
    def record(self, session_id: str | None, prompt: str, answer: str, *, mode: str, specialists: list[str],
               model: str | None, node_id: str | None, meta: dict | None = None) -> dict:
        """Store one exchange (the prompt and its answer) in a session, creating the session if needed."""
        sid = secrets.token_urlsafe(16) if session_id is None else _check_session_id(session_id)
        if not isinstance(prompt, str) or not isinstance(answer, str):
            raise ValueError("prompt and answer must be strings")
        if not isinstance(mode, str) or not mode:
            raise ValueError("mode must be a non-empty string")
        if isinstance(specialists, str) or not all(isinstance(s, str) for s in specialists):
            raise ValueError("specialists must be a list of strings")
        for name, value in (("model", model), ("node_id", node_id)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a string or None")
        if meta is not None and not isinstance(meta, dict):
            raise ValueError("meta must be a dict or None")
        specialists = list(specialists)
        try:
            user_plain = json.dumps({"text": prompt, "mode": mode, "specialists": specialists},
                                    ensure_ascii=False).encode()
            answer_plain = json.dumps({"text": answer, "mode": mode, "specialists": specialists, "model": model,
                                       "node_id": node_id, "meta": meta or {}}, ensure_ascii=False).encode()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"meta must be JSON-serialisable: {exc}") from None
        # Tokenizing and hashing outside the lock keeps concurrent writers from queueing behind it.
        parts = [("user", user_plain, *self._index_doc(prompt)), ("assistant", answer_plain, *self._index_doc(answer))]
        title = " ".join(prompt.split())[:TITLE_CHARS]
        with self._write() as conn:
            now = time.time()
            row = conn.execute("SELECT privacy, updated_at FROM sessions WHERE id = ?", (sid,)).fetchone()
            if row is None:
                privacy, updated_at = self.default_privacy, now
                conn.execute(
                    "INSERT INTO sessions(id, created_at, updated_at, privacy, message_count, title) "
                    "VALUES (?, ?, ?, ?, 0, ?)",
                    (sid, now, now, privacy, self._seal(title.encode(), self._title_aad(sid))),
                )
            else:
                privacy, updated_at = row[0], max(now, row[1])  # never back in time if the clock steps back
            ids, total = [], 0
            for role, plain, doc, ntok in parts:
                # The id is part of the associated data, so the row is written first and sealed after.
                cur = conn.execute(
                    "INSERT INTO messages(session_id, role, created_at, ntok, body) VALUES (?, ?, ?, ?, x'')",
                    (sid, role, now, ntok),
                )
                mid = int(cur.lastrowid)
                conn.execute("UPDATE messages SET body = ? WHERE id = ?",
                             (self._seal(plain, self._message_aad(sid, mid, role)), mid))
                conn.execute("INSERT INTO message_index(rowid, terms) VALUES (?, ?)", (mid, doc))
                ids.append(mid)
                total += ntok
            conn.execute("UPDATE sessions SET updated_at = ?, message_count = message_count + 2 WHERE id = ?",
                         (updated_at, sid))
            self._bump_stats(conn, 2, total)
        return {"session_id": sid, "message_ids": ids, "created_at": now, "privacy": privacy,
                "new_session": row is None}

    @staticmethod
    def _bump_stats(conn: sqlite3.Connection, docs: int, tokens: int) -> None:
        conn.execute("UPDATE meta SET value = value + ? WHERE name = 'docs'", (docs,))
        conn.execute("UPDATE meta SET value = value + ? WHERE name = 'tokens'", (tokens,))

    @_sql_database_errors
    def set_privacy(self, session_id: str, level: str) -> dict:
        sid = _check_session_id(session_id)
        _check_privacy(level)
        with self._write() as conn:
            if conn.execute("UPDATE sessions SET privacy = ? WHERE id = ?", (level, sid)).rowcount == 0:
                raise KeyError(f"no conversation {sid!r}")
        return {"session_id": sid, "privacy": level}

    @_sql_database_errors
    def delete_session(self, session_id: str) -> int:
        """Delete a conversation and its index entries; returns the number of messages removed."""
        sid = _check_session_id(session_id)
        with self._write() as conn:
            removed = self._delete(conn, sid)
        if removed is None:
            raise KeyError(f"no conversation {sid!r}")
        self._checkpoint()
        return removed

    def _delete(self, conn: sqlite3.Connection, sid: str) -> int | None:
        if conn.execute("SELECT 1 FROM sessions WHERE id = ?", (sid,)).fetchone() is None:
            return None
        rows = conn.execute("SELECT id, role, ntok, body FROM messages WHERE session_id = ?", (sid,)).fetchall()
        tokens = 0
        for mid, role, ntok, body in rows:
            # A contentless FTS5 table forgets a row only when given the same terms again.
            try:
                doc, _ = self._index_doc(self._decrypt_message(sid, mid, role, body)["text"])
            except CorruptStoreError as exc:
                # Its index entry stays behind; harmless, as ids are never reused and search joins messages.
                log.warning("%s; deleting it without its index entry", exc)
            else:
                conn.execute("INSERT INTO message_index(message_index, rowid, terms) VALUES ('delete', ?, ?)",
                             (mid, doc))
            tokens += ntok
        conn.execute("DELETE FROM sessions WHERE id = ?", (sid,))  # messages follow by ON DELETE CASCADE
        self._bump_stats(conn, -len(rows), -tokens)
        return len(rows)

    @_sql_database_errors
    def purge_expired(self, now: float | None = None) -> int:
        """Delete conversations not updated for retention_days (0 keeps everything); returns how many."""
        if self.retention_days == 0:
            return 0
        cutoff = (time.time() if now is None else now) - self.retention_days * DAY_SECS
        with self._lock:
            expired = [r[0] for r in self._require().execute(
                "SELECT id FROM sessions WHERE updated_at < ? ORDER BY updated_at", (cutoff,))]
        purged = 0
        for sid in expired:  # one transaction each: other callers get the lock in between
            with self._write() as conn:
                still = conn.execute("SELECT updated_at FROM sessions WHERE id = ?", (sid,)).fetchone()
                if still is not None and still[0] < cutoff and self._delete(conn, sid) is not None:
                    purged += 1
        if purged:
            self._checkpoint()
        return purged

    def _checkpoint(self) -> None:
        # Old page images of deleted rows would otherwise linger in the WAL file until the next checkpoint.
        with self._lock:
            self._require().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def _rebuild_index(self) -> None:
        log.info("%s: rebuilding the search index (tokenizer version %d)", self.path, INDEX_VERSION)
        with self._write() as conn:
            conn.execute("INSERT INTO message_index(message_index) VALUES ('delete-all')")
            docs = tokens = 0
            rows = conn.execute("SELECT id, session_id, role, body FROM messages").fetchall()
            for mid, sid, role, body in rows:
                doc, ntok = self._index_doc(self._decrypt_message(sid, mid, role, body)["text"])
                conn.execute("INSERT INTO message_index(rowid, terms) VALUES (?, ?)", (mid, doc))
                conn.execute("UPDATE messages SET ntok = ? WHERE id = ?", (ntok, mid))
                docs, tokens = docs + 1, tokens + ntok
            conn.executemany("UPDATE meta SET value = ? WHERE name = ?",
                             [(docs, "docs"), (tokens, "tokens"), (INDEX_VERSION, "index_version")])

    # -- reading -----------------------------------------------------------------------------------

    @_sql_database_errors
    def list_sessions(self, limit: int = 50, offset: int = 0, *,
                      privacy: str | Iterable[str] | None = None) -> list[dict]:
        """Most recently updated first; `privacy` restricts to one level or a few (an empty list: none)."""
        _check_count("limit", limit, 1)
        _check_count("offset", offset, 0)
        levels = _check_levels(privacy)
        where = "" if levels is None else f"WHERE privacy IN ({','.join('?' * len(levels))})"
        with self._lock:
            rows = self._require().execute(
                "SELECT id, created_at, updated_at, privacy, message_count, title FROM sessions "  # noqa: S608
                f"{where} ORDER BY updated_at DESC, id LIMIT ? OFFSET ?",  # `where` holds placeholders only
                (*(levels or ()), min(limit, MAX_LIMIT), offset),
            ).fetchall()
        return [{"id": sid, "created_at": created, "updated_at": updated, "privacy": level,
                 "message_count": count, "title": self._decrypt_title(sid, title)}
                for sid, created, updated, level, count, title in rows]

    @_sql_database_errors
    def get_session(self, session_id: str) -> dict:
        """A conversation with all its messages, decrypted, oldest first."""
        sid = _check_session_id(session_id)
        with self._lock:
            conn = self._require()
            head = conn.execute(
                "SELECT created_at, updated_at, privacy, message_count, title FROM sessions WHERE id = ?", (sid,)
            ).fetchone()
            rows = conn.execute(
                "SELECT id, role, created_at, body FROM messages WHERE session_id = ? ORDER BY id", (sid,)
            ).fetchall()
        if head is None:
            raise KeyError(f"no conversation {sid!r}")
        messages = []
        for mid, role, created, body in rows:
            payload = self._decrypt_message(sid, mid, role, body)
            messages.append({"id": mid, "role": role, "created_at": created, **payload})
        return {"id": sid, "created_at": head[0], "updated_at": head[1], "privacy": head[2],
                "message_count": head[3], "title": self._decrypt_title(sid, head[4]), "messages": messages}

    @_sql_database_errors
    def recent_turns(self, session_id: str, limit: int = 100) -> list[tuple[str, str]]:
        """The session's last `limit` exchanges as (prompt, answer) pairs, oldest first; [] for a session
        that does not exist (yet). What the model is sent of them is the brain's choice (core/history.py)."""
        sid = _check_session_id(session_id)
        _check_count("limit", limit, 1)
        with self._lock:
            rows = self._require().execute(
                "SELECT id, role, body FROM messages WHERE session_id = ? ORDER BY id DESC LIMIT ?",
                (sid, 2 * limit),
            ).fetchall()
        turns: list[tuple[str, str]] = []
        answer: str | None = None
        for mid, role, body in rows:  # newest first: an answer, then the prompt it answered
            text = str(self._decrypt_message(sid, mid, role, body).get("text") or "")
            if role == "assistant":
                answer = text
            elif answer is not None:
                turns.append((text, answer))
                answer = None
        return turns[::-1]

    @_sql_database_errors
    def search(self, query: str, limit: int = 20, *, privacy: str | Iterable[str] | None = None) -> list[dict]:
        """Messages holding every word of `query` (case-insensitive, literal: no operators), best first."""
        if not isinstance(query, str):
            raise ValueError("the search query must be a string")
        _check_count("limit", limit, 1)
        levels = _check_levels(privacy)
        wanted = terms(query)[:MAX_QUERY_TOKENS]
        if not wanted:
            return []
        # Only quoted hex strings reach FTS5, so no user text can be parsed as query syntax.
        hashed = [self._hash(t) for t in wanted]
        where = "" if levels is None else f"AND s.privacy IN ({','.join('?' * len(levels))})"
        with self._lock:
            conn = self._require()
            # A word no message holds means no hit: find that out with one cheap probe per word before
            # paying for document counts of common words.
            for h in hashed:
                if conn.execute("SELECT 1 FROM message_index WHERE message_index MATCH ? LIMIT 1",
                                (f'"{h}"',)).fetchone() is None:
                    return []
            dfs = [conn.execute("SELECT count(*) FROM message_index WHERE message_index MATCH ?",
                                (f'"{h}"',)).fetchone()[0] for h in hashed]
            docs, tokens = (conn.execute("SELECT value FROM meta WHERE name = ?", (n,)).fetchone()[0]
                            for n in ("docs", "tokens"))
            # CROSS JOIN pins FTS5 as the outer loop: its hits, then primary-key look-ups, never a scan.
            rows = conn.execute(
                "SELECT m.id, m.session_id, m.role, m.created_at, m.ntok, m.body, s.privacy "  # noqa: S608
                "FROM message_index AS f CROSS JOIN messages AS m ON m.id = f.rowid "
                "JOIN sessions AS s ON s.id = m.session_id "
                f"WHERE message_index MATCH ? {where} "  # `where` holds placeholders only
                "ORDER BY m.ntok, m.id DESC LIMIT ?",
                (" ".join(f'"{h}"' for h in hashed), *(levels or ()), min(limit, MAX_LIMIT) + 8),
            ).fetchall()
        # BM25 over token sets (every term frequency is 1), so the IDF sum is common to all hits.
        docs = max(int(docs), 1)
        avgdl = max(int(tokens) / docs, 1.0)
        idf = sum(math.log((docs - df + 0.5) / (df + 0.5) + 1) for df in dfs)
        want = set(wanted)
        hits = []
        for mid, sid, role, created, ntok, body, level in rows:
            try:
                text = self._decrypt_message(sid, mid, role, body)["text"]
            except CorruptStoreError as exc:
                log.warning("%s; left out of search results", exc)
                continue
            snippet, complete = _snippet(text, want)
            if not complete:  # a truncated-hash collision, not a real hit
                continue
            norm = _BM25_K1 * (1 - _BM25_B + _BM25_B * ntok / avgdl)
            hits.append({"session_id": sid, "message_id": mid, "role": role, "snippet": snippet,
                         "created_at": created, "privacy": level,
                         "score": round(idf * (_BM25_K1 + 1) / (1 + norm), 6)})
        return hits[:limit]

    def export(self, session_id: str, fmt: str = "json") -> str:
        if fmt not in EXPORT_FORMATS:
            raise ValueError(f"unknown export format {fmt!r}: use one of {', '.join(EXPORT_FORMATS)}")
        session = self.get_session(session_id)
        if fmt == "json":
            doc = {"format": "pinkybrain-conversation", "version": 1, "exported_at": _iso(time.time()),
                   "session": {k: v for k, v in session.items() if k != "messages"},
                   "messages": session["messages"]}
            return json.dumps(doc, ensure_ascii=False, indent=2)
        return _markdown(session)


def _markdown(session: dict) -> str:
    title = session["title"] or session["id"]
    lines = [
        f"# {title}",
        "",
        f"- Session: `{session['id']}`",
        f"- Privacy: {session['privacy']}",
        f"- Started: {_iso(session['created_at'])}",
        f"- Updated: {_iso(session['updated_at'])}",
        f"- Messages: {session['message_count']}",
    ]
    for msg in session["messages"]:
        if msg["role"] == "user":
            heading = f"## You ({msg.get('mode', 'single')})"
        else:
            details = [f"model {msg['model']}" if msg.get("model") else None,
                       f"specialists {', '.join(msg['specialists'])}" if msg.get("specialists") else None,
                       f"node `{msg['node_id']}`" if msg.get("node_id") else None]
            extra = "; ".join(d for d in details if d)
            heading = "## PinkyBrain" + (f" ({extra})" if extra else "")
        lines += ["", f"{heading} · {_iso(msg['created_at'])}", "", msg["text"].rstrip()]
    return "\n".join(lines) + "\n"
