"""Self-update: check the signed feed, download and verify a release, install it, restart, roll back.

The node itself only checks and verifies: it fetches the manifest, checks its Ed25519 signature against
the pinned release key, refuses downgrades unless allowed, downloads the wheel (size cap, SHA-256) and
snapshots the running version as a wheel for rollback, all before anything is changed. Then it starts a
detached worker (`python -m pinkybrain.node.services.updater apply-worker PLAN`) that outlives the node:
daemon mode: stop the node, pip install the new wheel, start the node the way `serve --daemon` does, wait
for a signed ping that reports the new version, and on any failure stop it, reinstall the snapshot and
start the old version again. systemd mode: the worker lives in the unit's cgroup and dies with a restart,
so it installs, test-runs the new code on a scratch home and loopback port, reinstalls the snapshot if
that fails, and otherwise asks systemd to restart the unit. Every step lands in
$PINKYBRAIN_HOME/update-status.json, which GET /api/update reports.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import email.parser
import errno
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import yaml
from packaging.utils import canonicalize_name
from packaging.version import Version

from pinkybrain.node.core.auth import NONCE_HEADER, SIG_HEADER, TS_HEADER, sign
from pinkybrain.node.core.config import Config, load_config
from pinkybrain.node.core.release import (
    MAX_MANIFEST_BYTES,
    PACKAGE,
    RESTART_EXIT_CODE,
    RESTART_SIGNAL,
    Manifest,
    ManifestError,
    ReleaseError,
    SignatureError,
    compare_versions,
    key_id,
    parse_public_key,
    parse_version,
    pinned_public_key,
    verify_envelope,
    wheel_filename,
)
from pinkybrain.node.services.daemon import DaemonError, start_daemon
from pinkybrain.node.services.process import running_pid
from pinkybrain.node.services.releases import ReleaseTree, ReleaseTreeError, running_base_site

log = logging.getLogger("pinkybrain.node.update")

STATUS_FILE = "update-status.json"
UPDATES_DIR = "updates"
RESTARTABLE_MODES = ("daemon", "systemd")
NODE_STOP_SECS = 45.0  # the node's graceful shutdown allows 20 s for in-flight requests, then closes stores
PIP_TIMEOUT_SECS = 600.0
# httpx.Timeout(read, connect=...): per read, not overall: a stalled transfer fails, a slow one does not.
# httpx itself is imported where a request is made: the node imports this module at start (for
# confirm_running and the update routes) and httpx would cost it ~17 MiB and a few hundred ms.
FEED_TIMEOUT = (15.0, 10.0)
DOWNLOAD_TIMEOUT = (30.0, 10.0)
CHUNK = 64 * 1024


class UpdateError(RuntimeError):
    """A refusal or failure to report over HTTP: status code, short code, one-line detail."""

    def __init__(self, status: int, code: str, detail: str):
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


class WorkerFailure(RuntimeError):
    """A step of the worker failed; str() is the reason recorded in the status file."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def updates_dir(home: Path) -> Path:
    path = home / UPDATES_DIR
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


# -- status file and lock --------------------------------------------------------------------------
class UpdateStatus:
    """The last update attempt, rewritten atomically at each step so readers never see half a file."""

    def __init__(self, home: Path, data: dict | None = None):
        self.path = home / STATUS_FILE
        self.data: dict = data or {}
        self._last_progress = 0.0

    @classmethod
    def load(cls, home: Path) -> UpdateStatus:
        return cls(home, read_status(home) or {})

    def begin(self, **fields: Any) -> None:
        self.data = {
            "id": secrets.token_hex(6),
            "state": "checking",
            "final": False,
            "started_at": _now(),
            "finished_at": None,
            "reason": None,
            "progress": None,
            **fields,
        }
        self._write()

    def update(self, **fields: Any) -> None:
        self.data.update(fields, updated_at=_now())
        self._write()

    def finish(self, state: str, reason: str | None = None, **fields: Any) -> None:
        self.update(state=state, final=True, reason=reason, finished_at=_now(), **fields)

    def progress(self, done: int, total: int) -> None:
        # Throttled: a fast local download would otherwise rewrite the file for every chunk.
        now = time.monotonic()
        if done >= total or now - self._last_progress >= 0.2:
            self._last_progress = now
            self.update(progress={"done": done, "total": total})

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(self.data, fh, indent=2)
        os.replace(tmp, self.path)


