"""The tracker's wire protocol: signed peer records, session authentication and relay frames (no I/O).

A tracker is a WebSocket server. Control messages are JSON text messages (UTF-8, one object each, with a
"type"); relayed data travels in binary messages with a fixed 37-byte header. Every message is at most
MAX_MESSAGE_BYTES (256 KiB) from a client; a tracker's replies are at most MAX_REPLY_BYTES.

Session, proving the node id (the key is in the id, so no registration is needed):

    tracker -> client  {"type":"challenge","v":1,"nonce":B64(32 random bytes),"tracker":URL,"time":T}
    client -> tracker  {"type":"auth","v":1,"node_id":ID,"tracker":URL,"sig":B64(sig)}
                       sig = Ed25519(AUTH_DOMAIN | nonce | canonical tracker URL)
    tracker -> client  {"type":"welcome","node_id":ID,"time":T,"limits":{...}}   or an error, then close

The URL in the signature is the one the client dialled, and the client refuses a challenge naming another
URL; the tracker accepts only its own advertised URL. So a malicious tracker cannot pass another
tracker's challenge through to a client and log in elsewhere under that client's id. The nonce makes
each answer single-use. Until the answer is accepted, anything else closes the connection.

Requests (each may carry an integer "id" that the reply echoes):

    {"type":"announce","id":N,"record":RECORD}     -> {"type":"ok","id":N,"op":"announce","expires_at":T}
    {"type":"list","id":N,"model":NAME?,"sha256":HEX?,"available":BOOL?,"limit":L?,"after":ID?}
                                -> {"type":"peers","id":N,"records":[RECORD...],"next":ID|null}
    {"type":"leave","id":N}                         -> {"type":"ok","id":N,"op":"leave"}
    {"type":"ping","id":N}                          -> {"type":"pong","id":N,"time":T}
    {"type":"stats","id":N}                         -> {"type":"stats","id":N,"records":...,"sessions":...}
    any fault                                       -> {"type":"error","id":N|null,"code":CODE,"message":TEXT}

`list` pages through non-expired, non-stealth records ordered by node id, never the asker's own; pass
"next" back as "after" for the following page ("next" is null on the last page). A page may hold fewer
than "limit" records and still have a "next": the tracker bounds the work one request may cost.

A record is a node's own signed statement; the tracker stores it until it expires, a higher sequence
number replaces it, or the node leaves. A session may announce only its own node id. Against Sybils
(keys are free, records outlive sessions) the tracker uses rate limits, not proof-of-work: an address
range (address_range: /24 for IPv4, /48 for IPv6) may add new node ids only at a limited rate, and may
hold only so many records at once; a refusal is "rate_limited".
Record fields (all numbers are integers, so the canonical bytes are the same in every language):

    {"v":1,"node_id":ID,"name":STR|null,"addresses":[URL...],"models":[{"name":STR,"sha256":HEX|null}...],
     "capacity":{"cpu_cores":I,"ram_mb":I,"cpu_percent":I,"ram_percent":I,"paused":BOOL},
     "stealth":BOOL,"issued_at":UNIX,"expires_at":UNIX,"seq":I,"sig":B64}

    sig = Ed25519(RECORD_DOMAIN | canonical JSON of every field but "sig")
    canonical JSON = sorted keys, no spaces, ASCII only

A stealth record has no addresses; it is kept (the node is a member) but never listed, by the tracker or
by a client that re-shares a list. Relayed frames reach a node through its live session, not its record.

Relay frames (binary; node keys are the 32-byte Ed25519 public keys inside the node ids):

    client -> tracker  0x01 | circuit (4, big-endian) | destination key (32) | payload
    tracker -> client  0x02 | circuit (4)             | source key (32)      | payload
    tracker -> client  0x03 | circuit (4)             | destination key (32) | reason (1)   (undeliverable)

The tracker copies the payload unread and stamps the authenticated sender's key, so "from" cannot be
forged. Nodes encrypt payloads end to end (the mesh's Noise handshake and channel frames ride inside);
the circuit number is the nodes' own multiplexing tag and means nothing to the tracker.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
import struct
import time
from dataclasses import dataclass
from functools import cached_property, lru_cache
from urllib.parse import urlsplit

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from pinkybrain.node.core.identity import (
    Identity,
    IdentityError,
    node_id_from_public_key,
    public_key_from_node_id,
    verify,
)

PROTOCOL_VERSION = 1
RECORD_VERSION = 1
AUTH_DOMAIN = b"pinkybrain-tracker-auth-v1\x00"
RECORD_DOMAIN = b"pinkybrain-tracker-record-v1\x00"
CHALLENGE_BYTES = 32
SIGNATURE_BYTES = 64

MAX_MESSAGE_BYTES = 256 * 1024  # from a client
MAX_REPLY_BYTES = 1024 * 1024  # from the tracker (a page of records)
MAX_RECORD_BYTES = 32 * 1024
MAX_TTL_SECS = 600
MIN_TTL_SECS = 1
MAX_CLOCK_SKEW_SECS = 120
MAX_ADDRESSES = 8
MAX_ADDRESS_LEN = 256
MAX_MODELS = 128
MAX_MODEL_NAME = 128
MAX_NAME = 64
MAX_INT = 2**53 - 1  # integers every JSON implementation reads exactly
LIST_DEFAULT_LIMIT = 100
LIST_MAX_LIMIT = 500

RELAY_HEADER = struct.Struct(">BI32s")
KIND_RELAY = 0x01
KIND_DELIVER = 0x02
KIND_UNDELIVERABLE = 0x03
MAX_RELAY_PAYLOAD = MAX_MESSAGE_BYTES - RELAY_HEADER.size
MAX_CIRCUIT = 2**32 - 1

# Reasons in an undeliverable notice.
UNDELIVERABLE_REASONS = {1: "unreachable", 2: "congested", 3: "rate_limited", 4: "self"}
REASON_UNREACHABLE, REASON_CONGESTED, REASON_RATE_LIMITED, REASON_SELF = 1, 2, 3, 4

# Error codes in {"type":"error"}.
E_BAD_JSON = "bad_json"
E_BAD_MESSAGE = "bad_message"
E_UNKNOWN_TYPE = "unknown_type"
E_AUTH_FAILED = "auth_failed"
E_AUTH_TIMEOUT = "auth_timeout"
E_BAD_RECORD = "bad_record"
E_BAD_SIGNATURE = "bad_signature"
E_EXPIRED = "expired"
E_STALE = "stale_sequence"
E_NOT_YOURS = "not_yours"
E_FULL = "full"
E_RATE_LIMITED = "rate_limited"
E_TOO_MANY_SESSIONS = "too_many_sessions"
E_INTERNAL = "internal"

# WebSocket close codes (4000-4999 are the application's).
CLOSE_PROTOCOL = 4400
CLOSE_AUTH = 4401
CLOSE_TIMEOUT = 4408
CLOSE_REPLACED = 4409
CLOSE_SLOW = 4410
CLOSE_FLOOD = 4429
CLOSE_TRY_LATER = 1013

_HEX64 = re.compile(r"[0-9a-f]{64}")
_URL_SCHEMES = ("ws", "wss", "http", "https")


class ProtocolError(Exception):
    """A message or record that breaks the protocol; `code` is one of the E_* codes."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


