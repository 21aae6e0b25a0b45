"""Local GGUF models in shared_models/ and which of them this node shares.

The mesh may read nothing outside shared_models/: every name is resolved through `resolve_shared`,
which refuses path tricks (.., absolute paths, symlinks or hard links leading out, non-GGUF files).
A share is a catalog entry signed with the node's Ed25519 key, so anyone can verify entry and file.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
import time
from pathlib import Path

from pinkybrain.node.core.identity import Identity, verify

GGUF_MAGIC = b"GGUF"


class ModelPathError(ValueError):
    """A model name that does not lead to a GGUF file inside shared_models/."""


class ModelNotFound(LookupError):
    pass


def resolve_shared(models_dir: Path, name: str) -> Path:
    """Map a model name to a regular GGUF file strictly inside models_dir, or raise ModelPathError."""
    root = models_dir.resolve()
    if not name or "\x00" in name:
        raise ModelPathError("a model name must not be empty")
    if os.path.isabs(name) or name.startswith("~"):
        raise ModelPathError(f"{name!r}: absolute paths are refused; name a file inside {root}")
    parts = Path(name).parts
    if ".." in parts or "/" in name or "\\" in name:
        raise ModelPathError(f"{name!r}: only plain file names inside {root} are allowed")
    file_name = name if name.endswith(".gguf") else f"{name}.gguf"
    candidate = root / file_name
    try:
        st = candidate.lstat()
    except FileNotFoundError:
        raise ModelNotFound(f"no model {name!r} in {root}") from None
    if stat.S_ISLNK(st.st_mode):
        target = candidate.resolve()
        if root not in target.parents:
            raise ModelPathError(f"{name!r} is a symlink leading outside {root}; refused")
        st = target.stat()
        candidate = target
    if not stat.S_ISREG(st.st_mode):
        raise ModelPathError(f"{name!r} is not a regular file")
    if st.st_nlink > 1:
        # A hard link may be another name for a file anywhere on the disk: refuse rather than guess.
        raise ModelPathError(f"{name!r} has {st.st_nlink} hard links; copy the file into {root} instead")
    with candidate.open("rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise ModelPathError(f"{name!r} is not a GGUF file (bad magic bytes)")
    return candidate


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def entry_bytes(entry: dict) -> bytes:
    body = {k: v for k, v in entry.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def verify_entry(entry: dict) -> bool:
    try:
        return verify(entry["owner"], entry_bytes(entry), bytes.fromhex(entry["signature"]))
    except (KeyError, ValueError):
        return False


class ModelRegistry:
    """Local files plus the signed share entries, kept in a JSON file written atomically."""

    def __init__(self, models_dir: Path, state_file: Path, identity: Identity):
        self.models_dir = models_dir
        self.state_file = state_file
        self.identity = identity
        self._lock = threading.Lock()
        self._shares: dict[str, dict] = self._load()

    def _load(self) -> dict[str, dict]:
        try:
            data = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise RuntimeError(
                f"{self.state_file} is unreadable ({exc}); move it aside to reset shares"
            ) from None
        return {name: e for name, e in data.get("shared", {}).items() if verify_entry(e)}

    def _save(self) -> None:
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        tmp.write_text(json.dumps({"shared": self._shares}, indent=2, sort_keys=True))
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.state_file)

    def local_files(self) -> list[Path]:
        if not self.models_dir.is_dir():
            return []
        return sorted(p for p in self.models_dir.iterdir() if p.name.endswith(".gguf"))

    def list(self) -> list[dict]:
        out = []
        for path in self.local_files():
            name = path.name[: -len(".gguf")]
            item = {"name": name, "kind": "local", "file": path.name, "shared": name in self._shares}
            try:
                resolved = resolve_shared(self.models_dir, path.name)
                item["size_bytes"] = resolved.stat().st_size
                item["usable"] = True
            except (ModelPathError, ModelNotFound, OSError) as exc:
                item["usable"], item["problem"] = False, str(exc)
            if name in self._shares:
                item["sha256"] = self._shares[name]["sha256"]
            out.append(item)
        return out

    def share(self, name: str) -> dict:
        path = resolve_shared(self.models_dir, name)
        model = path.name[: -len(".gguf")]
        st = path.stat()
        entry = {
            "name": model,
            "file": path.name,
            "size_bytes": st.st_size,
            "sha256": sha256_file(path),
            "owner": self.identity.node_id,
            "signed_at": int(time.time()),
        }
        entry["signature"] = self.identity.sign(entry_bytes(entry)).hex()
        with self._lock:
            self._shares[model] = entry
            self._save()
        return entry

    def unshare(self, name: str) -> dict:
        model = name[: -len(".gguf")] if name.endswith(".gguf") else name
        with self._lock:
            entry = self._shares.pop(model, None)
            if entry is None:
                raise ModelNotFound(f"model {model!r} is not shared")
            self._save()
        return entry

    def shared_entries(self) -> list[dict]:
        return list(self._shares.values())