def read_status(home: Path) -> dict | None:
    try:
        data = json.loads((home / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def acquire_lock(home: Path) -> int:
    """An flock held from verification until the worker exits (the worker inherits the descriptor), so a
    second apply is refused however the first one ends, even when its worker is killed."""
    fd = os.open(updates_dir(home) / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise UpdateError(
                409, "update_in_progress", "an update of this node is already in progress"
            ) from None
        raise
    return fd


def update_running(home: Path) -> bool:
    path = home / UPDATES_DIR / ".lock"
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def last_attempt(home: Path, running_version: str) -> dict | None:
    """The status file, with the outcomes only a later reader can see filled in."""
    status = UpdateStatus.load(home)
    data = status.data
    if not data or data.get("final"):
        return data or None
    if data.get("state") == "restarting":
        # systemd restarted the unit and killed the worker: the running version tells how it went.
        if data.get("to") and Version(running_version) == Version(data["to"]):
            status.finish("succeeded")
        elif time.time() > data.get("deadline", 0):
            status.finish(
                "failed", f"after the restart the node runs {running_version}, not {data.get('to')}"
            )
    elif not update_running(home):
        status = UpdateStatus.load(home)  # re-read: the worker may have finished since the first read
        if status.data and not status.data.get("final"):
            status.finish("failed", "the update worker stopped before finishing (see updates/update.log)")
    return status.data or None


# -- feed ------------------------------------------------------------------------------------------
def release_public_key(cfg: Config) -> bytes:
    override = cfg["update.public_key"]
    try:
        return parse_public_key(override) if override else pinned_public_key()
    except ReleaseError as exc:
        where = "update.public_key" if override else "the pinned release key"
        raise UpdateError(500, "bad_release_key", f"{where}: {exc}") from None


def _check_http_url(url: str, what: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UpdateError(409, "bad_url", f"{what} {url!r} is not an http(s) URL")


def fetch_manifest(cfg: Config) -> tuple[Manifest, str]:
    """The verified manifest of the configured feed and the absolute URL of its artefact."""
    url = cfg["update.url"]
    if not url:
        raise UpdateError(409, "no_feed", "no update feed is configured for this node (set update.url)")
    _check_http_url(url, "update.url")
    public_key = release_public_key(cfg)
    import httpx

    try:
        with (
            httpx.Client(timeout=httpx.Timeout(FEED_TIMEOUT[0], connect=FEED_TIMEOUT[1]),
                         follow_redirects=True) as client,
            client.stream("GET", url) as r,
        ):
            if r.status_code != 200:
                raise UpdateError(
                    502, "feed_unreachable", f"the update feed {url} answered HTTP {r.status_code}"
                )
            raw = bytearray()
            for chunk in r.iter_bytes():
                raw += chunk
                if len(raw) > MAX_MANIFEST_BYTES:
                    break
    except httpx.HTTPError as exc:
        raise UpdateError(
            502, "feed_unreachable", f"cannot fetch the update feed {url}: {_http_reason(exc)}"
        ) from None
    try:
        manifest = verify_envelope(bytes(raw), public_key)
    except SignatureError as exc:
        raise UpdateError(502, "bad_signature", f"update feed {url}: {exc}") from None
    except ManifestError as exc:
        raise UpdateError(502, "bad_manifest", f"update feed {url}: {exc}") from None
    artefact = urljoin(url, manifest.url)
    _check_http_url(artefact, "the artefact URL")
    return manifest, artefact


def _http_reason(exc) -> str:
    import httpx

    text = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({text})"
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"the connection dropped ({text})"
    return text


def check(cfg: Config, current: str, *, home: Path, fetch: bool = True) -> dict:
    """GET /api/update: what runs, what the feed offers, and how the last attempt went."""
    running = update_running(home)
    attempt = last_attempt(home, current)
    result: dict[str, Any] = {
        "current": current,
        "latest": None,
        "update_available": False,
        "downgrade": False,
        "notes": None,
        "feed": cfg["update.url"],
        "verified": False,
        "in_progress": running,
        "progress": (attempt or {}).get("progress") if running else None,
        "last_attempt": attempt,
    }
    if not cfg["update.url"]:
        result["detail"] = "no update feed is configured for this node (set update.url)"
        return result
    if not fetch:
        return result
    manifest, artefact = fetch_manifest(cfg)
    order = compare_versions(current, manifest.version)
    result.update(
        latest=manifest.version,
        update_available=order > 0,
        downgrade=order < 0,
        notes=manifest.notes,
        verified=True,
        key_id=key_id(release_public_key(cfg)),
        artefact={
            "url": artefact,
            "size": manifest.size,
            "sha256": manifest.sha256,
            "created": manifest.created,
        },
    )
    if order == 0:
        result["detail"] = "this node runs the latest release"
    elif order < 0:
        result["detail"] = (
            f"the feed offers {manifest.version}, older than the running {current} "
            "(`pinkybrain update apply --allow-downgrade` installs it)"
        )
    return result


# -- the installed distribution --------------------------------------------------------------------
def installed_distribution(need_writable: bool = True) -> importlib.metadata.Distribution:
    """The installed pinkybrain the node runs from, if it can be replaced by pip (or, with need_writable
    False, a release venv can be made beside it); else a clear refusal."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise UpdateError(
            409,
            "source_checkout",
            "this node runs from a source tree that was never installed; update with git",
        ) from None
    try:
        direct = json.loads(dist.read_text("direct_url.json") or "{}")
    except ValueError:
        direct = {}
    if isinstance(direct, dict) and (direct.get("dir_info") or {}).get("editable"):
        where = direct.get("url", "").removeprefix("file://") or "a source folder"
        raise UpdateError(
            409, "source_checkout", f"this node runs from a source checkout ({where}); update with git"
        )
    import pinkybrain

    root = Path(dist.locate_file("")).resolve()
    if dist.read_text("RECORD") is None:  # e.g. the pinkybrain.egg-info a build leaves in a checkout
        raise UpdateError(
            409,
            "source_checkout",
            f"this node runs from a source tree ({root}, no pip RECORD); update with git",
        )
    code = Path(pinkybrain.__file__).resolve()
    if root not in code.parents:
        raise UpdateError(
            409,
            "source_checkout",
            f"this node runs code from {code.parent}, not from the installed {PACKAGE} {dist.version} in "
            f"{root}; update with git",
        )
    if need_writable and not os.access(root, os.W_OK):
        raise UpdateError(
            409, "not_writable", f"cannot install: {root} is not writable by this node's user ({os.getuid()})"
        )
    return dist


def snapshot_installed(dist: importlib.metadata.Distribution, dest_dir: Path) -> Path:
    """Repack the running version into a wheel from its RECORD, so rollback needs no network and works
    whether it was installed from our feed or by hand. Bytecode, scripts (regenerated from
    entry_points.txt) and install-time files are left out, as in the wheel it came from."""
    files = dist.files
    if not files:
        raise UpdateError(
            500, "no_snapshot", f"cannot snapshot {PACKAGE} {dist.version}: its RECORD is missing"
        )
    dest_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    for old in dest_dir.glob("*.whl"):
        old.unlink()
    target = dest_dir / wheel_filename(str(Version(dist.version)))
    tmp = target.with_suffix(".part")
    record: list[str] = []
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            record_name = None
            for entry in files:
                parts = entry.parts
                if not parts or parts[0] in ("..", "/") or entry.is_absolute() or "__pycache__" in parts:
                    continue
                if parts[0].endswith(".dist-info"):
                    if parts[-1] == "RECORD":
                        record_name = entry.as_posix()
                        continue
                    if parts[-1] in ("INSTALLER", "REQUESTED", "direct_url.json"):
                        continue
                data = Path(entry.locate()).read_bytes()
                zf.writestr(entry.as_posix(), data)
                digest = hashlib.sha256(data).digest()
                b64 = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
                record.append(f"{entry.as_posix()},sha256={b64},{len(data)}")
            if record_name is None:
                raise UpdateError(500, "no_snapshot", f"cannot snapshot {PACKAGE}: its RECORD is not listed")
            record.append(f"{record_name},,")
            zf.writestr(record_name, "\n".join(record) + "\n")
        os.replace(tmp, target)
    except OSError as exc:
        raise UpdateError(
            500, "no_snapshot", f"cannot snapshot the running version for rollback: {exc}"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


# -- download --------------------------------------------------------------------------------------
def download_artefact(
    manifest: Manifest, url: str, dest_dir: Path, progress: Callable[[int, int], None] | None = None
) -> Path:
    """Stream the wheel to a temporary file, refusing it unless exactly manifest.size bytes arrive with the
    signed SHA-256 and its metadata names the signed version; only then is it moved into place."""
    import httpx

    fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=".download-", suffix=".part")
    tmp = Path(tmp_name)
    digest, done = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with (
                    httpx.Client(timeout=httpx.Timeout(DOWNLOAD_TIMEOUT[0], connect=DOWNLOAD_TIMEOUT[1]),
                                 follow_redirects=True) as client,
                    client.stream("GET", url) as r,
                ):
                    if r.status_code != 200:
                        raise UpdateError(502, "download_failed", f"{url} answered HTTP {r.status_code}")
                    declared = r.headers.get("content-length", "")
                    plain = r.headers.get("content-encoding", "identity") in ("identity", "")
                    if plain and declared.isdigit() and int(declared) != manifest.size:
                        raise UpdateError(
                            502,
                            "size_mismatch",
                            f"{url} is {declared} bytes but the signed manifest says {manifest.size}",
                        )
                    for chunk in r.iter_bytes(CHUNK):
                        done += len(chunk)
                        if done > manifest.size:
                            raise UpdateError(
                                502, "size_mismatch", f"{url} sent more than the signed {manifest.size} bytes"
                            )
                        digest.update(chunk)
                        out.write(chunk)
                        if progress:
                            progress(done, manifest.size)
            except httpx.HTTPError as exc:
                raise UpdateError(
                    502,
                    "download_failed",
                    f"downloading {url} failed after {done} of {manifest.size} bytes: {_http_reason(exc)}",
                ) from None
            out.flush()
            os.fsync(out.fileno())
        if done < manifest.size:
            raise UpdateError(
                502,
                "truncated",
                f"the download of {url} is truncated: {done} of {manifest.size} bytes arrived",
            )
        if digest.hexdigest() != manifest.sha256:
            raise UpdateError(
                502,
                "hash_mismatch",
                f"SHA-256 of {manifest.filename} is {digest.hexdigest()}, the signed manifest says "
                f"{manifest.sha256}",
            )
        check_wheel_metadata(tmp, manifest)
        final = dest_dir / manifest.filename
        os.replace(tmp, final)
        return final
    finally:
        tmp.unlink(missing_ok=True)


def check_wheel_metadata(path: Path, manifest: Manifest) -> None:
    """A signed, intact wheel can still be the wrong one (a release mistake): its own metadata must agree."""
    try:
        with zipfile.ZipFile(path) as zf:
            metas = [n for n in zf.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
            if len(metas) != 1:
                raise UpdateError(
                    502, "bad_artefact", f"{manifest.filename} has no single .dist-info/METADATA"
                )
            meta = email.parser.HeaderParser().parsestr(zf.read(metas[0]).decode("utf-8", "replace"))
    except zipfile.BadZipFile:
        raise UpdateError(
            502, "bad_artefact", f"{manifest.filename} is not a wheel (not a zip file)"
        ) from None
    name, version = meta.get("Name", ""), meta.get("Version", "")
    if canonicalize_name(name) != PACKAGE or parse_version(version) != manifest.parsed_version:
        raise UpdateError(
            502,
            "bad_artefact",
            f"{manifest.filename} contains {name} {version}, not {PACKAGE} {manifest.version} as signed",
        )


# -- apply: the node's side ------------------------------------------------------------------------
def start_apply(runtime, allow_downgrade: bool = False) -> dict:
    """Verify everything, then start the worker. Raises UpdateError, with nothing changed, on any problem.

    Runs in a thread of the node (the download may take a while; GET /api/update meanwhile reports the
    progress from the status file)."""
    cfg: Config = runtime.cfg
    home: Path = runtime.home
    if not cfg["update.url"]:
        raise UpdateError(409, "no_feed", "no update feed is configured for this node (set update.url)")
    mode = runtime.start_mode
    dist = installed_distribution(need_writable=mode != "systemd")
    if mode not in RESTARTABLE_MODES:
        how = {
            "foreground": "it runs in the foreground (`pinkybrain serve`), so it cannot restart itself; "
            "start it with `pinkybrain serve --daemon` (or as the systemd service) and apply again",
            "launchd": "it runs under launchd, which restarts it by itself; stop the job, "
            f"`{sys.executable} -m pip install` the verified wheel, and start it again",
        }.get(mode, f"it runs in {mode} mode")
        raise UpdateError(409, "cannot_restart", f"this node cannot apply updates: {how}")
    tree = ReleaseTree(home)
    if mode == "systemd" and not tree.running_through_current():
        raise UpdateError(
            409,
            "not_release_layout",
            f"this service runs {sys.prefix}, not the release {tree.current} links to, so an update could "
            f"not take its place: install the unit from systemd/pinkybrain.service (ExecStart runs "
            f"{tree.current}/bin/pinkybrain) and link {tree.current} to the install's .venv",
        )
    lock = acquire_lock(home)
    status = UpdateStatus(home)
    try:
        status.begin(
            **{"from": dist.version, "to": None, "mode": mode, "log": str(updates_dir(home) / "update.log")}
        )
        try:
            manifest, url = fetch_manifest(cfg)
            order = compare_versions(dist.version, manifest.version)
            if order == 0:
                raise UpdateError(409, "up_to_date", f"this node already runs {PACKAGE} {dist.version}")
            if order < 0 and not (allow_downgrade or cfg["update.allow_downgrade"]):
                raise UpdateError(
                    409,
                    "downgrade_refused",
                    f"the feed offers {manifest.version}, older than the running {dist.version}; downgrades "
                    "are refused unless allowed (`update apply --allow-downgrade` or update.allow_downgrade)",
                )
            status.update(
                to=manifest.version, state="downloading", progress={"done": 0, "total": manifest.size}
            )
            wheel = download_artefact(manifest, url, updates_dir(home), status.progress)
            status.update(state="verified")
            # systemd: the running release stays untouched beside the new one, so it is the rollback.
            rollback = None if mode == "systemd" else snapshot_installed(dist, updates_dir(home) / "rollback")
        except OSError as exc:  # disk full, permissions: still nothing changed, and the status must say so
            status.finish("failed", f"{exc}; nothing was changed", changed=False)
            raise UpdateError(
                500, "io_error", f"cannot prepare the update: {exc}; nothing was changed"
            ) from None
        except UpdateError as exc:
            status.finish("failed", f"{exc.detail}; nothing was changed", changed=False)
            raise
        plan = {
            "id": status.data["id"],
            "home": str(home),
            "mode": mode,
            "previous": dist.version,
            "target": manifest.version,
            "wheel": str(wheel),
            "sha256": manifest.sha256,
            "rollback_wheel": str(rollback) if rollback else None,
            "base_site": str(running_base_site()),
            "node_pid": runtime.pid,
            "host": runtime.bind_host,
            "port": runtime.port,
            "peers": list(getattr(runtime, "extra_peers", ())),  # `serve --peer`: restart with the same ones
            "config_file": str(cfg.file.resolve()) if cfg.file else None,
            "health_timeout_secs": cfg["update.health_timeout_secs"],
            "python": sys.executable,
        }
        plan_path = updates_dir(home) / "plan.json"
        try:
            plan_path.write_text(json.dumps(plan, indent=2), encoding="utf-8")
            pid = spawn_worker(plan_path, lock, home)
        except OSError as exc:
            status.finish(
                "failed", f"cannot start the update worker: {exc}; nothing was changed", changed=False
            )
            raise UpdateError(500, "worker_failed", f"cannot start the update worker: {exc}") from None
        status.update(state="handed_over", worker_pid=pid)
    finally:
        os.close(lock)  # the worker holds its own copy of the lock until it exits
    timeout = cfg["update.health_timeout_secs"]
    then = (
        f"the node now stops, installs it, restarts and must answer as {manifest.version} within "
        f"{timeout:g} s, else {dist.version} is reinstalled"
        if mode == "daemon"
        else f"the node installs it into a release venv of its own, test-runs it, switches {tree.current} to it "
        f"and exits with status {RESTART_EXIT_CODE} for systemd to start it (else {dist.version} keeps running)"
    )
    return {
        "accepted": True,
        "attempt": plan["id"],
        "from": dist.version,
        "to": manifest.version,
        "mode": mode,
        "sha256": manifest.sha256,
        "size": manifest.size,
        "key_id": key_id(release_public_key(cfg)),
        "health_timeout_secs": timeout,
        "notes": manifest.notes,
        "detail": f"verified {PACKAGE} {manifest.version} (size, SHA-256, release signature); {then}. "
        "`pinkybrain update check` shows the outcome.",
    }


def spawn_worker(plan_path: Path, lock_fd: int, home: Path) -> int:
    log_path = updates_dir(home) / "update.log"
    env = dict(os.environ, PINKYBRAIN_HOME=str(home), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "pinkybrain.node.services.updater", "apply-worker", str(plan_path)]
    with open(log_path, "ab") as out, open(os.devnull, "rb") as devnull:
        # A new session: the worker must survive the node it is about to stop.
        proc = subprocess.Popen(
            cmd,
            stdin=devnull,
            stdout=out,
            stderr=out,
            cwd=str(home),
            env=env,
            start_new_session=True,
            close_fds=True,
            pass_fds=(lock_fd,),
        )
    # Reap it if it ends while this node still runs (systemd mode, early failures): no zombie left.
    threading.Thread(target=proc.wait, name="update-worker-reaper", daemon=True).start()
    return proc.pid


# -- apply: the worker -----------------------------------------------------------------------------
def signed_status(url: str, secret: str, timeout: float = 5.0) -> dict | None:
    """The node's signed status, or None. Status rather than ping: a ping answers while the node's stores
    still open (api/front.py); status answers once everything has started, so a release whose start
    fails after its port is bound is not taken as healthy."""
    ts, nonce = f"{time.time():.3f}", secrets.token_hex(16)
    headers = {
        SIG_HEADER: sign(secret, "GET", "/api/status", "", ts, nonce, b""),
        TS_HEADER: ts,
        NONCE_HEADER: nonce,
    }
    import httpx

    try:
        r = httpx.get(f"{url}/api/status", headers=headers, timeout=timeout)
        answer = r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
    return answer if isinstance(answer, dict) else None


def wait_for_version(url: str, secret: str, expected: str, deadline: float) -> str | None:
    """Poll the signed status until it reports `expected`; returns the last version seen otherwise."""
    seen = None
    while True:
        answer = signed_status(url, secret)
        if answer is not None:
            seen = str(answer.get("version"))
            with contextlib.suppress(ValueError):
                if Version(seen) == Version(expected):
                    return seen
        if time.monotonic() >= deadline:
            return seen
        time.sleep(0.3)


def pip_install(wheel: Path, *, python: str = sys.executable, deps: bool = False) -> None:
    """Install a wheel with `python`'s pip. deps: also what the release's own requirements add (from pip's
    configured index, PIP_INDEX_URL / PIP_FIND_LINKS); without, offline, as for a rollback snapshot."""
    offline = [] if deps else ["--no-deps", "--no-index"]
    cmd = [
        python, "-m", "pip", "install", *offline, "--force-reinstall" if not deps else "--upgrade-strategy=only-if-needed",
        "--disable-pip-version-check", "--no-input", "--quiet", str(wheel),
    ]  # fmt: skip
    log.info("installing %s", wheel.name)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_SECS, check=False)
    except subprocess.TimeoutExpired:
        raise WorkerFailure(
            f"pip did not finish installing {wheel.name} within {PIP_TIMEOUT_SECS:.0f} s"
        ) from None
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise WorkerFailure(f"pip could not install {wheel.name}: {lines[-1] if lines else done.returncode}")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stop_node(home: Path, expected_pid: int | None = None, wait: float = NODE_STOP_SECS) -> None:
    """SIGTERM the node holding this home's pid lock and wait for the lock to go; SIGKILL as a last resort
    only when `expected_pid` is None (i.e. when stopping a version we started ourselves)."""
    pid_file = home / "pinkybrain.pid"
    pid = running_pid(pid_file)
    if pid is None:
        return
    if expected_pid is not None and pid != expected_pid:
        raise WorkerFailure(
            f"the pid file names pid {pid}, not the node {expected_pid} that asked for the update"
        )
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if running_pid(pid_file) is None:
            return
        time.sleep(0.1)
    if expected_pid is not None:
        raise WorkerFailure(f"the node (pid {pid}) did not stop within {wait:.0f} s")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while running_pid(pid_file) is not None and time.monotonic() < deadline:
        time.sleep(0.1)


def start_and_check(cfg: Config, plan: dict, expected: str) -> None:
    """Start the node as `serve --daemon` does and wait for a signed ping naming `expected`."""
    timeout = float(plan["health_timeout_secs"])
    deadline = time.monotonic() + timeout
    log_file = cfg.path("logging.file") if cfg["logging.file"] else Path(plan["home"]) / "pinkybrain.log"
    offset = log_file.stat().st_size if log_file.exists() else 0
    try:
        peers = {"peers": tuple(plan["peers"])} if plan.get("peers") else {}
        info = start_daemon(
            cfg, plan["config_file"], plan["host"], int(plan["port"]), wait_secs=timeout, **peers
        )
    except DaemonError as exc:
        # The log is shared with earlier runs: quote only what this start wrote.
        what = str(exc).split(": ", 1)[0]
        with contextlib.suppress(OSError):
            with open(log_file, "rb") as fh:
                fh.seek(offset)
                lines = [ln for ln in fh.read().decode("utf-8", "replace").splitlines() if ln.strip()]
            if lines:
                what += ": " + " | ".join(lines[-2:])[-500:]
        raise WorkerFailure(f"{PACKAGE} {expected} did not come up: {what}") from None
    seen = wait_for_version(info["url"], cfg["p2p.secret"], expected, max(deadline, time.monotonic() + 2))
    if seen is None or Version(seen) != Version(expected):
        raise WorkerFailure(f"the restarted node reports version {seen}, not {expected}")


def apply_daemon(plan: dict, cfg: Config, status: UpdateStatus) -> None:
    home = Path(plan["home"])
    status.update(state="stopping", worker_pid=os.getpid())
    try:
        stop_node(home, expected_pid=int(plan["node_pid"]))
    except WorkerFailure as exc:
        status.finish("failed", f"{exc}; nothing was changed", changed=False)
        return
    try:
        status.update(state="installing")
        pip_install(Path(plan["wheel"]), deps=True)
        status.update(state="starting")
        start_and_check(cfg, plan, plan["target"])
    except WorkerFailure as exc:
        log.error("update to %s failed: %s; rolling back", plan["target"], exc)
        rollback_daemon(plan, cfg, status, str(exc))
        return
    status.finish("succeeded", changed=True)
    prune(home, keep=Path(plan["wheel"]))


def rollback_daemon(plan: dict, cfg: Config, status: UpdateStatus, reason: str) -> None:
    home = Path(plan["home"])
    status.update(state="rolling_back", reason=reason)
    try:
        stop_node(home)  # a new version that answers wrongly, or half started
        pip_install(Path(plan["rollback_wheel"]))
        start_and_check(cfg, plan, plan["previous"])
    except WorkerFailure as exc:
        status.finish(
            "failed",
            f"{reason}; the rollback to {plan['previous']} failed too: {exc}. Reinstall by hand: "
            f"{sys.executable} -m pip install --no-deps --force-reinstall {plan['rollback_wheel']}, then "
            "`pinkybrain serve --daemon`",
            changed=True,
        )
        return
    status.finish("rolled_back", f"{reason}; rolled back to {plan['previous']}", changed=False)


def systemd_unit() -> str:
    """This process's unit, from its systemd cgroup (the worker stays in the node's cgroup)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers not in ("", "name=systemd"):
                continue
            for part in reversed(path.split("/")):
                if part.endswith(".service"):
                    return part
    return "pinkybrain.service"


def trial_run(expected: str, timeout: float, log_path: Path, python: str = sys.executable) -> None:
    """Start the just-installed code as a throwaway node (scratch home, loopback port, new secret) and wait
    for it to answer as `expected`: proof that it starts, without touching the running service."""
    scratch = Path(tempfile.mkdtemp(prefix="pinkybrain-trial-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    secret = secrets.token_urlsafe(32)
    config = {
        "node": {"name": "update-trial", "port": port},
        "p2p": {"listen": f"127.0.0.1:{port}", "mdns": False, "secret": secret},
        "mesh": {"stealth": True},
        "sharing": {"shared_models_dir": str(scratch / "shared_models")},
        "conversations": {"storage": str(scratch / "conversations")},
    }
    (scratch / "shared_models").mkdir()
    config_path = scratch / "pinkybrain.yaml"
    # It holds a secret: 0600 from the start (a node refuses a config file others can read).
    with os.fdopen(os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as fh:
        fh.write(yaml.safe_dump(config))
    drop = ("P2P_SECRET", "PINKYBRAIN_CONFIG", "NOTIFY_SOCKET", "INVOCATION_ID", "LISTEN_FDS", "LISTEN_PID")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PINKYBRAIN_HOME=str(scratch), PINKYBRAIN_START_MODE="foreground")
    cmd = [python, "-m", "pinkybrain.node", "serve", "--config", str(config_path)]
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=scratch, env=env)
    try:
        deadline = time.monotonic() + timeout
        seen = None
        while time.monotonic() < deadline and proc.poll() is None:
            seen = wait_for_version(f"http://127.0.0.1:{port}", secret, expected, time.monotonic())
            if seen is not None and Version(seen) == Version(expected):
                return
            time.sleep(0.3)
        if proc.poll() is not None:
            raise WorkerFailure(
                f"{PACKAGE} {expected} exited with status {proc.returncode} at start (trial run)"
            )
        raise WorkerFailure(
            f"{PACKAGE} {expected} did not answer within {timeout:g} s (trial run; saw {seen})"
        )
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(scratch, ignore_errors=True)


def apply_systemd(plan: dict, cfg: Config, status: UpdateStatus) -> None:
    """Build the release in a venv of its own under the state directory, test-run it, switch `current` to
    it and have the node exit with RESTART_EXIT_CODE, on which the unit restarts (RestartForceExitStatus=):
    no write to the install tree, no systemctl, no root. A failure before the switch leaves the running
    release as it was; after the switch, the unit's ExecStopPost (`after-stop`) switches back."""
    home = Path(plan["home"])
    timeout = float(plan["health_timeout_secs"])
    tree = ReleaseTree(home)
    target: Path | None = None
    try:
        status.update(state="installing", worker_pid=os.getpid())
        target = tree.create(plan["target"], Path(plan["base_site"]), plan["python"])
        python = str(target / "bin" / "python")
        pip_install(Path(plan["wheel"]), python=python, deps=True)
        status.update(state="trial_run", release=str(target))
        trial_run(plan["target"], timeout, updates_dir(home) / "update.log", python=python)
    except (WorkerFailure, ReleaseTreeError) as exc:
        if target is not None:
            tree.discard(target)
        status.finish(
            "rolled_back", f"{exc}; the service kept running {plan['previous']}", changed=False
        )
        return
    previous = tree.switch(target)
    # Written before the node exits: the next start (or ExecStopPost) reads how far this got.
    status.update(
        state="restarting",
        unit=systemd_unit(),
        release=str(target),
        previous_release=str(previous) if previous else None,
        deadline=time.time() + timeout + 60,
    )
    try:
        os.kill(int(plan["node_pid"]), RESTART_SIGNAL)
    except ProcessLookupError:
        tree.roll_back()
        status.finish("failed", "the node stopped before it could be restarted; nothing was changed", changed=False)


def after_stop(home: Path) -> int:
    """The unit's ExecStopPost: when the service stopped while a new release had not yet answered (it
    crashed, or systemd gave up waiting for READY=1), switch `current` back, so the restart runs the
    previous release. The old release's own exit for the update (RESTART_EXIT_CODE) is left alone."""
    status = UpdateStatus.load(home)
    data = status.data
    if data.get("state") != "restarting" or data.get("final"):
        return 0
    exit_status = os.environ.get("EXIT_STATUS", "")
    if exit_status == str(RESTART_EXIT_CODE):
        return 0
    try:
        back = ReleaseTree(home).roll_back()
    except (ReleaseTreeError, OSError) as exc:
        status.finish("failed", f"{data.get('to')} stopped before it answered and going back failed: {exc}")
        return 1
    result = os.environ.get("SERVICE_RESULT", "unknown")
    status.finish(
        "rolled_back",
        f"{PACKAGE} {data.get('to')} stopped before it answered (service result {result}, exit status "
        f"{exit_status or 'none'}); {back} ({data.get('from')}) is current again",
        changed=False,
    )
    return 0


def confirm_running(home: Path, version: str) -> None:
    """Called once the node answers: an update that restarted into this version is now settled, so a later
    stop of this version is never mistaken for a failed start."""
    with contextlib.suppress(OSError, ValueError):
        last_attempt(home, version)


def prune(home: Path, keep: Path) -> None:
    """Keep the installed release's wheel (and the rollback snapshot); drop older downloads."""
    for old in (home / UPDATES_DIR).glob(f"{PACKAGE}-*.whl"):
        if old != keep:
            old.unlink(missing_ok=True)


def run_worker(plan_path: Path) -> int:
    plan = json.loads(plan_path.read_text(encoding="utf-8"))
    home = Path(plan["home"])
    status = UpdateStatus.load(home)
    if status.data.get("id") != plan["id"]:
        status.begin(**{"from": plan["previous"], "to": plan["target"], "mode": plan["mode"]})
    try:
        if sha256_file(Path(plan["wheel"])) != plan["sha256"]:
            status.finish("failed", f"{plan['wheel']} changed after it was verified; nothing was changed")
            return 1
        cfg = load_config(plan["config_file"])
        log.info("updating %s -> %s (%s mode)", plan["previous"], plan["target"], plan["mode"])
        (apply_daemon if plan["mode"] == "daemon" else apply_systemd)(plan, cfg, status)
    except Exception as exc:  # noqa: BLE001 - whatever happens, the status file must say it
        log.exception("update worker failed")
        status.finish("failed", f"the update worker failed: {type(exc).__name__}: {exc}")
        return 1
    log.info(
        "update %s%s",
        status.data.get("state"),
        f": {status.data['reason']}" if status.data.get("reason") else "",
    )
    return 0 if status.data.get("state") == "succeeded" else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pinkybrain.node.services.updater")
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("apply-worker", help="carry out a verified update plan (started by the node)")
    worker.add_argument("plan", type=Path)
    sub.add_parser("after-stop", help="the systemd unit's ExecStopPost: roll back a release that never answered")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s update: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health-check ping is noise
    if args.command == "after-stop":
        from pinkybrain.node.core.config import pinkybrain_home

        return after_stop(pinkybrain_home())
    return run_worker(args.plan)


if __name__ == "__main__":
    sys.exit(main())