# -- encodings --------------------------------------------------------------------------------------
def address_range(ip: str) -> str:
    """The range one party is assumed to control: /24 of IPv4 (an IPv4-mapped IPv6 address counts as
    IPv4), /48 of IPv6 (a typical site allocation). Anything unparsable is its own range."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    prefix = 24 if addr.version == 4 else 48
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text, expected_len: int | None = None) -> bytes:
    if not isinstance(text, str) or len(text) > 4 * MAX_MESSAGE_BYTES:
        raise ProtocolError(E_BAD_MESSAGE, "expected base64 text")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(E_BAD_MESSAGE, "invalid base64") from None
    if expected_len is not None and len(data) != expected_len:
        raise ProtocolError(E_BAD_MESSAGE, f"expected {expected_len} bytes, got {len(data)}")
    return data


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed")


def parse_message(text: str) -> dict:
    """One client or tracker text message -> dict with a string "type" and an int-or-absent "id"."""
    try:
        # RecursionError: a deeply nested document; ValueError also covers over-long integer literals.
        msg = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise ProtocolError(E_BAD_JSON, "the message is not valid JSON") from None
    if not isinstance(msg, dict):
        raise ProtocolError(E_BAD_MESSAGE, "the message is not a JSON object")
    kind = msg.get("type")
    if not isinstance(kind, str) or not kind or len(kind) > 32:
        raise ProtocolError(E_BAD_MESSAGE, "the message has no type")
    rid = msg.get("id")
    if rid is not None and not _is_int(rid, 0, MAX_INT):
        raise ProtocolError(E_BAD_MESSAGE, "id must be a non-negative integer")
    return msg


def error_message(code: str, message: str, rid: int | None = None) -> str:
    return dumps({"type": "error", "id": rid, "code": code, "message": message[:300]})


def request_id(msg: dict) -> int | None:
    rid = msg.get("id")
    return rid if _is_int(rid, 0, MAX_INT) else None


@lru_cache(maxsize=16384)
def parse_node_id(text: str) -> tuple[str, bytes]:
    """(canonical node id, public key), or IdentityError. Cached: checking the id's base32 and check
    characters costs more than verifying an Ed25519 signature, and the same ids come back every refresh."""
    key = public_key_from_node_id(text)
    return node_id_from_public_key(key), key


def _is_int(value, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _clean_text(value, limit: int, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > limit:
        raise ProtocolError(E_BAD_RECORD, f"{what} must be text of 1 to {limit} characters")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ProtocolError(E_BAD_RECORD, f"{what} contains control characters")
    return value


# -- tracker URL and authentication -----------------------------------------------------------------
def canonical_tracker_url(url: str) -> str:
    """Lower-case scheme and host, explicit port, no trailing slash: the form both sides sign."""
    if not isinstance(url, str) or len(url) > MAX_ADDRESS_LEN:
        raise ValueError("a tracker URL is text of at most 256 characters")
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in ("ws", "wss"):
        raise ValueError(f"tracker URL {url!r}: the scheme must be ws or wss")
    try:
        port = parts.port or (443 if scheme == "wss" else 80)
    except ValueError:
        raise ValueError(f"tracker URL {url!r} has a bad port") from None
    host = (parts.hostname or "").lower()
    if not host:
        raise ValueError(f"tracker URL {url!r} has no host")
    if ":" in host:
        host = f"[{host}]"
    path = parts.path.rstrip("/")
    return f"{scheme}://{host}:{port}{path}"


def auth_bytes(nonce: bytes, tracker_url: str) -> bytes:
    return AUTH_DOMAIN + nonce + canonical_tracker_url(tracker_url).encode()


def auth_message(identity: Identity, nonce: bytes, tracker_url: str) -> str:
    url = canonical_tracker_url(tracker_url)
    sig = identity.sign(auth_bytes(nonce, url))
    return dumps(
        {
            "type": "auth",
            "v": PROTOCOL_VERSION,
            "node_id": identity.node_id,
            "tracker": url,
            "sig": b64encode(sig),
        }
    )


def check_auth(msg: dict, nonce: bytes, tracker_url: str) -> str:
    """Validate a client's answer to `nonce`; return its canonical node id or raise ProtocolError."""
    if msg.get("type") != "auth":
        raise ProtocolError(E_AUTH_FAILED, "the first message must be auth")
    if msg.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(E_AUTH_FAILED, f"unsupported protocol version {str(msg.get('v'))[:20]}")
    claimed = msg.get("node_id")
    if not isinstance(claimed, str) or len(claimed) > 80:
        raise ProtocolError(E_AUTH_FAILED, "auth carries no node id")
    try:
        node_id = parse_node_id(claimed)[0]
    except IdentityError:
        raise ProtocolError(E_AUTH_FAILED, "auth carries an invalid node id") from None
    expected = canonical_tracker_url(tracker_url)
    signed_url = msg.get("tracker")
    if not isinstance(signed_url, str) or len(signed_url) > MAX_ADDRESS_LEN:
        raise ProtocolError(E_AUTH_FAILED, "auth names no tracker URL")
    try:
        signed_url = canonical_tracker_url(signed_url)
    except ValueError:
        raise ProtocolError(E_AUTH_FAILED, "auth names an invalid tracker URL") from None
    if signed_url != expected:
        raise ProtocolError(E_AUTH_FAILED, f"the signature is for {signed_url}, this tracker is {expected}")
    sig = b64decode(msg.get("sig"), SIGNATURE_BYTES)
    if not verify(node_id, auth_bytes(nonce, expected), sig):
        raise ProtocolError(E_AUTH_FAILED, "the challenge signature does not verify")
    return node_id


