"""The private mesh's link handshake: Noise XX with the network secret as PSK, bound to Ed25519 identities.

Pure protocol logic driven by bytes (no sockets), so two ends can be run against each other in memory.

    initiator -> responder   msg1: psk, e                 payload {"v": 1}
    responder -> initiator   msg2: e, ee, s, es           payload proof(responder)
    initiator -> responder   msg3: s, se                  payload proof(initiator)

The PSK is mixed in first (`psk0`, not `psk3`): with psk3 the responder's static key and message-2 payload
are encrypted only under ephemeral DH, so anyone who can open a WebSocket would learn the node's id,
name and models before proving the secret. With psk0 a wrong secret fails at message 1, on the
responder, before it has revealed anything or done a single DH.

Each static Noise key is the X25519 form of the node's Ed25519 key (the same secret scalar), so a node id
(which embeds the Ed25519 public key) pins the static key the peer must prove in the DH. On top, each side
signs with Ed25519: a domain prefix, its role, its static key, the handshake hash before its message (which
covers both ephemerals, so the signature cannot be replayed into another session) and its hello.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nacl.exceptions import CryptoError
from nacl.signing import VerifyKey
from noise.connection import Keypair, NoiseConnection
from noise.exceptions import NoiseHandshakeError, NoiseInvalidMessage, NoiseValueError

from pinkybrain.node.core.identity import Identity, IdentityError, public_key_from_node_id, validate_node_id

NOISE_PROTOCOL = b"Noise_XXpsk0_25519_ChaChaPoly_SHA256"
PROLOGUE = b"pinkybrain-mesh/1"
PROTOCOL_VERSION = 1
PSK_INFO = b"pinkybrain-mesh-psk-v1"
SIGNATURE_CONTEXT = b"pinkybrain-mesh-static-key-v1\x00"
MAX_HANDSHAKE_MESSAGE = 65535  # Noise's own message limit
MAX_HELLO_BYTES = 32 * 1024
SIGNATURE_LEN = 64
DH_LEN = 32
TAG_LEN = 16


class HandshakeError(Exception):
    """The handshake failed; `code` is machine-readable, str() is one operational line (no payloads)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


PSK_FAILURE_MESSAGE = "wrong network secret or corrupted handshake"


def derive_psk(secret: str) -> bytes:
    """The Noise PSK: HKDF-SHA256 of the network secret, so the raw secret never keys anything directly."""
    if not secret:
        raise ValueError("the network secret is empty")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=PSK_INFO).derive(secret.encode("utf-8"))


def static_private_key(identity: Identity) -> bytes:
    return bytes(identity.signing_key.to_curve25519_private_key())


def static_public_key_for(node_id: str) -> bytes:
    """The X25519 key a node with this id must hold (raises IdentityError for a bad id)."""
    try:
        return bytes(VerifyKey(public_key_from_node_id(node_id)).to_curve25519_public_key())
    except CryptoError:  # not a point on the curve: an id no real key can have
        raise IdentityError(f"node id {node_id!r} does not hold a usable public key") from None


def _signed_bytes(role: bytes, static_pub: bytes, handshake_hash: bytes, body: bytes) -> bytes:
    return SIGNATURE_CONTEXT + role + static_pub + handshake_hash + hashlib.sha256(body).digest()


@dataclass(frozen=True)
class HandshakeResult:
    peer_id: str
    peer_hello: dict
    initiator: bool
    send_key: bytes
    recv_key: bytes
    handshake_hash: bytes


