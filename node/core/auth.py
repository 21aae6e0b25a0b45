"""Request authentication for the node API, as pure logic (no sockets).

A request is signed over a canonical string of method, path, raw query, timestamp, nonce and the
SHA-256 of the body. Which key signs it says who is calling (X-PinkyBrain-Credential):
  mesh (or no header)  HMAC-SHA256 keyed by the network secret          -> Principal.MEMBER
  owner                HMAC-SHA256 keyed by the node's owner key          -> Principal.OWNER
  peer                 Ed25519 by the node id in X-PinkyBrain-Peer, valid -> Principal.PUBLIC
                       in this node's Web of Trust (scheme PB1-ED25519)
The skill builds the same string independently (skill/signing.py); tests/test_signing_compat.py keeps
the two in step. Checking is split in two so the API can refuse before reading a body: check_headers()
(presence, shape, freshness: no body needed) and verify() (signature over the body, nonce).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pinkybrain.node.core.identity import IdentityError, validate_node_id
from pinkybrain.node.core.identity import verify as ed25519_verify
from pinkybrain.node.core.keyed_hmac import KeyedHmac
from pinkybrain.node.core.principals import AuthContext, Principal

SIG_HEADER = "x-pinkybrain-sig"
TS_HEADER = "x-pinkybrain-timestamp"
NONCE_HEADER = "x-pinkybrain-nonce"
CREDENTIAL_HEADER = "x-pinkybrain-credential"
PEER_HEADER = "x-pinkybrain-peer"
SCHEME = "PB1-HMAC-SHA256"
ED25519_SCHEME = "PB1-ED25519"
CREDENTIALS = ("mesh", "owner", "peer")
_PRINCIPALS = {"mesh": Principal.MEMBER, "owner": Principal.OWNER, "peer": Principal.PUBLIC}
_HMAC_SIG = re.compile(r"^[0-9a-fA-F]{64}$")
_ED25519_SIG = re.compile(r"^[0-9a-fA-F]{128}$")
MAX_SKEW_SECS = 60
MAX_NONCE_LEN = 128


_EMPTY_BODY_SHA256 = hashlib.sha256(b"").hexdigest()  # most requests (GETs) have no body


def canonical_string(method: str, path: str, query: str, timestamp: str, nonce: str, body: bytes,
                     scheme: str = SCHEME) -> bytes:
    digest = hashlib.sha256(body).hexdigest() if body else _EMPTY_BODY_SHA256
    return "\n".join((scheme, method.upper(), path, query, timestamp, nonce, digest)).encode()


def sign(secret: str, method: str, path: str, query: str, timestamp: str, nonce: str, body: bytes) -> str:
    return hmac.new(
        secret.encode(), canonical_string(method, path, query, timestamp, nonce, body), hashlib.sha256
    ).hexdigest()


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


@dataclass(slots=True)
class Claim:
    """What a request's headers claim, checked for shape and freshness before any body is read."""

    credential: str  # "mesh" | "owner" | "peer"
    principal: Principal
    sig: str
    timestamp: str
    nonce: str
    peer_id: str | None = None


