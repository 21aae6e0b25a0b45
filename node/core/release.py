"""Signed release manifests: schema, canonical bytes, Ed25519 signatures, key files, version order.

A feed is one JSON document: {"manifest": {...}, "key_id": "...", "signature": "<base64>"}. The signature
covers SIGNING_CONTEXT + the manifest's canonical JSON (sorted keys, no spaces, ASCII), so whitespace or
key order added in transit does not matter while any change of a value does. `key_id` is an unsigned hint
used only to say *which* key signed a manifest we reject; trust comes from the pinned public key alone.
No I/O here: callers hand in bytes and get back checked values.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import signal
from dataclasses import asdict, dataclass
from importlib import resources
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

if TYPE_CHECKING:
    from packaging.version import Version

PACKAGE = "pinkybrain"
MANIFEST_FORMAT = "pinkybrain-release/1"
SIGNING_CONTEXT = b"pinkybrain release manifest v1\n"  # a signature made for anything else never matches
MAX_MANIFEST_BYTES = 64 * 1024
# Under systemd a node that installed an update exits with this status after a graceful stop, and the unit
# restarts on it (RestartForceExitStatus=75, SuccessExitStatus=75): no systemctl right needed. 75 is
# EX_TEMPFAIL. The updater asks the node for it with RESTART_SIGNAL.
RESTART_EXIT_CODE = 75
RESTART_SIGNAL = signal.SIGUSR2
MAX_ARTEFACT_BYTES = 512 * 1024 * 1024
MAX_NOTES_CHARS = 32 * 1024
PINNED_KEY_RESOURCE = "release_key.pub"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ReleaseError(ValueError):
    """A manifest, key or version that cannot be trusted or used; str() says why."""


class ManifestError(ReleaseError):
    """The document is not a well-formed release manifest."""


class SignatureError(ReleaseError):
    """The signature is missing, made by another key, or does not match the manifest."""


@dataclass(frozen=True)
class Manifest:
    version: str
    filename: str
    url: str
    size: int
    sha256: str
    notes: str
    created: str
    name: str = PACKAGE
    format: str = MANIFEST_FORMAT

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def parsed_version(self) -> Version:
        return parse_version(self.version)


# -- keys ------------------------------------------------------------------------------------------
def key_id(public_key: bytes) -> str:
    return hashlib.sha256(public_key).hexdigest()[:16]


def parse_public_key(text: str) -> bytes:
    """An Ed25519 public key from 64 hex digits or base64 (standard or URL-safe) of its 32 bytes."""
    value = text.strip()
    if re.fullmatch(r"[0-9a-fA-F]{64}", value):
        return bytes.fromhex(value)
    try:
        standard = value.replace("-", "+").replace("_", "/")
        raw = base64.b64decode(standard + "=" * (-len(standard) % 4), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ReleaseError("a release public key must be 32 bytes as 64 hex digits or base64")
    return raw


def read_key_text(text: str) -> str:
    """The key line of a key file: comments (#) and blank lines are skipped."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if len(lines) != 1:
        raise ReleaseError("a key file holds exactly one key line (besides # comments)")
    return lines[0]


def pinned_public_key() -> bytes:
    """The project's release key, shipped in the package next to this code."""
    try:
        text = resources.files("pinkybrain.node").joinpath(PINNED_KEY_RESOURCE).read_text(encoding="ascii")
    except (FileNotFoundError, OSError):
        raise ReleaseError(
            "the pinned release key (pinkybrain/node/release_key.pub) is missing from this install; "
            "set update.public_key to the key that signs your feed"
        ) from None
    return parse_public_key(read_key_text(text))


def public_key_file_text(public_key: bytes) -> str:
    b64 = base64.b64encode(public_key).decode()
    return (
        "# PinkyBrain release key: Ed25519 public key, base64. Release manifests must be signed by its\n"
        f"# private half. key id: {key_id(public_key)}\n{b64}\n"
    )


def private_key_file_text(signing_key: SigningKey) -> str:
    public = bytes(signing_key.verify_key)
    return (
        "# PinkyBrain release SIGNING key: Ed25519 private seed, base64. Keep it offline; never commit it.\n"
        f"# public key: {base64.b64encode(public).decode()}  key id: {key_id(public)}\n"
        f"{base64.b64encode(bytes(signing_key)).decode()}\n"
    )


def parse_private_key(text: str) -> SigningKey:
    try:
        seed = base64.b64decode(read_key_text(text), validate=True)
    except (binascii.Error, ValueError):
        seed = b""
    if len(seed) != 32:
        raise ReleaseError("not a release signing key file (expected the base64 of a 32-byte Ed25519 seed)")
    return SigningKey(seed)


# -- versions --------------------------------------------------------------------------------------
def parse_version(text: str) -> Version:
    # packaging is imported where versions are read, not by the node's start (server.py needs only
    # RESTART_EXIT_CODE and RESTART_SIGNAL from here).
    from packaging.version import InvalidVersion, Version

    try:
        return Version(str(text))
    except InvalidVersion:
        raise ManifestError(f"{text!r} is not a valid version") from None


def compare_versions(current: str, candidate: str) -> int:
    """-1 when candidate is older than current, 0 when equal, 1 when newer."""
    a, b = parse_version(current), parse_version(candidate)
    return (b > a) - (b < a)


# -- manifests -------------------------------------------------------------------------------------
def canonical_bytes(manifest: dict) -> bytes:
    return SIGNING_CONTEXT + json.dumps(
        manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def wheel_filename(version: str) -> str:
    return f"{PACKAGE}-{version}-py3-none-any.whl"


def validate_manifest(data: object) -> Manifest:
    """Check every field; the values are trusted only after verify_envelope checked the signature."""
    if not isinstance(data, dict):
        raise ManifestError("the release manifest must be a JSON object")

    def field(name: str, kind: type) -> object:
        value = data.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ManifestError(f"release manifest field {name!r} is missing or not a {kind.__name__}")
        return value

    if field("format", str) != MANIFEST_FORMAT:
        raise ManifestError(
            f"unknown release manifest format {data.get('format')!r} (this node reads {MANIFEST_FORMAT})"
        )
    from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename

    name = field("name", str)
    if canonicalize_name(name) != PACKAGE:
        raise ManifestError(f"the manifest is for package {name!r}, not {PACKAGE}")
    version = str(field("version", str))
    parsed = parse_version(version)
    filename = str(field("filename", str))
    try:
        wheel_name, wheel_version, _build, _tags = parse_wheel_filename(filename)
    except InvalidWheelFilename:
        raise ManifestError(f"the manifest's filename {filename!r} is not a wheel file name") from None
    if "/" in filename or "\\" in filename or wheel_name != PACKAGE or wheel_version != parsed:
        raise ManifestError(f"the manifest's filename {filename!r} does not match {PACKAGE} {version}")
    url = str(field("url", str))
    scheme = urlsplit(url).scheme
    if not url or scheme not in ("", "http", "https"):
        raise ManifestError(f"the manifest's artefact URL {url!r} must be http(s) or relative to the feed")
    size = int(field("size", int))
    if not 0 < size <= MAX_ARTEFACT_BYTES:
        raise ManifestError(f"the manifest's size {size} is outside 1..{MAX_ARTEFACT_BYTES} bytes")
    sha256 = str(field("sha256", str))
    if not _SHA256.match(sha256):
        raise ManifestError("the manifest's sha256 must be 64 lowercase hex digits")
    notes = str(field("notes", str))
    if len(notes) > MAX_NOTES_CHARS:
        raise ManifestError(f"the release notes are longer than {MAX_NOTES_CHARS} characters")
    created = str(field("created", str))
    return Manifest(
        version=version,
        filename=filename,
        url=url,
        size=size,
        sha256=sha256,
        notes=notes,
        created=created,
        name=name,
    )


def sign_manifest(manifest: Manifest, signing_key: SigningKey) -> dict:
    body = manifest.to_dict()
    validate_manifest(body)  # never sign something a node would refuse
    signature = signing_key.sign(canonical_bytes(body)).signature
    return {
        "manifest": body,
        "key_id": key_id(bytes(signing_key.verify_key)),
        "signature": base64.b64encode(signature).decode(),
    }


def verify_envelope(raw: bytes, public_key: bytes) -> Manifest:
    """Parse a feed document, check its signature against public_key, then its fields."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"the release manifest is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ManifestError("the release manifest is not valid JSON (truncated or not a manifest)") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("manifest"), dict):
        raise ManifestError("the release manifest has no 'manifest' object")
    ours = key_id(public_key)
    signature_text = doc.get("signature")
    if not isinstance(signature_text, str):
        raise SignatureError("the release manifest is not signed")
    try:
        signature = base64.b64decode(signature_text, validate=True)
        body = canonical_bytes(doc["manifest"])
    except (binascii.Error, ValueError, TypeError):
        raise SignatureError("the release manifest's signature is malformed") from None
    try:
        VerifyKey(public_key).verify(body, signature)
    except (BadSignatureError, ValueError):
        claimed = doc.get("key_id")
        if isinstance(claimed, str) and claimed != ours:
            raise SignatureError(
                f"the release manifest is signed by another key (key id {claimed[:32]}); this node trusts "
                f"only release key {ours}"
            ) from None
        raise SignatureError(
            f"the release manifest's signature does not match its contents under release key {ours} "
            "(tampered or corrupted manifest)"
        ) from None
    return validate_manifest(doc["manifest"])
