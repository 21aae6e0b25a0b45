"""The node's key-value memory as one Yjs document (pycrdt), with no I/O.

All entries live in a single root `Map` named "memory". Each value is stored as JSON text, so any JSON
value (not just what Yjs can type natively) round-trips exactly and a peer's value can be checked
without trusting its shape. Every local write returns the incremental Yjs update for exactly that write,
ready to persist and to send to peers; remote updates are validated on a scratch copy before they touch
the real document, so a garbage or hostile update changes nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from pycrdt import Array, Doc, Map, MapEvent, TransactionEvent

from pinkybrain.node.core.memory_values import (
    DEFAULT_MAX_DEPTH,
    MAX_READ_DEPTH,
    MemoryValueError,
    decode_value,
    encode_value,
)

ROOT = "memory"
DEFAULT_MAX_KEY_BYTES = 256
DEFAULT_MAX_VALUE_BYTES = 64 * 1024
_MISSING = object()  # a Yjs map can hold a JSON null, so "absent" needs its own marker


class MemoryDocError(Exception):
    """Base class for memory document errors."""


class MemoryLimitError(MemoryDocError, ValueError):
    """A key or value is over its size limit; str() names the limit and the actual size."""


class MemoryUpdateError(MemoryDocError, ValueError):
    """A remote update was refused (undecodable, or it would store invalid data); nothing was applied."""


class MemoryDoc:
    """A CRDT key-value map. Not thread-safe on its own: callers serialise access (MemoryStore does)."""

    def __init__(
        self,
        max_key_bytes: int = DEFAULT_MAX_KEY_BYTES,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        *,
        client_id: int | None = None,
        max_depth: int = DEFAULT_MAX_DEPTH,
    ):
        if max_key_bytes < 1 or max_value_bytes < 1 or max_depth < 1:
            raise ValueError("max_key_bytes, max_value_bytes and max_depth must be positive")
        self.max_key_bytes = max_key_bytes
        self.max_value_bytes = max_value_bytes
        self.max_depth = max_depth
        self._doc: Doc = Doc(client_id=client_id)
        self._map: Map = self._doc.get(ROOT, type=Map)
        self._last_update: bytes | None = None
        # The transaction observer hands over the exact update of each commit; local writes read it back.
        self._doc.observe(self._on_commit)

    def _on_commit(self, event: TransactionEvent) -> None:
        self._last_update = event.update

    @classmethod
    def from_updates(
        cls,
        updates: Iterable[bytes],
        max_key_bytes: int = DEFAULT_MAX_KEY_BYTES,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        max_depth: int = DEFAULT_MAX_DEPTH,
    ) -> MemoryDoc:
        """Rebuild a document from trusted, previously accepted updates (a store's snapshot and log).

        Raises MemoryUpdateError if one fails to decode or the result holds entries that are not text.
        Values are checked when read (MemoryValueError), not here: a bad value that an older version let
        in must not make the whole store unopenable. Sizes are not re-checked: they were enforced when
        each write was accepted, and lowering a limit in the configuration must not make existing data
        unreadable (reads allow the deepest nesting any configuration allows, for the same reason).
        """
        doc = cls(max_key_bytes, max_value_bytes, max_depth=max_depth)
        for index, update in enumerate(updates):
            try:
                doc._doc.apply_update(bytes(update))
            except Exception as exc:  # pycrdt raises ValueError; anything else is just as fatal here
                raise MemoryUpdateError(f"update at position {index} cannot be decoded: {exc}") from exc
        _check_roots(doc._doc)
        for key in doc._map.keys():
            if not isinstance(doc._map.get(key, ""), str):
                raise MemoryUpdateError(f"stored entry {key!r} is not JSON text")
        return doc

    # -- validation ---------------------------------------------------------------------------------
    def check_key(self, key: str) -> None:
        """Raise unless `key` may be written: a non-empty str of at most max_key_bytes UTF-8 bytes."""
        _check_type(key)
        if not key:
            raise ValueError("memory key must not be empty")
        try:
            size = len(key.encode("utf-8"))
        except UnicodeEncodeError:
            raise ValueError("memory key is not valid Unicode text (lone surrogate)") from None
        if size > self.max_key_bytes:
            raise MemoryLimitError(
                f"memory key is {size} bytes (UTF-8); the limit is {self.max_key_bytes} bytes"
            )

    def _encode_checked(self, key: str, value: Any) -> str:
        text = encode_value(value, self.max_depth)  # the same check a peer's update passes
        size = len(text.encode("utf-8"))
        if size > self.max_value_bytes:
            raise MemoryLimitError(
                f"value for memory key {key!r} is {size} bytes as JSON; the limit is {self.max_value_bytes} bytes"
            )
        return text

    # -- local reads and writes ---------------------------------------------------------------------
    def set(self, key: str, value: Any) -> bytes:
        """Store `value` under `key`; returns the Yjs update of exactly this write."""
        self.check_key(key)
        text = self._encode_checked(key, value)
        return self._commit(lambda: self._map.__setitem__(key, text))

    def delete(self, key: str) -> bytes:
        """Remove `key` (KeyError if absent); returns the Yjs update of exactly this delete."""
        _check_type(key)
        if key not in self._map:
            raise KeyError(key)
        return self._commit(lambda: self._map.pop(key))

    def _commit(self, write) -> bytes:
        self._last_update = None
        with self._doc.transaction():
            write()
        update = self._last_update
        if update is None:  # every set/delete creates or removes an item, so a commit always has one
            raise RuntimeError("pycrdt did not report the update of a local write")
        return update

    def get(self, key: str) -> Any:
        """The value under `key`; KeyError if absent."""
        _check_type(key)
        text = self._map.get(key, _MISSING)
        if text is _MISSING:
            raise KeyError(key)
        return decode_value(text, MAX_READ_DEPTH)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._map

    def __len__(self) -> int:
        return len(self._map)

    def list(self, prefix: str = "") -> list[str]:
        """Keys starting with `prefix`, sorted."""
        return sorted(k for k in self._map.keys() if k.startswith(prefix))

    def items(self, prefix: str = "") -> list[tuple[str, Any]]:
        """(key, value) pairs for keys starting with `prefix`, sorted by key."""
        return [(k, decode_value(self._map[k], MAX_READ_DEPTH)) for k in self.list(prefix)]

    # -- sync ---------------------------------------------------------------------------------------
    def state_vector(self) -> bytes:
        """This document's Yjs state vector (sync step 1: send it so a peer can answer with a diff)."""
        return self._doc.get_state()

    def diff(self, remote_state_vector: bytes) -> bytes:
        """The update holding everything a peer with `remote_state_vector` lacks (sync step 2)."""
        try:
            return self._doc.get_update(bytes(remote_state_vector))
        except Exception as exc:  # a peer's malformed state vector is its error, not ours
            raise MemoryUpdateError(f"cannot decode remote state vector: {exc}") from exc

    def full_update(self) -> bytes:
        """The whole document as one update (a snapshot)."""
        return self._doc.get_update()

    # -- divergence (equivocation) ------------------------------------------------------------------
    def fingerprint(self) -> dict[str, str]:
        """What two copies compare to tell "in sync" from "split by equivocation".

        `state` covers the Yjs ids each copy holds (state vector) and what it deleted (delete set); `view`
        covers what a reader sees. Two copies with the same `state` hold the same items, so by Yjs's own
        rules they show the same `view`, unless a peer gave both an item id with different content (the
        same client id and clock, different values): then `view` differs and no sync can repair it.
        """
        state = sorted(_read_state_vector(self._doc.get_state()))
        deleted = _read_delete_set(self._doc.get_update(self._doc.get_state()))
        view = hashlib.sha256()
        for key in sorted(self._map.keys()):
            view.update(_entry_digest(key, self._map[key]))
        return {
            "state": hashlib.sha256(json.dumps([state, deleted]).encode()).hexdigest(),
            "view": view.hexdigest(),
        }

    def entry_digests(self) -> dict[str, str]:
        """A short digest of each entry (key and stored text), to find which entries two copies disagree on."""
        return {key: _entry_digest(key, self._map[key]).hex()[:32] for key in self._map.keys()}

    def apply_remote(self, update: bytes) -> bool:
        """Validate a peer's update and apply it; returns whether it changed anything."""
        return self.integrate_remote(update) is not None

    def integrate_remote(self, update: bytes) -> bytes | None:
        """Validate a peer's update and apply it; returns the update actually applied, None if no change.

        The update is first applied to a scratch document rebuilt from the full state, and every entry
        it touches is checked (string key within the key limit, JSON text within the value limit, no other
        root types). Only then is it applied to the real document, so a refused update (MemoryUpdateError)
        leaves it exactly as it was. Content that cannot join yet (it overwrites an entry this document has
        not seen) is left out of what is applied and returned: a later sync brings it with what it needs.
        """
        if not isinstance(update, (bytes, bytearray, memoryview)):
            raise TypeError(f"update must be bytes, not {type(update).__name__}")
        update = bytes(update)
        base = self._doc.get_update()
        scratch = Doc()
        scratch_map = scratch.get(ROOT, type=Map)
        scratch.apply_update(base)
        touched: set[str] = set()

        def on_change(event: MapEvent) -> None:
            touched.update(event.keys)

        scratch_map.observe(on_change)
        try:
            scratch.apply_update(update)
        except Exception as exc:  # pycrdt raises ValueError; anything else is just as much a refusal
            raise MemoryUpdateError(f"remote update cannot be decoded: {exc}") from exc
        _check_roots(scratch)
        # Only this document writes under its own client id: content under it that we lack was made by
        # someone reusing our id, and would later clash with our own writes at the same clocks.
        own = self._doc.client_id
        if dict(_read_state_vector(scratch.get_state())).get(own, 0) > dict(
            _read_state_vector(self._doc.get_state())
        ).get(own, 0):
            raise MemoryUpdateError("update carries content under this node's own Yjs client id")
        # A peer treating "memory" as a Text/Array adds sequence content the Map view never shows; it
        # would sit in every copy of the document, so it is refused like any other invalid data.
        if len(scratch.get(ROOT, type=Array)):
            raise MemoryUpdateError(f"update adds list or text content to the {ROOT!r} root, which is a map")
        for key in touched:
            _check_entry(key, scratch_map.get(key, _MISSING), self.max_key_bytes, self.max_value_bytes,
                         self.max_depth)
        # Yrs encodes equal states to equal bytes, so this spots a duplicate (already known) update.
        if scratch.get_update() == base:
            return None
        # Only what joined the scratch copy, never the raw update: Yrs would keep content whose
        # dependencies are missing inside the real document, unchecked, and merge it in when they arrive,
        # so a hostile peer could smuggle in an invalid entry in two steps.
        applied = scratch.get_update(self._doc.get_state())
        self._doc.apply_update(applied)
        return applied


def _check_type(key: object) -> None:
    if not isinstance(key, str):
        raise TypeError(f"memory key must be a str, not {type(key).__name__}")


def _check_roots(doc: Doc) -> None:
    extra = sorted(set(doc.keys()) - {ROOT})
    if extra:
        raise MemoryUpdateError(f"update adds root types other than {ROOT!r}: {extra}")


def _check_entry(key: str, value: Any, max_key_bytes: int, max_value_bytes: int, max_depth: int) -> None:
    """Raise MemoryUpdateError unless `value` (_MISSING: deleted) is valid JSON text under a valid key."""
    if value is _MISSING:
        return
    if not key:
        raise MemoryUpdateError("update writes an empty memory key")
    try:
        key_size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise MemoryUpdateError("update writes a memory key that is not valid Unicode") from None
    if key_size > max_key_bytes:
        raise MemoryUpdateError(
            f"update writes a memory key of {key_size} bytes; the limit is {max_key_bytes} bytes"
        )
    if not isinstance(value, str):
        raise MemoryUpdateError(
            f"update writes a {type(value).__name__} under memory key {key!r}; values must be JSON text"
        )
    size = len(value.encode("utf-8"))
    if size > max_value_bytes:
        raise MemoryUpdateError(
            f"update writes {size} bytes under memory key {key!r}; the limit is {max_value_bytes} bytes"
        )
    try:
        decode_value(value, max_depth)
    except MemoryValueError as exc:
        raise MemoryUpdateError(f"update writes an invalid value under memory key {key!r}: {exc}") from None


# -- Yjs v1 encodings (lib0 varuints) read for fingerprints -------------------------------------------------
def _entry_digest(key: str, text: object) -> bytes:
    return hashlib.sha256(json.dumps([key, text], ensure_ascii=True).encode()).digest()


def _varuints(data: bytes):
    pos = 0

    def read() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    return read


def _read_state_vector(data: bytes) -> list[tuple[int, int]]:
    read = _varuints(data)
    return [(read(), read()) for _ in range(read())]


def _read_delete_set(update: bytes) -> list[tuple[int, list[tuple[int, int]]]]:
    """The delete set of an update that carries no structs (get_update(own state vector)), normalised:
    clients sorted, each client's ranges sorted and merged, so equal sets compare equal."""
    read = _varuints(update)
    if read() != 0:
        raise ValueError("expected an update without structs")
    result = []
    for _ in range(read()):
        client = read()
        ranges = sorted((read(), read()) for _ in range(read()))
        merged: list[list[int]] = []
        for clock, length in ranges:
            if merged and clock <= merged[-1][0] + merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], clock + length - merged[-1][0])
            else:
                merged.append([clock, length])
        if merged:
            result.append((client, [(c, n) for c, n in merged]))
    return sorted(result)
