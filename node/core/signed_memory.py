"""Signed public-memory entries: every value written to the public mesh's memory carries its writer's
node id and Ed25519 signature over (key, value, writer, time), so any reader can tell who wrote it and
ignore what a writer it does not find valid wrote. Pure logic: no I/O, time is passed in.

Stored value:  {"pb_signed": 1, "writer": ID, "at": UNIX, "value": V, "sig": HEX}
Signed bytes:  DOMAIN | canonical JSON of {"key", "value", "writer", "at"}

The key is signed too, so an entry cannot be moved to another key; the domain prefix keeps these
signatures apart from attestations, receipts and catalog entries.
"""

from __future__ import annotations

import json
from typing import Any

from pinkybrain.node.core.identity import Identity, IdentityError, require_signature, validate_node_id

DOMAIN = b"PINKYBRAIN-PUBLIC-MEMORY-V1\n"
MARK = "pb_signed"


class UnsignedEntry(ValueError):
    """A stored public-memory value that is not a well-formed, truly signed entry; str() says why."""


def _signed_bytes(key: str, value: Any, writer: str, at: int) -> bytes:
    body = {"key": key, "value": value, "writer": writer, "at": at}
    return DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign_entry(identity: Identity, key: str, value: Any, *, now: float) -> dict[str, Any]:
    at = int(now)
    sig = identity.sign(_signed_bytes(key, value, identity.node_id, at))
    return {MARK: 1, "writer": identity.node_id, "at": at, "value": value, "sig": sig.hex()}


def open_entry(key: str, stored: Any) -> tuple[str, Any]:
    """(writer, value) of a signed entry stored under `key`; raises UnsignedEntry otherwise."""
    if not isinstance(stored, dict) or stored.get(MARK) != 1 or set(stored) != {MARK, "writer", "at", "value", "sig"}:
        raise UnsignedEntry("not a signed entry")
    writer, at = stored["writer"], stored["at"]
    try:
        if not isinstance(writer, str) or validate_node_id(writer) != writer:
            raise UnsignedEntry("the writer is not a node id in canonical form")
    except IdentityError as exc:
        raise UnsignedEntry(f"writer: {exc}") from None
    if not isinstance(at, int) or isinstance(at, bool):
        raise UnsignedEntry("at must be an integer (unix seconds)")
    try:
        sig = bytes.fromhex(stored["sig"])
    except (TypeError, ValueError):
        raise UnsignedEntry("sig must be hex") from None
    require_signature(writer, _signed_bytes(key, stored["value"], writer, at), sig, UnsignedEntry, "signature",
                      f"writer {writer}")
    return writer, stored["value"]
