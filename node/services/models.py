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


class CloudShareRefused(PermissionError):
    """Sharing a cloud model needs force and sharing.cloud_models; the message carries the cost warning."""


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
    body = {k: v for k, v in entry.items() if k != "signature" and not k.startswith("_")}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def verify_entry(entry: dict) -> bool:
    try:
        return verify(entry["owner"], entry_bytes(entry), bytes.fromhex(entry["signature"]))
    except (KeyError, ValueError):
        return False


class ModelRegistry:
    """Local files plus the signed share entries, kept in a JSON file written atomically."""

    def __init__(self, models_dir: Path, state_file: Path, identity: Identity, *, facts=None,
                 cloud_models: dict | None = None, allow_cloud_sharing: bool = False):
        self.models_dir = models_dir
        self.state_file = state_file
        self.identity = identity
        self.facts = facts  # GgufFactsCache, optional (GGUF header facts in listings and entries)
        self.cloud_models = cloud_models or {}
        self.allow_cloud_sharing = allow_cloud_sharing
        self._lock = threading.Lock()
        self._shares: dict[str, dict] = self._load()
        self.problems: list[dict] = []  # shares withdrawn because their file changed

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
            if self.facts is not None and item["usable"]:
                facts = self.facts.peek(path)
                if facts is None:
                    try:
                        facts = self.facts.get(path)
                    except (OSError, ValueError, IndexError) as exc:
                        item["usable"], item["problem"] = False, f"unreadable GGUF header: {exc}"
                if facts:
                    item.update({k: facts.get(k) for k in ("architecture", "parameters", "quantization",
                                                            "context_length", "has_chat_template")})
            out.append(item)
        for cm in self.cloud_models.values():
            item = cm.describe()
            item["shared"] = cm.name in self._shares
            out.append(item)
        return out

    def verify_shares(self) -> list[dict]:
        """Re-hash shared files whose size or mtime changed; withdraw (and report) any that no longer match."""
        withdrawn = []
        for name, entry in list(self._shares.items()):
            if entry.get("kind") == "cloud":
                continue
            reason = None
            try:
                path = resolve_shared(self.models_dir, entry["file"])
                st = path.stat()
                if st.st_size != entry["size_bytes"]:
                    reason = f"size changed from {entry['size_bytes']} to {st.st_size} bytes"
                elif entry.get("_stamp") != st.st_mtime_ns and sha256_file(path) != entry["sha256"]:
                    reason = "SHA-256 no longer matches the signed entry"
            except (ModelPathError, ModelNotFound, OSError) as exc:
                reason = str(exc)
            if reason:
                with self._lock:
                    self._shares.pop(name, None)
                    self._save()
                problem = {"model": name, "unshared": True, "reason": reason, "at": int(time.time())}
                self.problems.append(problem)
                withdrawn.append(problem)
        return withdrawn

    def share(self, name: str, *, force: bool = False) -> dict:
        if name in self.cloud_models:
            return self._share_cloud(name, force)
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
        if self.facts is not None:
            try:
                facts = self.facts.get(path)
            except (ValueError, IndexError, OSError) as exc:  # gguf raises ValueError on a damaged header
                raise ModelPathError(f"{name!r} has an unreadable GGUF header ({exc}); not shared") from None
            entry["gguf"] = {k: facts.get(k) for k in ("architecture", "parameters", "quantization",
                                                       "context_length")}
        entry["signature"] = self.identity.sign(entry_bytes(entry)).hex()
        with self._lock:
            self._shares[model] = {**entry, "_stamp": st.st_mtime_ns}
            self._save()
        return entry

    def _share_cloud(self, name: str, force: bool) -> dict:
        from pinkybrain.node.services.cloud import COST_WARNING

        cm = self.cloud_models[name]
        if not force:
            raise CloudShareRefused(
                f"{name!r} is a cloud model: it is never shared without an explicit force (--force / force=true); "
                + COST_WARNING.format(provider=cm.provider))
        if not self.allow_cloud_sharing:
            raise CloudShareRefused(
                f"{name!r} is a cloud model and sharing.cloud_models is false in this node's config; set it to "
                "true and pass --force to share it. " + COST_WARNING.format(provider=cm.provider))
        entry = {"name": name, "kind": "cloud", "provider": cm.provider, "owner": self.identity.node_id,
                 "signed_at": int(time.time())}
        entry["signature"] = self.identity.sign(entry_bytes(entry)).hex()
        with self._lock:
            self._shares[name] = entry
            self._save()
        return {**entry, "cost_warning": COST_WARNING.format(provider=cm.provider)}

    def unshare(self, name: str) -> dict:
        model = name[: -len(".gguf")] if name.endswith(".gguf") else name
        with self._lock:
            entry = self._shares.pop(model, None)
            if entry is None:
                raise ModelNotFound(f"model {model!r} is not shared")
            self._save()
        return entry

    def shared_entries(self) -> list[dict]:
        """The signed entries as peers see them (local bookkeeping fields removed)."""
        return [{k: v for k, v in e.items() if not k.startswith("_")} for e in self._shares.values()]
