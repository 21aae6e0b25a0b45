"""End-to-end sealed envelopes for remote inference: what a query and its answer look like on the wire.

A peer link is already encrypted hop by hop; an envelope is encrypted end to end, so a query relayed
through other nodes is readable only by the node that serves it, and the answer only by the node that
asked. No I/O here.

    envelope = version (1) | kind (1) | sender Ed25519 key (32) | recipient Ed25519 key (32)
               | signature (64) | box

`box` is a NaCl `Box` (X25519 + XSalsa20-Poly1305, random 24-byte nonce in front) between the X25519
forms of the two Ed25519 identities, over a JSON body. The signature is the sender's Ed25519 signature
over DOMAIN | kind | sender key | recipient key | box, so anyone on the path can tell who sent it and to
whom without reading it, and a box cannot be re-addressed, re-labelled (a reply passed off as a request)
or altered without the sender's key. Bodies carry a query id and a timestamp: `ReplayGuard` refuses a
request seen before or outside the time window; replies and stream chunks name the query id they
answer (and chunks their sequence number), which the caller checks.
"""

from __future__ import annotations

import json
import math
import secrets
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass

from nacl.exceptions import BadSignatureError, CryptoError
from nacl.public import Box
from nacl.signing import VerifyKey

from pinkybrain.node.core.identity import (
    Identity,
    IdentityError,
    node_id_from_public_key,
    public_key_from_node_id,
)

__all__ = [
    "CHUNK",
    "KINDS",
    "REPLY",
    "REQUEST",
    "Opened",
    "ReplayGuard",
    "SealError",
    "Sealer",
    "new_query_id",
    "open_sealed",
    "seal",
]

VERSION = 1
REQUEST, REPLY, CHUNK = "request", "reply", "chunk"
KINDS = {REQUEST: 1, REPLY: 2, CHUNK: 3}
_KIND_NAMES = {v: k for k, v in KINDS.items()}
DOMAIN = b"pinkybrain/sealed-inference/v1\x00"
_HEAD = struct.Struct(">BB32s32s64s")
MIN_BOX = Box.NONCE_SIZE + 16  # nonce + Poly1305 tag
MAX_ENVELOPE = 4 * 1024 * 1024
DEFAULT_WINDOW_SECS = 120.0