# -- records ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelRef:
    name: str
    sha256: str | None = None

    def to_wire(self) -> dict:
        return {"name": self.name, "sha256": self.sha256}


@dataclass(frozen=True)
class Capacity:
    cpu_cores: int = 0
    ram_mb: int = 0
    cpu_percent: int = 0
    ram_percent: int = 0
    paused: bool = False

    def to_wire(self) -> dict:
        return {
            "cpu_cores": self.cpu_cores,
            "ram_mb": self.ram_mb,
            "cpu_percent": self.cpu_percent,
            "ram_percent": self.ram_percent,
            "paused": self.paused,
        }


_RECORD_KEYS = frozenset(
    {
        "v",
        "node_id",
        "name",
        "addresses",
        "models",
        "capacity",
        "stealth",
        "issued_at",
        "expires_at",
        "seq",
        "sig",
    }
)
_CAPACITY_LIMITS = {"cpu_cores": 1 << 20, "ram_mb": 1 << 40, "cpu_percent": 100, "ram_percent": 100}


def _check_address(url) -> str:
    url = _clean_text(url, MAX_ADDRESS_LEN, "an address")
    if any(ch.isspace() for ch in url):
        raise ProtocolError(E_BAD_RECORD, "an address contains spaces")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        raise ProtocolError(E_BAD_RECORD, "an address is not a URL") from None
    if parts.scheme not in _URL_SCHEMES or not parts.hostname:
        raise ProtocolError(E_BAD_RECORD, "an address must be a ws, wss, http or https URL with a host")
    return url


