"""Sign requests to a node (PB1 scheme). The key says who is asking:
  HmacAuth(secret)                        a mesh member: HMAC-SHA256 with the network secret
  HmacAuth(owner_key, credential="owner") the node's owner: HMAC-SHA256 with its owner key, named in
                                          X-PinkyBrain-Credential (the key itself never leaves this machine)
  PeerAuth(seed)                          a public peer: Ed25519 by its identity (PB1-ED25519)

The canonical string is the node's API contract; the node verifies it independently (the skill never
imports node code), and tests/test_signing_compat.py keeps both sides in step.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

import httpx

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

    def auth_flow(self, request: httpx.Request):
        body = request.content
        request.headers.update(
            signature_headers(
                self.secret, request.method, request.url.path, request.url.query.decode("ascii"), body,
                self.credential,
            )
        )
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
