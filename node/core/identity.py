"""Ed25519 node identity and its printable node id.

The node id carries the whole public key (so a peer can verify signatures from the id alone, as
libp2p peer ids do for Ed25519) in Syncthing's device-id layout: base32, four 13-character chunks
each followed by a Luhn mod-32 check character, shown as eight dash-separated groups of seven.
A single mistyped character or a swap of neighbours is caught by the check characters.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_KEY_FILE_HEADER = b"PINKYBRAIN-ED25519-SEED-V1\n"


class IdentityError(Exception):
    """A key file or node id that cannot be used; the message says why."""


def _luhn32(chunk: str) -> str:
    factor, total, n = 1, 0, len(_ALPHABET)
    for ch in reversed(chunk):
        addend = factor * _ALPHABET.index(ch)
        factor = 1 if factor == 2 else 2
        total += addend // n + addend % n
    return _ALPHABET[(n - total % n) % n]


def node_id_from_public_key(public_key: bytes) -> str:
    if len(public_key) != 32:
        raise IdentityError("an Ed25519 public key is 32 bytes")
    raw = base64.b32encode(public_key).decode().rstrip("=")  # 52 characters
    chunks = [raw[i : i + 13] for i in range(0, 52, 13)]
    checked = "".join(c + _luhn32(c) for c in chunks)  # 56 characters
    return "-".join(checked[i : i + 7] for i in range(0, 56, 7))


def public_key_from_node_id(node_id: str) -> bytes:
    """Parse a node id (dashes and case optional); raise IdentityError naming the fault."""
    text = node_id.strip().upper().replace("-", "").replace(" ", "")
    if len(text) != 56 or any(ch not in _ALPHABET for ch in text):
        raise IdentityError(f"not a node id: {node_id!r} (expected 56 base32 characters in 8 groups of 7)")
    raw = ""
    for i in range(4):
        chunk, check = text[i * 14 : i * 14 + 13], text[i * 14 + 13]
        if _luhn32(chunk) != check:
            raise IdentityError(
                f"node id {node_id!r} fails its checksum in group {i * 2 + 1}-{i * 2 + 2}: typo?"
            )
        raw += chunk
    return base64.b32decode(raw + "====")


def validate_node_id(node_id: str) -> str:
    """Return the canonical spelling of a node id, or raise IdentityError."""
    return node_id_from_public_key(public_key_from_node_id(node_id))


@dataclass(frozen=True)
class Identity:
    signing_key: SigningKey

    # Computed once: the key never changes, and the node id is read on every answer (proof, status).
    @cached_property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @cached_property
    def node_id(self) -> str:
        return node_id_from_public_key(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self.signing_key.sign(message).signature

    @staticmethod
    def generate() -> Identity:
        return Identity(SigningKey.generate())


def verify(node_id: str, message: bytes, signature: bytes) -> bool:
    try:
        VerifyKey(public_key_from_node_id(node_id)).verify(message, signature)
        return True
    except (BadSignatureError, IdentityError, ValueError):
        return False


def require_signature(signer: str, message: bytes, signature, error: type[Exception], label: str,
                      whose: str | None = None) -> None:
    """Raise `error` unless `signature` is a 64-byte Ed25519 signature by `signer` over `message`
    (for the signed statements of the trust and credit layers, which report faults in their own terms)."""
    if not isinstance(signature, bytes) or len(signature) != 64:
        raise error(f"{label} must be 64 bytes")
    if not verify(signer, message, signature):
        raise error(f"{label} does not verify against {whose or signer}")


def save_identity(identity: Identity, path: Path, *, force: bool = False) -> None:
    """Write the key with mode 0600, atomically; never overwrite an existing key unless forced."""
    path = Path(path).expanduser()
    if path.exists() and not force:
        raise IdentityError(f"{path} already holds an identity key; pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = _KEY_FILE_HEADER + base64.b64encode(bytes(identity.signing_key)) + b"\n"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if force:
            os.replace(tmp, path)
        else:
            # link() fails if another process created the key meanwhile: no silent overwrite.
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise IdentityError(
                    f"{path} already holds an identity key; pass --force to replace it"
                ) from None
            os.unlink(tmp)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_identity(path: Path) -> Identity:
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise IdentityError(f"no identity key at {path}; run `pinkybrain identity init`") from None
    except PermissionError:
        raise IdentityError(f"cannot read identity key {path}: permission denied") from None
    if not data.startswith(_KEY_FILE_HEADER):
        raise IdentityError(f"{path} is not a PinkyBrain identity key")
    try:
        seed = base64.b64decode(data[len(_KEY_FILE_HEADER) :].strip(), validate=True)
    except ValueError:
        raise IdentityError(f"{path} is damaged (bad base64)") from None
    if len(seed) != 32:
        raise IdentityError(f"{path} is damaged (seed is {len(seed)} bytes, expected 32)")
    mode = path.stat().st_mode & 0o077
    if mode:
        raise IdentityError(
            f"{path} is readable by other users (mode {oct(path.stat().st_mode & 0o777)}); run chmod 600 {path}"
        )
    return Identity(SigningKey(seed))