def _check_models(models) -> tuple[ModelRef, ...]:
    if not isinstance(models, list) or len(models) > MAX_MODELS:
        raise ProtocolError(E_BAD_RECORD, f"models must be a list of at most {MAX_MODELS}")
    out = []
    for m in models:
        if not isinstance(m, dict) or set(m) != {"name", "sha256"}:
            raise ProtocolError(E_BAD_RECORD, "a model is {name, sha256}")
        sha = m["sha256"]
        if sha is not None and (not isinstance(sha, str) or not _HEX64.fullmatch(sha)):
            raise ProtocolError(E_BAD_RECORD, "a model's sha256 is 64 lower-case hex digits or null")
        out.append(ModelRef(_clean_text(m["name"], MAX_MODEL_NAME, "a model name"), sha))
    return tuple(out)


def _check_capacity(cap) -> Capacity:
    if not isinstance(cap, dict) or set(cap) != set(_CAPACITY_LIMITS) | {"paused"}:
        raise ProtocolError(E_BAD_RECORD, "capacity is {cpu_cores, ram_mb, cpu_percent, ram_percent, paused}")
    for key, hi in _CAPACITY_LIMITS.items():
        if not _is_int(cap[key], 0, hi):
            raise ProtocolError(E_BAD_RECORD, f"capacity.{key} must be an integer from 0 to {hi}")
    if not isinstance(cap["paused"], bool):
        raise ProtocolError(E_BAD_RECORD, "capacity.paused must be true or false")
    return Capacity(cap["cpu_cores"], cap["ram_mb"], cap["cpu_percent"], cap["ram_percent"], cap["paused"])


