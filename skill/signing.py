"""Sign requests to a node: HMAC-SHA256 with the network secret (PB1 scheme).

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


def signature_headers(secret: str, method: str, path: str, query: str, body: bytes) -> dict[str, str]:
    timestamp = f"{time.time():.3f}"
    nonce = secrets.token_hex(16)
    canonical = "\n".join(
        (SCHEME, method.upper(), path, query, timestamp, nonce, hashlib.sha256(body).hexdigest())
    ).encode()
    sig = hmac.new(secret.encode(), canonical, hashlib.sha256).hexdigest()
    return {"X-PinkyBrain-Sig": sig, "X-PinkyBrain-Timestamp": timestamp, "X-PinkyBrain-Nonce": nonce}


class HmacAuth(httpx.Auth):
    """httpx auth flow: signs the final request (after params and body are encoded)."""

    requires_request_body = True

    def __init__(self, secret: str):
        self.secret = secret

    def auth_flow(self, request: httpx.Request):
        body = request.content
        request.headers.update(
            signature_headers(
                self.secret, request.method, request.url.path, request.url.query.decode("ascii"), body
            )
        )
        yield request
