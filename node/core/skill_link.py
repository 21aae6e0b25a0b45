"""What the node proves to the skill on every answer, and how a request and its answer are sealed
between them. Pure logic, no I/O; the ASGI side is node/api/sealing.py, the skill's own implementation
is skill/signing.py (it never imports node code), and tests/test_signing_compat.py keeps both in step.

Proof, on every answer to a signed request:

    x-pinkybrain-node       the node id
    x-pinkybrain-proof      hex HMAC-SHA256(credential, message)
    x-pinkybrain-node-sig   base64 Ed25519 signature of the node identity over message
      or, when the request names its caller's X25519 key in x-pinkybrain-client-key (base64):
    x-pinkybrain-node-mac   hex HMAC-SHA256(K, message), K = NaCl Box(node's X25519 key, the caller's key)
                            .shared_key(): X25519 then HSalsa20, the key NaCl's Box itself uses
    message = PROOF_DOMAIN | request nonce | "\\n" | node id

The HMAC shows the responder holds the credential that verified the request (a stranger answering ping
cannot make it); the signature, or the MAC under K, shows it holds the key of the node id it names (a
mesh member cannot pass for a pinned node: K needs the node's private key or the caller's). All are bound
to the request's single-use nonce, so no old answer's proof fits. The MAC is the cheap form: a caller
keeps one key pair for its client, the node works K out once per caller key (a bounded cache) and then
proves each answer with an HMAC instead of an Ed25519 signature (a third of a signed ping's server CPU).

Sealing, when the request carries `x-pinkybrain-seal: base64(X25519 public key)`, a key pair the skill
makes for that one request:

    keys     NaCl Box(node's X25519 key, derived from its Ed25519 identity; the request's key)
    request  body on the wire = Box(nonce 0x00 * 24) of u32 query length | raw query | body
             (the wire request has no query string: a search text travels sealed too)
    answer   body on the wire = frames, one per ASGI body message (each SSE event its own frame):
             u32 length | Box(nonce 0x01 | 23-byte counter) of flag | data, flag 1 on the last frame

The request's HMAC signature covers the sealed bytes (encrypt-then-MAC, checked before anything is
opened). Counter nonces, unique because the key pair is fresh per request, make a dropped, replayed or
reordered frame fail to open; the last-frame flag makes a cut-short answer visible.
"""

from __future__ import annotations

import base64
import struct
from collections import OrderedDict

from nacl.exceptions import CryptoError
from nacl.public import Box, PublicKey

from pinkybrain.node.core.identity import Identity
from pinkybrain.node.core.keyed_hmac import KeyedHmac

NODE_HEADER = "x-pinkybrain-node"
PROOF_HEADER = "x-pinkybrain-proof"
NODE_SIG_HEADER = "x-pinkybrain-node-sig"
NODE_MAC_HEADER = "x-pinkybrain-node-mac"
CLIENT_KEY_HEADER = "x-pinkybrain-client-key"
CLIENT_KEYS_KEPT = 1024  # shared keys cached; a caller sending a new key each time costs one X25519 each
SEAL_HEADER = "x-pinkybrain-seal"
SEALED_HEADER = "x-pinkybrain-sealed"  # on an answer whose body is sealed frames
PROOF_DOMAIN = b"pinkybrain/response-proof/v1\x00"
REQUEST_NONCE = bytes(Box.NONCE_SIZE)
_LEN = struct.Struct(">I")
MAX_FRAME = 16 * 1024 * 1024
_NODE, _PROOF, _NODE_SIG, _NODE_MAC = (h.encode() for h in (NODE_HEADER, PROOF_HEADER, NODE_SIG_HEADER, NODE_MAC_HEADER))


class SealFault(ValueError):
    """A sealed request that cannot be opened; the message says why."""


def proof_message(nonce: str, node_id: str) -> bytes:
    return PROOF_DOMAIN + nonce.encode() + b"\n" + node_id.encode()


