"""Sign requests to a node (PB1 scheme). The key says who is asking:
  HmacAuth(secret)                        a mesh member: HMAC-SHA256 with the network secret
  HmacAuth(owner_key, credential="owner") the node's owner: HMAC-SHA256 with its owner key, named in
                                          X-PinkyBrain-Credential (the key itself never leaves this machine)
  PeerAuth(seed)                          a public peer: Ed25519 by its identity (PB1-ED25519)
Also: check the node's proof on its answer, and seal a request and open its answer (the construction
is described in the node's node/core/skill_link.py).

The canonical string is the node's API contract; the node verifies it independently (the skill never
imports node code), and tests/test_signing_compat.py keeps both sides in step.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import struct
import time

import httpx
from nacl.exceptions import BadSignatureError, CryptoError
from nacl.public import Box, PrivateKey
from nacl.signing import VerifyKey

SCHEME = "PB1-HMAC-SHA256"
ED25519_SCHEME = "PB1-ED25519"
CREDENTIAL_HEADER = "X-PinkyBrain-Credential"


def _canonical(scheme: str, method: str, path: str, query: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    return "\n".join(
        (scheme, method.upper(), path, query, timestamp, nonce, hashlib.sha256(body).hexdigest())
    ).encode()


def signature_headers(secret: str, method: str, path: str, query: str, body: bytes,
                      credential: str = "mesh") -> dict[str, str]:
    timestamp = f"{time.time():.3f}"
    nonce = secrets.token_hex(16)
    canonical = _canonical(SCHEME, method, path, query, timestamp, nonce, body)
    sig = hmac.new(secret.encode(), canonical, hashlib.sha256).hexdigest()
    headers = {"X-PinkyBrain-Sig": sig, "X-PinkyBrain-Timestamp": timestamp, "X-PinkyBrain-Nonce": nonce}
    if credential != "mesh":
        headers[CREDENTIAL_HEADER] = credential
    return headers


class HmacAuth(httpx.Auth):
    """httpx auth flow: signs the final request (after params and body are encoded)."""

    requires_request_body = True

    def __init__(self, secret: str, credential: str = "mesh"):
        self.secret = secret
        self.credential = credential  # "mesh" (the network secret) or "owner" (the node's owner key)
        self.proof_key = ProofKey()  # lets nodes prove their id with an HMAC instead of a signature

    def auth_flow(self, request: httpx.Request):
        body = request.content
        request.headers.update(
            signature_headers(
                self.secret, request.method, request.url.path, request.url.query.decode("ascii"), body,
                self.credential,
            )
        )
        request.headers[CLIENT_KEY_HEADER] = self.proof_key.public
        yield request


class PeerAuth(httpx.Auth):
    """A public peer's request: Ed25519 by its identity key (the 32-byte seed), its node id alongside."""

    requires_request_body = True
    credential = "peer"

    def __init__(self, seed: bytes, node_id: str):
        from nacl.signing import SigningKey

        self._key = SigningKey(seed)
        self.node_id = node_id

    def auth_flow(self, request: httpx.Request):
        timestamp = f"{time.time():.3f}"
        nonce = secrets.token_hex(16)
        canonical = _canonical(ED25519_SCHEME, request.method, request.url.path, request.url.query.decode("ascii"),
                               timestamp, nonce, request.content)
        request.headers.update({
            "X-PinkyBrain-Sig": self._key.sign(canonical).signature.hex(), "X-PinkyBrain-Timestamp": timestamp,
            "X-PinkyBrain-Nonce": nonce, CREDENTIAL_HEADER: "peer", "X-PinkyBrain-Peer": self.node_id,
        })
        yield request
# -- the node's answer: proof and sealing (the node's side: node/core/skill_link.py) -------------------

NODE_HEADER = "x-pinkybrain-node"
PROOF_HEADER = "x-pinkybrain-proof"
NODE_SIG_HEADER = "x-pinkybrain-node-sig"
NODE_MAC_HEADER = "x-pinkybrain-node-mac"
CLIENT_KEY_HEADER = "x-pinkybrain-client-key"
SEAL_HEADER = "x-pinkybrain-seal"
SEALED_HEADER = "x-pinkybrain-sealed"
PROOF_DOMAIN = b"pinkybrain/response-proof/v1\x00"
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_LEN = struct.Struct(">I")
MAX_FRAME = 16 * 1024 * 1024


class ProofError(Exception):
    """An answer that does not prove it comes from a node of our network (or from the pinned node)."""


class NodeIdError(ValueError):
    pass


def _luhn32(chunk: str) -> str:
    factor, total, n = 1, 0, len(_ALPHABET)
    for ch in reversed(chunk):
        addend = factor * _ALPHABET.index(ch)
        factor = 1 if factor == 2 else 2
        total += addend // n + addend % n
    return _ALPHABET[(n - total % n) % n]


