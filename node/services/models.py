"""Local GGUF models in shared_models/ and which of them this node shares.

The mesh may read nothing outside shared_models/: every name is resolved through `resolve_shared`,
which refuses path tricks (.., absolute paths, symlinks or hard links leading out, non-GGUF files).
Every read opens the file through `open_model` (never following a link, never waiting on a FIFO or a
device: O_NOFOLLOW | O_NONBLOCK) and checks the inode it got with fstat, so a file swapped between the
check and the read is refused too.

A share is a catalog entry signed with the node's Ed25519 key, so anyone can verify entry and file. The
entry remembers the file's stamp (size, mtime, inode, ctime); before a shared file is served again the
stamp is compared, and a changed stamp means a re-hash: a changed hash withdraws the share (log line and
an entry in `problems`), an unchanged one keeps it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import threading
import time
from pathlib import Path
from typing import BinaryIO

from pinkybrain.node.core.identity import Identity, verify

GGUF_MAGIC = b"GGUF"
# Open without following a final symlink and without waiting: a FIFO or device never blocks a read.
OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
log = logging.getLogger("pinkybrain.models")


class ModelPathError(ValueError):
    """A model name that does not lead to a GGUF file inside shared_models/."""


class ModelNotFound(LookupError):
    pass


class ShareChanged(ModelNotFound):
    """A shared file changed on disk since it was shared: not served until its hash is checked again."""


class CloudShareRefused(PermissionError):
    """Sharing a cloud model needs force and sharing.cloud_models; the message carries the cost warning."""


def resolve_shared(models_dir: Path, name: str) -> Path:
    """Map a model name to a regular GGUF file strictly inside models_dir, or raise ModelPathError."""
    path = _confined_path(models_dir, name)
    with open_model(path, name) as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise ModelPathError(f"{name!r} is not a GGUF file (bad magic bytes)")
    return path


def _confined_path(models_dir: Path, name: str) -> Path:
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
    except OSError as exc:  # a name too long for the file system, say
        raise ModelPathError(f"{name!r} cannot be looked up ({exc.strerror})") from None
    if stat.S_ISLNK(st.st_mode):
        target = candidate.resolve()
        if root not in target.parents:
            raise ModelPathError(f"{name!r} is a symlink leading outside {root}; refused")
        try:
            st = target.lstat()
        except OSError:
            raise ModelNotFound(f"{name!r} is a symlink to nothing") from None
        candidate = target
    _check_plain(st, name, root)
    return candidate


def _check_plain(st: os.stat_result, name: str, root: Path | None = None) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise ModelPathError(f"{name!r} is not a regular file")
    if st.st_nlink > 1:
        # A hard link may be another name for a file anywhere on the disk: refuse rather than guess.
        where = f" into {root}" if root else ""
        raise ModelPathError(f"{name!r} has {st.st_nlink} hard links; copy the file{where} instead")


def open_model(path: Path, name: str | None = None) -> BinaryIO:
    """Open a confined path for reading without following a link or blocking on a FIFO, and check the inode
    actually opened (regular file, one link). The caller closes it."""
    name = name or path.name
    try:
        fd = os.open(path, OPEN_FLAGS)
    except FileNotFoundError:
        raise ModelNotFound(f"no model file {name!r}") from None
    except OSError as exc:  # ELOOP: replaced by a symlink since it was checked; ENXIO: a device or socket
        raise ModelPathError(f"{name!r} cannot be opened as a plain file ({exc.strerror})") from None
    fh = os.fdopen(fd, "rb")
    try:
        _check_plain(os.fstat(fd), name)
    except BaseException:
        fh.close()
        raise
    return fh


def file_stamp(st: os.stat_result) -> list[int]:
    """What changes when a file's content may have: size, mtime, inode (replaced) and ctime (written or
    touched back, since ctime cannot be set)."""
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def sha256_file(path: Path) -> str:
    return _hash_open(path)[0]


def _hash_open(path: Path) -> tuple[str, list[int]]:
    """SHA-256 of the file and the stamp of the very inode hashed (unchanged while it was read)."""
    h = hashlib.sha256()
    with open_model(path) as fh:
        before = file_stamp(os.fstat(fh.fileno()))
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
        after = file_stamp(os.fstat(fh.fileno()))
    if before != after:
        raise ModelPathError(f"{path.name!r} changed while it was being hashed; try again")
    return h.hexdigest(), after


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
        self._rechecking: set[str] = set()

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
            resolved = None
            try:
                resolved = resolve_shared(self.models_dir, path.name)
                item["size_bytes"] = resolved.stat().st_size
                item["usable"] = True
            except (ModelPathError, ModelNotFound, OSError) as exc:
                item["usable"], item["problem"] = False, str(exc)
            if name in self._shares:
                item["sha256"] = self._shares[name]["sha256"]
            if self.facts is not None and resolved is not None:
                facts = self.facts.peek(resolved)
                if facts is None:
                    try:  # a file that failed to parse is remembered until it changes: no re-parse here
                        facts = self.facts.get(resolved)
                    except (ModelPathError, ModelNotFound, OSError, ValueError, IndexError) as exc:
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
        """Re-hash shared files whose stamp changed; withdraw (and report) any that no longer match."""
        withdrawn = []
        for name, entry in list(self._shares.items()):
            if entry.get("kind") == "cloud":
                continue
            problem = self.recheck(name)
            if problem is not None:
                withdrawn.append(problem)
        return withdrawn

    def served_path(self, name: str) -> Path:
        """The file of a shared local model, if it is still the file that was shared; cheap (one open and
        fstat) unless the stamp changed. A changed stamp is re-hashed in the background and the model is
        not served meanwhile (ShareChanged); a share found gone or different is withdrawn."""
        entry = self._shares.get(name)
        if entry is None or entry.get("kind") == "cloud":
            raise ModelNotFound(f"model {name!r} is not shared as a local file")
        try:
            path = _confined_path(self.models_dir, entry["file"])
            with open_model(path, entry["file"]) as fh:
                stamp = file_stamp(os.fstat(fh.fileno()))
        except (ModelPathError, ModelNotFound, OSError, KeyError) as exc:
            self._withdraw(name, f"its file is no longer usable: {exc}")
            raise ModelNotFound(f"the shared model {name!r} is no longer available here") from None
        if stamp == entry.get("_stamp"):
            return path
        self._recheck_in_background(name)
        raise ShareChanged(f"the shared model {name!r} changed on disk since it was shared; it is not served "
                           "until its SHA-256 is checked again")

    def recheck(self, name: str) -> dict | None:
        """Hash a shared file again if its stamp changed: keep the share (new stamp) when the hash matches,
        withdraw it otherwise. Returns the problem entry when withdrawn."""
        entry = self._shares.get(name)
        if entry is None or entry.get("kind") == "cloud":
            return None
        try:
            path = _confined_path(self.models_dir, entry["file"])
            with open_model(path, entry["file"]) as fh:
                stamp = file_stamp(os.fstat(fh.fileno()))
            if stamp == entry.get("_stamp"):
                return None
            if stamp[0] != entry["size_bytes"]:
                return self._withdraw(name, f"size changed from {entry['size_bytes']} to {stamp[0]} bytes")
            digest, stamp = _hash_open(path)
        except (ModelPathError, ModelNotFound, OSError, KeyError) as exc:
            return self._withdraw(name, str(exc))
        if digest != entry["sha256"]:
            return self._withdraw(name, "SHA-256 no longer matches the signed entry")
        with self._lock:
            if self._shares.get(name) is entry:
                entry["_stamp"] = stamp  # same content (touched, copied back): keep sharing
                self._save()
        return None

    def _recheck_in_background(self, name: str) -> None:
        with self._lock:
            if name in self._rechecking:
                return
            self._rechecking.add(name)

        def run() -> None:
            try:
                self.recheck(name)
            except Exception:  # a thread must not die silently: say so, the share stays unserved
                log.exception("re-checking shared model %s failed", name)
            finally:
                with self._lock:
                    self._rechecking.discard(name)

        threading.Thread(target=run, name=f"recheck-{name[:24]}", daemon=True).start()

    def _withdraw(self, name: str, reason: str) -> dict | None:
        with self._lock:
            if name not in self._shares:
                return None
            problem = {"model": name, "unshared": True, "reason": reason, "at": int(time.time())}
            self.problems.append(problem)  # first: whoever sees the share gone finds the reason
            del self.problems[:-100]  # bounded: the latest hundred
            del self._shares[name]
            self._save()
        log.warning("unshared model %s: %s", name, reason)
        return problem

    def share(self, name: str, *, force: bool = False) -> dict:
        if name in self.cloud_models:
            return self._share_cloud(name, force)
        path = resolve_shared(self.models_dir, name)
        model = path.name[: -len(".gguf")]
        digest, stamp = _hash_open(path)
        entry = {
            "name": model,
            "file": path.name,
            "size_bytes": stamp[0],
            "sha256": digest,
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
            self._shares[model] = {**entry, "_stamp": stamp}
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

    def shared_count(self) -> int:
        return len(self._shares)

    def shared_entries(self) -> list[dict]:
        """The signed entries as peers see them (local bookkeeping fields removed)."""
        return [{k: v for k, v in e.items() if not k.startswith("_")} for e in self._shares.values()]