@dataclass
class RequestVerifier:
    """Verifies signed requests for one node. `owner_key` empty: no owner credential (tests, tools);
    `peer_valid(node_id)`: whether a public peer is valid in this node's Web of Trust (None: no public
    peers reach the API)."""

    secret: str
    nonces: NonceCache
    owner_key: str = ""
    peer_valid: Callable[[str], bool] | None = None

    def __post_init__(self) -> None:
        self._secret_key = self.secret.encode()
        self._owner_key = self.owner_key.encode()
        # Keyed once (core/keyed_hmac.py): hmac.digest() pads and absorbs the key again on every call.
        self._secret_mac = KeyedHmac(self._secret_key)
        self._owner_mac = KeyedHmac(self._owner_key) if self._owner_key else None

    def check_headers(self, headers: Mapping[str, str], now: float | None = None) -> Claim:
        """Presence, shape and freshness of the signature headers: raise AuthError, else the Claim."""
        return self.check_values(headers.get(SIG_HEADER), headers.get(TS_HEADER), headers.get(NONCE_HEADER),
                                 headers.get(CREDENTIAL_HEADER), headers.get(PEER_HEADER), now)

    def check_values(self, sig: str | None, ts: str | None, nonce: str | None, credential: str | None,
                     peer: str | None, now: float | None = None) -> Claim:
        """check_headers() on the five headers' values (None: absent), for a caller that has them already."""
        now = time.time() if now is None else now
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
        credential = "mesh" if credential is None else credential.strip().lower()
        principal = _PRINCIPALS.get(credential)
        if principal is None:
            raise AuthError("bad_credential", f"{CREDENTIAL_HEADER} must be one of {', '.join(CREDENTIALS)}")
        sig = sig.strip().lower()
        peer_id = None
        if credential == "peer":
            if self.peer_valid is None:
                raise AuthError("bad_credential", "this node takes no requests from public peers")
            try:
                peer_id = validate_node_id(peer or "")
            except IdentityError:
                raise AuthError("bad_credential", f"a peer-signed request needs its node id in {PEER_HEADER}") from None
            if not _ED25519_SIG.match(sig):
                raise AuthError("bad_signature", f"{SIG_HEADER} must be 128 hex digits (Ed25519)")
        elif not _HMAC_SIG.match(sig):
            raise AuthError("bad_signature", f"{SIG_HEADER} must be 64 hex digits (HMAC-SHA256)")
        if credential == "owner" and not self._owner_key:
            raise AuthError("bad_credential", "this node has no owner key")
        skew = now - ts_value
        if not abs(skew) <= MAX_SKEW_SECS:  # written so a NaN skew is refused too
            raise AuthError(
                "stale_timestamp",
                f"timestamp is {abs(skew):.0f}s {'old' if skew > 0 else 'in the future'} "
                f"(allowed ±{MAX_SKEW_SECS}s): check the clock",
            )
        return Claim(credential, principal, sig, ts, nonce, peer_id)

    def verify_claim(self, claim: Claim, method: str, path: str, query: str, body: bytes,
                     now: float | None = None) -> AuthContext:
        """The signature over the body, the peer's standing, the nonce: raise AuthError, else who it is."""
        now = time.time() if now is None else now
        if claim.credential == "peer":
            message = canonical_string(method, path, query, claim.timestamp, claim.nonce, body, ED25519_SCHEME)
            if not ed25519_verify(claim.peer_id, message, bytes.fromhex(claim.sig)):
                raise AuthError("bad_signature", "signature does not verify against the peer's node id")
            if not self.peer_valid(claim.peer_id):
                raise AuthError("untrusted_peer", "this node's Web of Trust does not find the peer valid")
            key = b""
        else:
            owner = claim.credential == "owner"
            key = self._owner_key if owner else self._secret_key
            expected = (self._owner_mac if owner else self._secret_mac).hexdigest(
                canonical_string(method, path, query, claim.timestamp, claim.nonce, body))
            if not hmac.compare_digest(expected.encode(), claim.sig.encode()):
                which = "owner key" if claim.credential == "owner" else "secret"
                raise AuthError("bad_signature", f"signature does not match: wrong {which} or altered request")
        if not self.nonces.check_and_add(claim.nonce, now):
            raise AuthError("replayed_nonce", "this nonce was already used: request replayed")
        return AuthContext(principal=claim.principal, credential=key, nonce=claim.nonce, peer_id=claim.peer_id)

    def verify(
        self,
        method: str,
        path: str,
        query: str,
        headers: dict[str, str],
        body: bytes,
        now: float | None = None,
    ) -> AuthContext:
        """Both steps at once (for callers that already hold the body): raise AuthError, else who it is."""
        return self.verify_claim(self.check_headers(headers, now), method, path, query, body, now)