def node_public_key(node_id: str) -> bytes:
    """The Ed25519 key a node id carries (Syncthing's layout: 4 x 13 base32 characters, each + a Luhn check)."""
    text = node_id.strip().upper().replace("-", "").replace(" ", "")
    if len(text) != 56 or any(ch not in _ALPHABET for ch in text):
        raise NodeIdError(f"not a node id: {node_id!r} (expected 56 base32 characters in 8 groups of 7)")
    chunks = [text[i * 14 : i * 14 + 13] for i in range(4)]
    if any(_luhn32(chunk) != text[i * 14 + 13] for i, chunk in enumerate(chunks)):
        raise NodeIdError(f"node id {node_id!r} fails its checksum: typo?")
    return base64.b32decode("".join(chunks) + "====")


def canonical_node_id(node_id: str) -> str:
    """The node id as nodes print it (eight dash-separated groups of seven), or NodeIdError."""
    text = node_id.strip().upper().replace("-", "").replace(" ", "")
    node_public_key(text)
    return "-".join(text[i : i + 7] for i in range(0, 56, 7))


class ProofKey:
    """The X25519 key pair a client names in x-pinkybrain-client-key: a node proves its id on each answer
    with an HMAC under the key both sides derive from it (node/core/skill_link.py), not a signature."""

    def __init__(self):
        self._private = PrivateKey.generate()
        self.public = base64.b64encode(bytes(self._private.public_key)).decode()
        self._shared: dict[str, bytes] = {}  # node id -> K (few nodes per client)

    def shared_with(self, node_id: str) -> bytes:
        """K for `node_id`; NodeIdError for a malformed id."""
        shared = self._shared.get(node_id)
        if shared is None:
            node_key = VerifyKey(node_public_key(node_id)).to_curve25519_public_key()
            shared = self._shared[node_id] = Box(self._private, node_key).shared_key()
        return shared


def check_proof(secret: str, nonce: str, headers, expected_node: str | None = None,
                proof_key: ProofKey | None = None) -> str:
    """The node id that proved itself on an answer to our request `nonce`, or ProofError saying why not.

    The HMAC proves the responder holds our secret; the Ed25519 signature, or the MAC under the key shared
    with our `proof_key`, that it holds the node id's key (which `expected_node`, when given, must be)."""
    node_id, proof = headers.get(NODE_HEADER), headers.get(PROOF_HEADER)
    sig, mac = headers.get(NODE_SIG_HEADER), headers.get(NODE_MAC_HEADER) if proof_key is not None else None
    if not (node_id and proof and (sig or mac)):
        raise ProofError("its answer carries no node proof")
    message = PROOF_DOMAIN + nonce.encode() + b"\n" + node_id.encode()
    expected_proof = hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected_proof.encode(), proof.strip().lower().encode()):
        raise ProofError("its node proof does not match our secret")
    try:
        if mac:
            expected_mac = hmac.digest(proof_key.shared_with(node_id), message, "sha256").hex()
            if not hmac.compare_digest(expected_mac.encode(), mac.strip().lower().encode()):
                raise BadSignatureError
        else:
            VerifyKey(node_public_key(node_id)).verify(message, base64.b64decode(sig, validate=True))
    except (NodeIdError, BadSignatureError, CryptoError, ValueError):
        raise ProofError(f"its signature does not verify against the node id it names ({node_id[:15]!r})") from None
    if expected_node is not None and node_id != expected_node:
        raise ProofError(f"it is node {node_id}, not {expected_node}")
    return node_id


class RequestSeal:
    """One request's keys: a fresh X25519 key pair and the node's X25519 key (from its node id)."""

    def __init__(self, node_id: str):
        ephemeral = PrivateKey.generate()
        node_key = VerifyKey(node_public_key(node_id)).to_curve25519_public_key()
        self._box = Box(ephemeral, node_key)
        self.header = base64.b64encode(bytes(ephemeral.public_key)).decode()
        self._counter = 0
        self._buffer = b""
        self.finished = False

    def seal(self, query: str, body: bytes) -> bytes:
        raw = query.encode()
        return self._box.encrypt(_LEN.pack(len(raw)) + raw + body, bytes(Box.NONCE_SIZE)).ciphertext

    def open_frames(self, data: bytes) -> list[bytes]:
        """Feed received bytes; return the data of every frame now complete (ProofError if one is forged)."""
        self._buffer += data
        out = []
        while len(self._buffer) >= _LEN.size:
            size = _LEN.unpack_from(self._buffer)[0]
            if size > MAX_FRAME:
                raise ProofError("its sealed answer has an oversized frame")
            if len(self._buffer) < _LEN.size + size:
                break
            sealed = self._buffer[_LEN.size : _LEN.size + size]
            self._buffer = self._buffer[_LEN.size + size :]
            if self.finished:
                raise ProofError("its sealed answer goes on after its last frame")
            nonce = b"\x01" + self._counter.to_bytes(Box.NONCE_SIZE - 1, "big")
            try:
                plain = self._box.decrypt(sealed, nonce)
            except CryptoError:
                raise ProofError("a frame of its sealed answer does not open (altered, dropped or replayed)") from None
            self._counter += 1
            self.finished = plain[:1] == b"\x01"
            out.append(plain[1:])
        return out

    def check_complete(self) -> None:
        if not self.finished or self._buffer:
            raise ProofError("its sealed answer was cut short")