class Handshake:
    """One side of one handshake. Initiator: `start()` -> msg1, `receive(msg2)` -> msg3, done.
    Responder: `receive(msg1)` -> msg2, `receive(msg3)` -> None, done. Any fault raises HandshakeError and
    the object is spent."""

    def __init__(self, identity: Identity, psk: bytes, *, initiator: bool, hello: dict | None = None):
        if len(psk) != 32:
            raise ValueError("the PSK is 32 bytes (use derive_psk)")
        self.identity = identity
        self.initiator = initiator
        self._static_pub = bytes(identity.signing_key.verify_key.to_curve25519_public_key())
        self._hello = json.dumps(hello or {}, separators=(",", ":"), sort_keys=True).encode()
        if len(self._hello) > MAX_HELLO_BYTES - 1024:
            raise ValueError("hello is too large for a handshake message")
        self._noise = NoiseConnection.from_name(NOISE_PROTOCOL)
        self._noise.set_psks(psk)
        self._noise.set_prologue(PROLOGUE)
        if initiator:
            self._noise.set_as_initiator()
        else:
            self._noise.set_as_responder()
        self._noise.set_keypair_from_private_bytes(Keypair.STATIC, static_private_key(identity))
        self._noise.start_handshake()
        self._step = 0
        self._failed = False
        self.result: HandshakeResult | None = None

    @property
    def done(self) -> bool:
        return self.result is not None

    # -- driving ------------------------------------------------------------------------------------
    def start(self) -> bytes:
        if not self.initiator or self._step != 0:
            raise HandshakeError("misuse", "start() is for the initiator's first message")
        self._step = 1
        return bytes(self._noise.write_message(json.dumps({"v": PROTOCOL_VERSION}).encode()))

    def receive(self, data: bytes) -> bytes | None:
        if self._failed or self.done:
            raise HandshakeError("misuse", "this handshake is finished")
        try:
            return self._receive(bytes(data))
        except HandshakeError:
            self._failed = True
            raise

    def _receive(self, data: bytes) -> bytes | None:
        if len(data) > MAX_HANDSHAKE_MESSAGE:
            raise HandshakeError("malformed", f"handshake message of {len(data)} bytes is over the limit")
        if self.initiator:
            if self._step != 1:
                raise HandshakeError("misuse", "the initiator must call start() first")
            # msg2 is at least e + encrypted s + a proof
            if len(data) < DH_LEN + DH_LEN + TAG_LEN + SIGNATURE_LEN + TAG_LEN:
                raise HandshakeError("malformed", f"truncated handshake message 2 ({len(data)} bytes)")
            hs = self._noise.noise_protocol.handshake_state
            h_before = hs.symmetric_state.h
            payload = self._read(data, 2)
            self._check_proof(payload, b"R", hs.rs.public_bytes, h_before)
            h_mine = hs.symmetric_state.h
            proof = self._proof(b"I", h_mine)
            out = bytes(self._noise.write_message(proof))
            self._finish()
            return out
        if self._step == 0:
            if len(data) < DH_LEN + TAG_LEN:
                raise HandshakeError("malformed", f"truncated handshake message 1 ({len(data)} bytes)")
            payload = self._read(data, 1)
            try:
                version = json.loads(payload).get("v")
            except (ValueError, AttributeError):
                raise HandshakeError("malformed", "handshake message 1 carries no version") from None
            if version != PROTOCOL_VERSION:
                raise HandshakeError(
                    "version", f"peer speaks mesh protocol version {version!r}, this node {PROTOCOL_VERSION}"
                )
            self._step = 2
            hs = self._noise.noise_protocol.handshake_state
            return bytes(self._noise.write_message(self._proof(b"R", hs.symmetric_state.h)))
        if self._step != 2:
            raise HandshakeError("misuse", "unexpected handshake message")
        if len(data) < DH_LEN + TAG_LEN + SIGNATURE_LEN + TAG_LEN:
            raise HandshakeError("malformed", f"truncated handshake message 3 ({len(data)} bytes)")
        hs = self._noise.noise_protocol.handshake_state  # kept: the last read deletes it from the connection
        h_before = hs.symmetric_state.h
        payload = self._read(data, 3)
        self._check_proof(payload, b"I", hs.rs.public_bytes, h_before)
        self._finish()
        return None

    # -- pieces -------------------------------------------------------------------------------------
    def _read(self, data: bytes, number: int) -> bytes:
        try:
            return bytes(self._noise.read_message(data))
        except (InvalidTag, NoiseInvalidMessage):
            raise HandshakeError("wrong_secret", PSK_FAILURE_MESSAGE) from None
        except (ValueError, TypeError, IndexError, NoiseValueError, NoiseHandshakeError) as exc:
            raise HandshakeError(
                "malformed", f"malformed handshake message {number} ({type(exc).__name__})"
            ) from None

    def _proof(self, role: bytes, handshake_hash: bytes) -> bytes:
        body = json.dumps(
            {"v": PROTOCOL_VERSION, "id": self.identity.node_id, "hello": json.loads(self._hello)},
            separators=(",", ":"),
            sort_keys=True,
        ).encode()
        signature = self.identity.sign(_signed_bytes(role, self._static_pub, handshake_hash, body))
        return body + signature

    def _check_proof(self, payload: bytes, role: bytes, remote_static: bytes, handshake_hash: bytes) -> None:
        if len(payload) <= SIGNATURE_LEN or len(payload) > MAX_HELLO_BYTES:
            raise HandshakeError("malformed", f"identity proof of {len(payload)} bytes")
        body, signature = payload[:-SIGNATURE_LEN], payload[-SIGNATURE_LEN:]
        try:
            proof = json.loads(body)
            claimed = proof["id"]
            hello = proof.get("hello") or {}
            version = proof.get("v")
        except (ValueError, KeyError, TypeError, AttributeError):
            raise HandshakeError("malformed", "identity proof is not the expected JSON") from None
        if version != PROTOCOL_VERSION:
            raise HandshakeError(
                "version", f"peer speaks mesh protocol version {version!r}, this node {PROTOCOL_VERSION}"
            )
        if not isinstance(claimed, str) or not isinstance(hello, dict):
            raise HandshakeError("malformed", "identity proof has a wrong field type")
        try:
            peer_id = validate_node_id(claimed)
            expected_static = static_public_key_for(peer_id)
        except IdentityError:
            raise HandshakeError("bad_node_id", "peer sent an invalid node id") from None
        if expected_static != remote_static:
            raise HandshakeError(
                "key_mismatch", f"peer {peer_id[:7]} proved a static key that does not belong to its node id"
            )
        try:
            VerifyKey(public_key_from_node_id(peer_id)).verify(
                _signed_bytes(role, remote_static, handshake_hash, body), signature
            )
        except (CryptoError, ValueError):
            raise HandshakeError(
                "bad_signature", f"peer {peer_id[:7]} sent a bad identity signature"
            ) from None
        if peer_id == self.identity.node_id:
            raise HandshakeError("self", "this link leads back to this node itself")
        self._peer = (peer_id, hello)

    def _finish(self) -> None:
        proto = self._noise.noise_protocol
        peer_id, hello = self._peer
        self.result = HandshakeResult(
            peer_id=peer_id,
            peer_hello=hello,
            initiator=self.initiator,
            send_key=bytes(proto.cipher_state_encrypt.k),
            recv_key=bytes(proto.cipher_state_decrypt.k),
            handshake_hash=bytes(self._noise.get_handshake_hash()),
        )