def frame_nonce(counter: int) -> bytes:
    return b"\x01" + counter.to_bytes(Box.NONCE_SIZE - 1, "big")


class SkillLink:
    """The node's side for one identity: proof headers for an answer, and the Box for a sealed request."""

    def __init__(self, identity: Identity):
        self.identity = identity
        self.node_id = identity.node_id
        self._node_id_bytes = self.node_id.encode()
        self._private = identity.signing_key.to_curve25519_private_key()
        # HMACs keyed once (core/keyed_hmac.py). Caller key -> MAC under K, least recently used first;
        # credential (the secret or the owner key) -> MAC under it.
        self._shared: OrderedDict[bytes, KeyedHmac] = OrderedDict()
        self._credential_macs: dict[bytes, KeyedHmac] = {}

    def proof_headers(self, credential: bytes, nonce: str, client_key: bytes | None = None
                      ) -> list[tuple[bytes, bytes]]:
        """The proof for an answer to the request `nonce`; `client_key` is the raw value of the request's
        x-pinkybrain-client-key header, if it had one (a malformed one gets the signature instead)."""
        message = proof_message(nonce, self.node_id)
        shared = self._shared_mac(client_key) if client_key else None
        identity = ((_NODE_MAC, shared.hexdigest(message).encode()) if shared is not None
                    else (_NODE_SIG, base64.b64encode(self.identity.sign(message))))
        return [(_NODE, self._node_id_bytes), (_PROOF, self._credential_mac(credential).hexdigest(message).encode()),
                identity]

    def _credential_mac(self, credential: bytes) -> KeyedHmac:
        mac = self._credential_macs.get(credential)
        if mac is None:
            if len(self._credential_macs) >= 8:  # the secret and the owner key; a reload changes them
                self._credential_macs.clear()
            mac = self._credential_macs[credential] = KeyedHmac(credential)
        return mac

    def _shared_mac(self, client_key: bytes) -> KeyedHmac | None:
        mac = self._shared.get(client_key)
        if mac is not None:
            self._shared.move_to_end(client_key)
            return mac
        try:
            shared = Box(self._private, PublicKey(base64.b64decode(client_key, validate=True))).shared_key()
        except (ValueError, TypeError, CryptoError):
            return None
        mac = self._shared[client_key] = KeyedHmac(shared)
        if len(self._shared) > CLIENT_KEYS_KEPT:
            self._shared.popitem(last=False)
        return mac

    def open_request(self, seal_header: str, sealed: bytes) -> tuple[AnswerSealer, bytes, bytes]:
        """(the sealer for the answer, the raw query string, the body) of a sealed request."""
        try:
            client_key = PublicKey(base64.b64decode(seal_header, validate=True))
        except (ValueError, TypeError, CryptoError):
            raise SealFault(f"{SEAL_HEADER} is not a base64 X25519 public key") from None
        box = Box(self._private, client_key)
        try:
            plain = box.decrypt(sealed, REQUEST_NONCE)
        except (CryptoError, ValueError):
            raise SealFault("the sealed request does not open (altered, or sealed to another node)") from None
        if len(plain) < _LEN.size or _LEN.unpack_from(plain)[0] > len(plain) - _LEN.size:
            raise SealFault("the sealed request is malformed")
        query_len = _LEN.unpack_from(plain)[0]
        query = plain[_LEN.size : _LEN.size + query_len]
        return AnswerSealer(box), query, plain[_LEN.size + query_len :]


class AnswerSealer:
    """Seals one answer's body messages as numbered frames."""

    def __init__(self, box: Box):
        self._box = box
        self._counter = 0

    def frame(self, data: bytes, last: bool) -> bytes:
        sealed = self._box.encrypt((b"\x01" if last else b"\x00") + data, frame_nonce(self._counter)).ciphertext
        self._counter += 1
        return _LEN.pack(len(sealed)) + sealed