@dataclass(frozen=True)
class AnnounceRecord:
    node_id: str
    addresses: tuple[str, ...]
    models: tuple[ModelRef, ...]
    capacity: Capacity
    stealth: bool
    issued_at: int
    expires_at: int
    seq: int
    name: str | None = None
    signature: bytes = b""

    # -- building -----------------------------------------------------------------------------------
    @staticmethod
    def build(
        identity: Identity,
        *,
        seq: int,
        addresses=(),
        models=(),
        capacity: Capacity | dict | None = None,
        stealth: bool = False,
        ttl: int = 300,
        name: str | None = None,
        now: float | None = None,
    ) -> AnnounceRecord:
        """A signed record for this identity. A stealth record with addresses is refused, never trimmed:
        the caller asked for something contradictory, and announcing it would leak where the node is."""
        if stealth and addresses:
            raise ValueError("a stealth record announces no addresses")
        if not MIN_TTL_SECS <= ttl <= MAX_TTL_SECS:
            raise ValueError(f"ttl must be {MIN_TTL_SECS} to {MAX_TTL_SECS} seconds")
        issued = int(time.time() if now is None else now)
        if isinstance(capacity, dict):
            capacity = Capacity(**capacity)
        refs = tuple(m if isinstance(m, ModelRef) else ModelRef(m["name"], m.get("sha256")) for m in models)
        unsigned = AnnounceRecord(
            node_id=identity.node_id,
            addresses=tuple(addresses),
            models=refs,
            capacity=capacity or Capacity(),
            stealth=bool(stealth),
            issued_at=issued,
            expires_at=issued + int(ttl),
            seq=int(seq),
            name=name,
        )
        # Round-trip through the validator so a node cannot sign what a tracker would refuse.
        body = unsigned.body()
        signed = AnnounceRecord.from_wire(
            {**body, "sig": b64encode(identity.sign(RECORD_DOMAIN + canonical_json(body)))}
        )
        return signed

    def body(self) -> dict:
        return {
            "v": RECORD_VERSION,
            "node_id": self.node_id,
            "name": self.name,
            "addresses": list(self.addresses),
            "models": [m.to_wire() for m in self.models],
            "capacity": self.capacity.to_wire(),
            "stealth": self.stealth,
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
            "seq": self.seq,
        }

    def signed_bytes(self) -> bytes:
        return RECORD_DOMAIN + canonical_json(self.body())

    def to_wire(self) -> dict:
        return {**self.body(), "sig": b64encode(self.signature)}

    def wire_json(self) -> str:
        return self._wire_json

    @cached_property
    def _wire_json(self) -> str:  # the tracker stores and the size check measures the same encoding
        return canonical_json(self.to_wire()).decode("ascii")

    # -- checking -----------------------------------------------------------------------------------
    @staticmethod
    def from_wire(obj) -> AnnounceRecord:
        """Parse and validate the shape (not the signature, not the clock); raise ProtocolError."""
        if not isinstance(obj, dict):
            raise ProtocolError(E_BAD_RECORD, "a record is a JSON object")
        if obj.get("v") != RECORD_VERSION:
            raise ProtocolError(E_BAD_RECORD, f"unsupported record version {str(obj.get('v'))[:20]}")
        if set(obj) != _RECORD_KEYS:
            missing, extra = sorted(_RECORD_KEYS - set(obj)), sorted(set(obj) - _RECORD_KEYS)
            raise ProtocolError(E_BAD_RECORD, f"record fields: missing {missing[:5]}, unknown {extra[:5]}")
        node_id = obj["node_id"]
        if not isinstance(node_id, str) or len(node_id) > 80:
            raise ProtocolError(E_BAD_RECORD, "node_id must be a node id")
        try:
            node_id = parse_node_id(node_id)[0]
        except IdentityError:
            raise ProtocolError(E_BAD_RECORD, "node_id is not a valid node id") from None
        name = obj["name"]
        if name is not None:
            name = _clean_text(name, MAX_NAME, "name")
        addresses = obj["addresses"]
        if not isinstance(addresses, list) or len(addresses) > MAX_ADDRESSES:
            raise ProtocolError(E_BAD_RECORD, f"addresses must be a list of at most {MAX_ADDRESSES}")
        addresses = tuple(_check_address(a) for a in addresses)
        stealth = obj["stealth"]
        if not isinstance(stealth, bool):
            raise ProtocolError(E_BAD_RECORD, "stealth must be true or false")
        if stealth and addresses:
            raise ProtocolError(E_BAD_RECORD, "a stealth record must not carry addresses")
        for key in ("issued_at", "expires_at", "seq"):
            if not _is_int(obj[key], 0, MAX_INT):
                raise ProtocolError(E_BAD_RECORD, f"{key} must be a non-negative integer below 2**53")
        ttl = obj["expires_at"] - obj["issued_at"]
        if not MIN_TTL_SECS <= ttl <= MAX_TTL_SECS:
            raise ProtocolError(
                E_BAD_RECORD, f"a record lives {MIN_TTL_SECS} to {MAX_TTL_SECS} seconds, not {ttl}"
            )
        sig = obj["sig"]
        if not isinstance(sig, str) or len(sig) > 100:
            raise ProtocolError(E_BAD_RECORD, "sig must be base64 text")
        try:
            signature = b64decode(sig, SIGNATURE_BYTES)
        except ProtocolError as exc:
            raise ProtocolError(E_BAD_RECORD, f"sig: {exc.message}") from None
        return AnnounceRecord(
            node_id=node_id,
            addresses=addresses,
            models=_check_models(obj["models"]),
            capacity=_check_capacity(obj["capacity"]),
            stealth=stealth,
            issued_at=obj["issued_at"],
            expires_at=obj["expires_at"],
            seq=obj["seq"],
            name=name,
            signature=signature,
        )

    def verify(self) -> bool:
        """True when the node named in the record signed exactly these fields."""
        try:
            VerifyKey(self.public_key).verify(self.signed_bytes(), self.signature)
        except (BadSignatureError, ValueError):
            return False
        return True

    def check_clock(self, now: float, skew: int = MAX_CLOCK_SKEW_SECS) -> None:
        """Refuse a record that has expired or claims to be issued in the future (beyond clock skew)."""
        if self.expires_at <= now:
            raise ProtocolError(E_EXPIRED, "the record has expired")
        if self.issued_at > now + skew:
            raise ProtocolError(E_BAD_RECORD, "the record is issued in the future (check the clock)")

    @property
    def public_key(self) -> bytes:
        return parse_node_id(self.node_id)[1]

    def model_names(self) -> list[str]:
        return [m.name for m in self.models]


