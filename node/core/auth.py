"""HMAC request authentication for the node API, as pure logic (no sockets).

A request is signed over a canonical string of method, path, raw query, timestamp, nonce and the
SHA-256 of the body, keyed by the network secret. The skill builds the same string independently
(skill/signing.py); tests/test_signing_compat.py keeps the two in step.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections import OrderedDict
from dataclasses import dataclass

SIG_HEADER = "x-pinkybrain-sig"
TS_HEADER = "x-pinkybrain-timestamp"
NONCE_HEADER = "x-pinkybrain-nonce"
SCHEME = "PB1-HMAC-SHA256"
MAX_SKEW_SECS = 60
MAX_NONCE_LEN = 128


def canonical_string(method: str, path: str, query: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    return "\n".join(
        (SCHEME, method.upper(), path, query, timestamp, nonce, hashlib.sha256(body).hexdigest())
    ).encode()


def sign(secret: str, method: str, path: str, query: str, timestamp: str, nonce: str, body: bytes) -> str:
    return hmac.new(
        secret.encode(), canonical_string(method, path, query, timestamp, nonce, body), hashlib.sha256
    ).hexdigest()


def openai_api_key(secret: str) -> str:
    """The bearer key for the OpenAI-compatible endpoints (/v1/*): derived from the network secret so
    OpenAI clients, which cannot sign requests, still prove they know it. Shown by `pinkybrain openai-key`."""
    return "pb-" + hmac.new(secret.encode(), b"pinkybrain-openai-compatible-key-v1", hashlib.sha256).hexdigest()[:48]


def bearer_ok(secret: str, authorization: str | None) -> bool:
    if not authorization or not authorization.lower().startswith("bearer "):
        return False
    return hmac.compare_digest(authorization[7:].strip().encode(), openai_api_key(secret).encode())


class AuthError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class NonceCache:
    """Remembers nonces for twice the allowed skew, so a replay inside the window is caught."""

    def __init__(self, ttl: float = 2 * MAX_SKEW_SECS, max_entries: int = 200_000):
        self.ttl = ttl
        self.max_entries = max_entries
        self._seen: OrderedDict[str, float] = OrderedDict()

    def check_and_add(self, nonce: str, now: float) -> bool:
        """True if new (and now remembered); False if seen within the TTL."""
        while self._seen:
            oldest, expires = next(iter(self._seen.items()))
            if expires > now:
                break
            del self._seen[oldest]
        if nonce in self._seen:
            return False
        if len(self._seen) >= self.max_entries:
            # Full of live nonces: refusing is safer than forgetting one (which would allow a replay).
            raise AuthError("busy", "too many requests in the replay window; retry shortly")
        self._seen[nonce] = now + self.ttl
        return True


@dataclass
class RequestVerifier:
    secret: str
    nonces: NonceCache

    def verify(
        self,
        method: str,
        path: str,
        query: str,
        headers: dict[str, str],
        body: bytes,
        now: float | None = None,
    ) -> None:
        """Raise AuthError with a code saying what is wrong; return None when the request is good."""
        now = time.time() if now is None else now
        sig = headers.get(SIG_HEADER)
        ts = headers.get(TS_HEADER)
        nonce = headers.get(NONCE_HEADER)
        if not sig:
            raise AuthError("missing_signature", f"request is not signed: {SIG_HEADER} header missing")
        if not ts or not nonce:
            missing = TS_HEADER if not ts else NONCE_HEADER
            raise AuthError("missing_signature", f"signed request lacks the {missing} header")
        try:
            ts_value = float(ts)
        except ValueError:
            raise AuthError("bad_timestamp", f"{TS_HEADER} must be Unix seconds, got {ts[:40]!r}") from None
        if not math.isfinite(ts_value):  # nan compares false with every bound: it would never go stale
            raise AuthError("bad_timestamp", f"{TS_HEADER} must be a finite number of Unix seconds")
        if len(nonce) > MAX_NONCE_LEN or not nonce.isprintable():
            raise AuthError(
                "bad_nonce", f"{NONCE_HEADER} must be at most {MAX_NONCE_LEN} printable characters"
            )
        expected = sign(self.secret, method, path, query, ts, nonce, body)
        if not hmac.compare_digest(expected.encode(), sig.strip().lower().encode()):
            raise AuthError("bad_signature", "signature does not match: wrong secret or altered request")
        skew = now - ts_value
        if abs(skew) > MAX_SKEW_SECS:
            raise AuthError(
                "stale_timestamp",
                f"timestamp is {abs(skew):.0f}s {'old' if skew > 0 else 'in the future'} "
                f"(allowed ±{MAX_SKEW_SECS}s): check the clock",
            )
        if not self.nonces.check_and_add(nonce, now):
            raise AuthError("replayed_nonce", "this nonce was already used: request replayed")