class SealError(ValueError):
    """An envelope that cannot be accepted. `code`: malformed, wrong_recipient, bad_signature,
    unexpected_sender, tampered, stale, replay or busy (the replay memory is full)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Opened:
    sender: str  # the node id whose key signed the envelope
    kind: str
    body: dict


def new_query_id() -> str:
    return secrets.token_hex(16)


def _signed_part(kind_byte: int, sender_pk: bytes, recipient_pk: bytes, box: bytes) -> bytes:
    return DOMAIN + bytes([VERSION, kind_byte]) + sender_pk + recipient_pk + box


class Sealer:
    """Seals to and opens from peers for one identity; the X25519 boxes per peer are cached because
    deriving one costs a scalar multiplication."""

    def __init__(self, identity: Identity, *, max_peers: int = 256):
        self.identity = identity
        self.public_key = identity.public_key
        self._private = identity.signing_key.to_curve25519_private_key()
        self._boxes: OrderedDict[bytes, Box] = OrderedDict()
        self._max_peers = max_peers

    def _box(self, peer_pk: bytes) -> Box:
        box = self._boxes.get(peer_pk)
        if box is None:
            try:
                curve = VerifyKey(peer_pk).to_curve25519_public_key()
            except (CryptoError, ValueError, TypeError) as exc:  # not a point on the curve
                raise SealError("malformed", f"not a usable public key: {exc}") from None
            box = Box(self._private, curve)
            self._boxes[peer_pk] = box
            while len(self._boxes) > self._max_peers:
                self._boxes.popitem(last=False)
        else:
            self._boxes.move_to_end(peer_pk)
        return box

    def seal(self, recipient_id: str, kind: str, body: dict) -> bytes:
        if kind not in KINDS:
            raise ValueError(f"unknown envelope kind {kind!r}")
        try:
            recipient_pk = public_key_from_node_id(recipient_id)
        except IdentityError as exc:
            raise SealError("malformed", str(exc)) from None
        plaintext = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
        box = bytes(self._box(recipient_pk).encrypt(plaintext))
        kind_byte = KINDS[kind]
        signature = self.identity.sign(_signed_part(kind_byte, self.public_key, recipient_pk, box))
        return _HEAD.pack(VERSION, kind_byte, self.public_key, recipient_pk, signature) + box

    def open(self, data: bytes, kind: str, *, sender: str | None = None) -> Opened:
        """Check and decrypt an envelope addressed to this identity; `sender`, when given, must have signed it."""
        if not isinstance(data, (bytes, bytearray)) or len(data) < _HEAD.size + MIN_BOX:
            raise SealError("malformed", "not a sealed envelope (too short)")
        if len(data) > MAX_ENVELOPE:
            raise SealError("malformed", f"envelope over {MAX_ENVELOPE} bytes")
        data = bytes(data)
        version, kind_byte, sender_pk, recipient_pk, signature = _HEAD.unpack_from(data)
        box = data[_HEAD.size :]
        if version != VERSION:
            raise SealError("malformed", f"envelope version {version} is not supported (expected {VERSION})")
        if _KIND_NAMES.get(kind_byte) != kind:
            raise SealError("malformed", f"expected a {kind} envelope, got kind {kind_byte}")
        if recipient_pk != self.public_key:
            raise SealError("wrong_recipient", "the envelope is addressed to another node")
        try:
            VerifyKey(sender_pk).verify(_signed_part(kind_byte, sender_pk, recipient_pk, box), signature)
        except (BadSignatureError, CryptoError, ValueError):
            raise SealError("bad_signature", "the envelope's signature does not verify") from None
        sender_id = node_id_from_public_key(sender_pk)
        if sender is not None and sender_id != sender:
            raise SealError("unexpected_sender", f"signed by {sender_id[:7]}, expected {sender[:7]}")
        try:
            plaintext = self._box(sender_pk).decrypt(box)
        except CryptoError:
            raise SealError("tampered", "the envelope does not decrypt (altered or not meant for this key)") from None
        try:
            body = json.loads(plaintext)
        except ValueError:
            raise SealError("malformed", "the envelope's body is not JSON") from None
        if not isinstance(body, dict):
            raise SealError("malformed", "the envelope's body is not an object")
        return Opened(sender_id, kind, body)


def seal(identity: Identity, recipient_id: str, kind: str, body: dict) -> bytes:
    return Sealer(identity).seal(recipient_id, kind, body)


def open_sealed(identity: Identity, data: bytes, kind: str, *, sender: str | None = None) -> Opened:
    return Sealer(identity).open(data, kind, sender=sender)


class ReplayGuard:
    """Remembers (sender, query id) for the time window; refuses repeats and timestamps outside it.

    An id is forgotten only once its timestamp has left the window, after which that request would be
    refused as stale anyway, so nothing can be replayed. Memory is bounded: when `max_entries` ids are
    live, new requests are refused (code busy) rather than forgetting ids that are still replayable.
    """

    def __init__(self, window_secs: float = DEFAULT_WINDOW_SECS, max_entries: int = 100_000):
        self.window = window_secs
        self.max_entries = max_entries
        self._seen: dict[tuple[str, str], float] = {}
        self._order: OrderedDict[tuple[str, str], float] = OrderedDict()  # by arrival; expiry pruning

    def check(self, sender: str, query_id, timestamp, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if not isinstance(query_id, str) or not 16 <= len(query_id) <= 64:
            raise SealError("malformed", "the request has no valid query id")
        if isinstance(timestamp, bool) or not isinstance(timestamp, (int, float)):
            raise SealError("malformed", "the request has no timestamp")
        try:
            finite = math.isfinite(timestamp)
        except OverflowError:  # an int past float range
            finite = False
        if not finite:  # nan passes every window comparison; inf never expires
            raise SealError("malformed", "the request's timestamp is not a finite number")
        if abs(now - timestamp) > self.window:
            raise SealError("stale", f"the request is {now - timestamp:+.0f}s off this node's clock "
                                     f"(window ±{self.window:g}s)")
        self._prune(now)
        key = (sender, query_id)
        if key in self._seen:
            raise SealError("replay", "this query id was already used")
        if len(self._seen) >= self.max_entries:
            raise SealError("busy", "too many recent requests to remember; try again shortly")
        expires = timestamp + self.window
        self._seen[key] = expires
        self._order[key] = expires

    def _prune(self, now: float) -> None:
        # Arrival order is close to expiry order (timestamps are within the window); stop at the first
        # live one and let stragglers go on a later call.
        while self._order:
            key, expires = next(iter(self._order.items()))
            if expires >= now:
                break
            self._order.popitem(last=False)
            self._seen.pop(key, None)

    def __len__(self) -> int:
        return len(self._seen)
