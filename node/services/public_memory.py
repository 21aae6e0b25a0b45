"""The public mesh's memory as this node's user sees it: the public MemoryStore, with every value written
through here signed by this node (core/signed_memory.py), and every value read back shown only if its
signature verifies and its writer is valid in this node's Web of Trust.

Peers' updates reach the store only over links from valid peers (services/public_gate.py), but a valid
peer may pass on an entry whose writer this node does not find valid, or one with no signature at all:
such entries are dropped from every read (get answers "no memory key", list leaves them out). They are
not deleted from the shared document, because a delete would travel to peers that do find the writer
valid. The store API is kept (get, list, items, set, delete), so the HTTP layer needs no change.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pinkybrain.node.core.identity import Identity
from pinkybrain.node.core.signed_memory import UnsignedEntry, open_entry, sign_entry

if TYPE_CHECKING:
    from pinkybrain.node.services.memory_store import MemoryStore


class SignedPublicMemory:
    def __init__(self, store: MemoryStore, identity: Identity, is_valid: Callable[[str], bool], *,
                 clock: Callable[[], float] = time.time):
        self.store, self.identity, self.is_valid, self.clock = store, identity, is_valid, clock

    @property
    def namespace(self) -> str:
        return self.store.namespace

    def set(self, key: str, value: Any) -> bytes:
        return self.store.set(key, sign_entry(self.identity, key, value, now=self.clock()))

    def delete(self, key: str) -> bytes:
        return self.store.delete(key)

    def write_batch(self, ops: list[tuple[str, str, Any]]) -> list:
        """Group-committed writes (services.memory_writes), each set signed like set()'s."""
        now = self.clock()
        return self.store.write_batch([(kind, key, sign_entry(self.identity, key, value, now=now) if kind == "set"
                                        else value) for kind, key, value in ops])

    def get(self, key: str) -> Any:
        value = self._readable(key, self.store.get(key))  # KeyError when absent
        if value is _DROPPED:
            raise KeyError(key)
        return value

    def items(self, prefix: str = "") -> list[tuple[str, Any]]:
        out = []
        for key, stored in self.store.items(prefix):
            value = self._readable(key, stored)
            if value is not _DROPPED:
                out.append((key, value))
        return out

    def list(self, prefix: str = "") -> list[str]:
        return [key for key, _ in self.items(prefix)]

    def writer(self, key: str) -> str | None:
        """Who signed the entry under `key` (None when it is not a signed entry)."""
        try:
            return open_entry(key, self.store.get(key))[0]
        except UnsignedEntry:
            return None

    def close(self) -> None:
        self.store.close()

    def __getattr__(self, name: str) -> Any:  # state_vector, diff, full_update...: the store's own
        return getattr(self.store, name)

    def _readable(self, key: str, stored: Any) -> Any:
        try:
            writer, value = open_entry(key, stored)
        except UnsignedEntry:
            return _DROPPED
        return value if writer == self.identity.node_id or self.is_valid(writer) else _DROPPED


_DROPPED = object()
