"""The credentials only this node's owner holds, on this machine, in PINKYBRAIN_HOME:

  owner.key      the owner key: 32 random bytes (hex), bound to the node id, mode 0600. Created at
                 `identity init` and by the node at start if missing; never sent over the network (it
                 only keys HMAC signatures), never derived from the network secret. The skill on the same
                 machine reads it (skill/localconfig.py); `pinkybrain owner-key export` copies it to
                 another machine on purpose.
  api-keys.json  the /v1 API keys the owner issued: name, scope, SHA-256 of the key (the key itself is
                 shown once, at creation), mode 0600, rewritten atomically.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("pinkybrain.credentials")
OWNER_KEY_FILE = "owner.key"
API_KEYS_FILE = "api-keys.json"
OWNER_KEY_FORMAT = "pinkybrain-owner-key-v1"
API_KEY_PREFIX = "pbk-"
KEY_SCOPES = ("owner", "query")
_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class CredentialError(Exception):
    """A credential file or request is unusable; str() says which and why."""


def write_private(path: Path, data: bytes) -> None:
    """Create-then-rename with mode 0600: a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# -- owner key --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OwnerKey:
    node_id: str
    key: str  # 64 hex digits; the HMAC key is its text

    def to_json(self) -> bytes:
        return (json.dumps({"format": OWNER_KEY_FORMAT, "node_id": self.node_id, "key": self.key}) + "\n").encode()


def load_owner_key(home: Path) -> OwnerKey | None:
    path = Path(home) / OWNER_KEY_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CredentialError(f"{path} is unreadable ({exc}); remove it and restart the node for a new one") from None
    if (not isinstance(data, dict) or data.get("format") != OWNER_KEY_FORMAT
            or not isinstance(data.get("key"), str) or not _HEX64.match(data["key"])
            or not isinstance(data.get("node_id"), str)):
        raise CredentialError(f"{path} is not an owner key file; remove it and restart the node for a new one")
    return OwnerKey(data["node_id"], data["key"])


def ensure_owner_key(home: Path, node_id: str, *, replace: bool = False) -> OwnerKey:
    """This node's owner key, created if missing or if it belongs to another identity (the node id changed)."""
    path = Path(home) / OWNER_KEY_FILE
    current = None if replace else load_owner_key(home)
    if current is not None and current.node_id == node_id:
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)  # it is the node's full control: nobody else on the machine reads it
        return current
    if current is not None:
        log.warning("owner key in %s was for node %s: a new one is created for %s", path, current.node_id, node_id)
    fresh = OwnerKey(node_id, secrets.token_hex(32))
    write_private(path, fresh.to_json())
    return fresh


# -- /v1 API keys -----------------------------------------------------------------------------------
def _digest(key: str) -> str:
    # The key is 256 random bits: a plain hash cannot be brute-forced, so no slow KDF is needed.
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeyStore:
    """Named /v1 keys, stored as hashes; lookups are one dict access by hash."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._keys: dict[str, dict] = self._load()
        self._by_digest = {entry["sha256"]: name for name, entry in self._keys.items()}

    @classmethod
    def open(cls, home: Path) -> ApiKeyStore:
        return cls(Path(home) / API_KEYS_FILE)

    def _load(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise CredentialError(f"{self.path} is unreadable ({exc}); move it aside (the keys in it stop "
                                  "working) and restart") from None
        keys = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(keys, dict) or not all(
                isinstance(e, dict) and _HEX64.match(str(e.get("sha256", ""))) and e.get("scope") in KEY_SCOPES
                for e in keys.values()):
            raise CredentialError(f"{self.path} is not an API key file; move it aside and restart")
        return keys

    def _save(self) -> None:
        write_private(self.path, json.dumps({"keys": self._keys}, indent=2, sort_keys=True).encode())

    @staticmethod
    def check_name(name: str) -> str:
        if not isinstance(name, str) or not _KEY_NAME.match(name):
            raise CredentialError("a key name is 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                                  "or digit")
        return name

    def create(self, name: str, scope: str, *, replace: bool = False) -> str:
        """A new key, returned once (only its hash is kept)."""
        self.check_name(name)
        if scope not in KEY_SCOPES:
            raise CredentialError(f"scope must be one of {', '.join(KEY_SCOPES)}, got {scope!r}")
        key = API_KEY_PREFIX + secrets.token_urlsafe(32)
        with self._lock:
            if name in self._keys and not replace:
                raise FileExistsError(f"a key named {name!r} exists; revoke it first (`pinkybrain keys revoke "
                                      f"{name}`)")
            old = self._keys.get(name)
            self._keys[name] = {"sha256": _digest(key), "scope": scope, "created_at": int(time.time())}
            self._save()
            if old is not None:
                self._by_digest.pop(old["sha256"], None)
            self._by_digest[self._keys[name]["sha256"]] = name
        return key

    def revoke(self, name: str) -> dict:
        with self._lock:
            entry = self._keys.pop(name, None)
            if entry is None:
                raise KeyError(f"no API key named {name!r}")
            self._save()
            self._by_digest.pop(entry["sha256"], None)
        return {"name": name, "scope": entry["scope"], "created_at": entry["created_at"]}

    def list(self) -> list[dict]:
        return [{"name": n, "scope": e["scope"], "created_at": e["created_at"]} for n, e in sorted(self._keys.items())]

    def lookup(self, presented: str) -> tuple[str, str] | None:
        """(name, scope) of the key presented, or None."""
        if not presented.startswith(API_KEY_PREFIX) or len(presented) > 200:
            return None
        digest = _digest(presented)
        name = self._by_digest.get(digest)
        if name is None:
            return None
        entry = self._keys.get(name)
        # The dict lookup found it by hash; compare in constant time anyway, as a guard against our own bugs.
        if entry is None or not hmac.compare_digest(entry["sha256"], digest):
            return None
        return name, entry["scope"]
