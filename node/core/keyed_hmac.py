"""HMAC-SHA256 under a key that signs many short messages: every signed request is checked with one and
every answer's proof made with two or three.

RFC 2104, as the standard library's `hmac` builds it: the key padded to the block size and XORed with
0x36 (inner) and 0x5c (outer), each absorbed into a SHA-256 state once; a message then costs a copy of
each state, the inner hash of the message and the outer hash of that. `hmac.HMAC.copy()`, `update()`
and `hexdigest()` do the same through four Python-level calls each time, and `hmac.digest()` pads and
absorbs the key again on every call; on the signed ping path (three MACs per request) this form costs
about a third of either (bench/README.md, what the profiles showed). tests/test_keyed_hmac.py checks it
against `hmac` for keys shorter than, equal to and longer than the block.
"""

from __future__ import annotations

import hashlib

_BLOCK = 64  # SHA-256's block size in bytes
_INNER = bytes(x ^ 0x36 for x in range(256))
_OUTER = bytes(x ^ 0x5C for x in range(256))


class KeyedHmac:
    """HMAC-SHA256 with the key absorbed once."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes):
        if len(key) > _BLOCK:
            key = hashlib.sha256(key).digest()  # RFC 2104: a key longer than the block is hashed first
        key = key.ljust(_BLOCK, b"\0")
        self._inner = hashlib.sha256(key.translate(_INNER))
        self._outer = hashlib.sha256(key.translate(_OUTER))

    def _outer_of(self, message: bytes):
        """The outer hash of `message`, ready to be read."""
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer

    def digest(self, message: bytes) -> bytes:
        return self._outer_of(message).digest()

    def hexdigest(self, message: bytes) -> str:
        return self._outer_of(message).hexdigest()