def parse_record(obj, *, now: float | None = None, skew: int = MAX_CLOCK_SKEW_SECS) -> AnnounceRecord:
    """from_wire + signature + clock: what a tracker does on announce and a client on every listed record."""
    record = AnnounceRecord.from_wire(obj)
    if len(record.wire_json()) > MAX_RECORD_BYTES:
        raise ProtocolError(E_BAD_RECORD, f"the record is over {MAX_RECORD_BYTES} bytes")
    if not record.verify():
        raise ProtocolError(E_BAD_SIGNATURE, "the record's signature does not verify")
    record.check_clock(time.time() if now is None else now, skew)
    return record


# -- list requests ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ListQuery:
    model: str | None = None
    sha256: str | None = None
    available: bool | None = None  # true: leave out nodes whose resource guard paused sharing
    limit: int = LIST_DEFAULT_LIMIT
    after: str | None = None

    def to_message(self, rid: int) -> dict:
        msg: dict = {"type": "list", "id": rid, "limit": self.limit}
        for key in ("model", "sha256", "available", "after"):
            value = getattr(self, key)
            if value is not None:
                msg[key] = value
        return msg

    @staticmethod
    def from_message(msg: dict) -> ListQuery:
        model, sha, available = msg.get("model"), msg.get("sha256"), msg.get("available")
        limit, after = msg.get("limit", LIST_DEFAULT_LIMIT), msg.get("after")
        if model is not None and (not isinstance(model, str) or not 0 < len(model) <= MAX_MODEL_NAME):
            raise ProtocolError(E_BAD_MESSAGE, "model must be a model name")
        if sha is not None and (not isinstance(sha, str) or not _HEX64.fullmatch(sha)):
            raise ProtocolError(E_BAD_MESSAGE, "sha256 must be 64 lower-case hex digits")
        if available is not None and not isinstance(available, bool):
            raise ProtocolError(E_BAD_MESSAGE, "available must be true or false")
        if not _is_int(limit, 1, LIST_MAX_LIMIT):
            raise ProtocolError(E_BAD_MESSAGE, f"limit must be 1 to {LIST_MAX_LIMIT}")
        if after is not None and (not isinstance(after, str) or len(after) > 80):
            raise ProtocolError(E_BAD_MESSAGE, "after must be a node id")
        return ListQuery(model, sha, available, limit, after)


# -- relay frames -----------------------------------------------------------------------------------
def encode_relay(circuit: int, to_key: bytes, payload: bytes) -> bytes:
    return RELAY_HEADER.pack(KIND_RELAY, circuit, to_key) + payload


def encode_deliver(circuit: int, from_key: bytes, payload) -> bytes:
    return RELAY_HEADER.pack(KIND_DELIVER, circuit, from_key) + payload


def encode_undeliverable(circuit: int, to_key: bytes, reason: int) -> bytes:
    return RELAY_HEADER.pack(KIND_UNDELIVERABLE, circuit, to_key) + bytes((reason,))


def decode_frame(data) -> tuple[int, int, bytes, memoryview]:
    """(kind, circuit, key, payload view) of a binary message; ProtocolError when it is not one."""
    if len(data) < RELAY_HEADER.size:
        raise ProtocolError(
            E_BAD_MESSAGE, f"a binary message of {len(data)} bytes is shorter than its header"
        )
    kind, circuit, key = RELAY_HEADER.unpack_from(data)
    if kind not in (KIND_RELAY, KIND_DELIVER, KIND_UNDELIVERABLE):
        raise ProtocolError(E_BAD_MESSAGE, f"unknown binary message kind {kind}")
    return kind, circuit, key, memoryview(data)[RELAY_HEADER.size :]


def key_to_node_id(key: bytes) -> str:
    return node_id_from_public_key(key)


def node_id_to_key(node_id: str) -> bytes:
    return public_key_from_node_id(node_id)
