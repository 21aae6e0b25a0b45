"""Signed self-update: manifests, keys, check, apply, refusals and rollback, against real node processes.

Releases are wheels of this source tree built here (with patched versions), served by a local HTTP server
on 127.0.0.1. The node under update runs from its own venv where pinkybrain is installed from a wheel
(non-editable, as in production); third-party packages come from the test interpreter's site-packages
through a path line in a .pth file (not `--system-site-packages`: that would also run the outer venv's
editable-install hook and put this checkout back on the path).
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from nacl.signing import SigningKey

from nodes import free_port, node_env, owner_auth, run_cli, strong_secret, write_node_config
from pinkybrain.node.core import release
from pinkybrain.node.core.release import Manifest, ManifestError, ReleaseError, SignatureError

ROOT = Path(__file__).parents[1]
TEST_KEY = SigningKey(hashlib.sha256(b"pinkybrain test release key").digest())
OTHER_KEY = SigningKey(hashlib.sha256(b"somebody else's key").digest())
TEST_PUB = base64.b64encode(bytes(TEST_KEY.verify_key)).decode()


# -- pure: manifests and keys ----------------------------------------------------------------------
def manifest(version="2.0.0", data=b"wheel bytes", **over) -> Manifest:
    fields = dict(
        version=version,
        filename=release.wheel_filename(version),
        url=release.wheel_filename(version),
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        notes=f"release {version}",
        created="2026-01-01T00:00:00+00:00",
    )
    fields.update(over)
    return Manifest(**fields)


def envelope_bytes(m: Manifest, key: SigningKey = TEST_KEY, **tamper) -> bytes:
    doc = release.sign_manifest(m, key)
    doc["manifest"].update(tamper)
    return json.dumps(doc, indent=3).encode()


def test_signed_manifest_round_trip_and_key_formats():
    pub = bytes(TEST_KEY.verify_key)
    m = manifest()
    assert release.verify_envelope(envelope_bytes(m), pub) == m
    # Layout in transit does not matter, values do.
    doc = release.sign_manifest(m, TEST_KEY)
    reordered = {"signature": doc["signature"], "manifest": dict(reversed(list(doc["manifest"].items())))}
    assert release.verify_envelope(json.dumps(reordered).encode(), pub) == m
    for text in (
        pub.hex(),
        base64.b64encode(pub).decode(),
        base64.urlsafe_b64encode(pub).decode().rstrip("="),
    ):
        assert release.parse_public_key(text) == pub
    with pytest.raises(ReleaseError):
        release.parse_public_key("not a key")
    priv = release.private_key_file_text(TEST_KEY)
    assert bytes(release.parse_private_key(priv)) == bytes(TEST_KEY)
    assert release.parse_public_key(release.read_key_text(release.public_key_file_text(pub))) == pub


def test_tampered_foreign_and_broken_manifests_are_refused():
    pub = bytes(TEST_KEY.verify_key)
    with pytest.raises(SignatureError, match="does not match its contents"):
        release.verify_envelope(envelope_bytes(manifest(), sha256="0" * 64), pub)
    with pytest.raises(SignatureError, match="signed by another key"):
        release.verify_envelope(envelope_bytes(manifest(), OTHER_KEY), pub)
    # The key id is only a hint: lying about it changes nothing.
    doc = json.loads(envelope_bytes(manifest(), OTHER_KEY))
    doc["key_id"] = release.key_id(pub)
    with pytest.raises(SignatureError, match="does not match"):
        release.verify_envelope(json.dumps(doc).encode(), pub)
    good = envelope_bytes(manifest())
    with pytest.raises(ManifestError, match="not valid JSON"):
        release.verify_envelope(good[: len(good) // 2], pub)
    unsigned = json.loads(good)
    del unsigned["signature"]
    with pytest.raises(SignatureError, match="not signed"):
        release.verify_envelope(json.dumps(unsigned).encode(), pub)
    # Nothing a node would refuse can be signed in the first place.
    for bad in (
        dict(filename="pinkybrain-3.0.0-py3-none-any.whl"),
        dict(filename="../pinkybrain-2.0.0-py3-none-any.whl"),
        dict(url="file:///etc/passwd"),
        dict(sha256="ABC"),
        dict(size=0),
        dict(version="two"),
    ):
        with pytest.raises(ManifestError):
            release.sign_manifest(manifest(**bad), TEST_KEY)


def test_version_order_and_pinned_key():
    assert release.compare_versions("5.3.0", "5.10.0") == 1
    assert release.compare_versions("5.3.0", "5.3") == 0
    assert release.compare_versions("5.3.0", "5.3.0rc1") == -1
    assert release.compare_versions("5.3.0", "5.3.0.post1") == 1
    pinned = release.pinned_public_key()
    assert len(pinned) == 32
    assert release.key_id(pinned) in (ROOT / "node" / "release_key.pub").read_text()


def test_release_cli_keygen_sign_verify(tmp_path):
    cli = [sys.executable, "-m", "pinkybrain.node.release_cli"]
    key = tmp_path / "keys" / "release.key"
    made = subprocess.run([*cli, "keygen", str(key), "--json"], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    info = json.loads(made.stdout)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    seed = release.read_key_text(key.read_text())
    assert seed not in Path(info["public_key_file"]).read_text()
    again = subprocess.run([*cli, "keygen", str(key)], capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "exists" in again.stderr

    wheel = tmp_path / "pinkybrain-7.1.0-py3-none-any.whl"
    _fake_wheel(wheel, "7.1.0")
    out = tmp_path / "manifest.json"
    signed = subprocess.run(
        [*cli, "sign", str(wheel), "--key", str(key), "--notes", "faster", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert signed.returncode == 0, signed.stderr
    m = release.verify_envelope(out.read_bytes(), base64.b64decode(info["public_key"]))
    assert (m.version, m.url, m.notes, m.size) == ("7.1.0", wheel.name, "faster", wheel.stat().st_size)
    ok = subprocess.run(
        [*cli, "verify", str(out), "--public-key", info["public_key_file"], "--wheel", str(wheel)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0 and "ok: pinkybrain 7.1.0" in ok.stdout, ok.stderr
    pinned = subprocess.run([*cli, "verify", str(out)], capture_output=True, text=True, timeout=60)
    assert pinned.returncode == 1 and "another key" in pinned.stderr
    key.chmod(0o644)
    loose = subprocess.run(
        [*cli, "sign", str(wheel), "--key", str(key)], capture_output=True, text=True, timeout=60
    )
    assert loose.returncode != 0 and "readable by others" in loose.stderr


def _fake_wheel(path: Path, version: str) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(
            f"pinkybrain-{version}.dist-info/METADATA",
            f"Metadata-Version: 2.1\nName: pinkybrain\nVersion: {version}\n",
        )


# -- a release server --------------------------------------------------------------------------------
class ReleaseServer:
    """Serves files from memory on 127.0.0.1. Modes: ok; drop (announces the full length, sends half, closes
    the connection); short (no length, half the bytes, then a clean close)."""

    def __init__(self):
        self.files: dict[str, tuple[bytes, str]] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                if name not in server.files:
                    self.send_error(404)
                    return
                data, mode = server.files[name]
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                if mode != "short":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data if mode == "ok" else data[: len(data) // 2])
                self.wfile.flush()
                if mode != "ok":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str = "") -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def put(self, name: str, data: bytes, mode: str = "ok") -> None:
        self.files[name] = (data, mode)

    def publish(self, m: Manifest, key: SigningKey = TEST_KEY, feed_mode: str = "ok", **tamper) -> None:
        self.put("feed.json", envelope_bytes(m, key, **tamper), feed_mode)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server():
    s = ReleaseServer()
    yield s
    s.close()


# -- the outer (editable) node: check works, apply is refused ---------------------------------------
def test_check_reports_a_verified_release_and_a_source_checkout_refuses_apply(node_factory, server):
    plain = node_factory()
    answer = plain.get("/api/update").json()
    assert answer["feed"] is None and answer["update_available"] is False and "update.url" in answer["detail"]
    nothing = plain.post("/api/update/apply")
    assert nothing.status_code == 409 and nothing.json()["error"] == "no_feed"

    newer = manifest("99.0.0", notes="much better")
    server.publish(newer)
    node = node_factory(extra={"update.url": server.url("feed.json"), "update.public_key": TEST_PUB})
    answer = node.get("/api/update").json()
    assert answer["current"] == node.get("/api/ping").json()["version"]
    assert (answer["latest"], answer["update_available"], answer["verified"]) == ("99.0.0", True, True)
    assert answer["notes"] == "much better" and answer["artefact"]["sha256"] == newer.sha256
    assert answer["artefact"]["url"] == server.url(newer.filename)

    refused = node.post("/api/update/apply")
    # Asked from elsewhere than the checkout, whose build leftovers (pinkybrain.egg-info) would answer first.
    probe = "import importlib.metadata as m; print(m.distribution('pinkybrain').read_text('direct_url.json') or '{}')"
    found = subprocess.run([sys.executable, "-c", probe], cwd=node.home, capture_output=True, text=True).stdout
    if (json.loads(found).get("dir_info") or {}).get("editable"):  # the development install (install.sh --dev)
        assert refused.status_code == 409 and refused.json()["error"] == "source_checkout"
        assert "source checkout" in refused.json()["detail"] and "git" in refused.json()["detail"]
    else:  # installed from a wheel: refused all the same, since a foreground node cannot restart itself
        assert refused.status_code == 409 and refused.json()["error"] == "cannot_restart"

    server.publish(newer, OTHER_KEY)
    bad = node.get("/api/update")
    assert bad.status_code == 502 and bad.json()["error"] == "bad_signature"
    assert "another key" in bad.json()["detail"]


# -- an installed node that really updates --------------------------------------------------------
def build_wheel(work: Path, version: str, *, broken: bool = False) -> Path:
    src = work / f"src-{version}"
    src.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "LICENSE", "pinkybrain", "node", "skill"):
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif path.exists():
            shutil.copy2(path, src / name)
    pyproject = src / "pyproject.toml"
    pyproject.write_text(re.sub(r'(?m)^version = "[^"]*"', f'version = "{version}"', pyproject.read_text()))
    if broken:  # a release whose node dies at start, the way a bad import would make it
        main = src / "node" / "__main__.py"
        main.write_text('raise SystemExit("this build of pinkybrain cannot start")\n' + main.read_text())
    out = work / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out / release.wheel_filename(version)


class InstalledNode:
    """A daemon node running from a wheel install in its own venv."""

    def __init__(self, work: Path, server: ReleaseServer, old_wheel: Path):
        venv = work / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
        self.python = venv / "bin" / "python"
        # cwd: never this checkout, whose pinkybrain/ folder `python -m` would find first.
        self.cwd = work
        site = subprocess.run(
            [str(self.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            cwd=self.cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        Path(site, "_outer_site_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        self.pip_install(old_wheel)
        self.home = work / "home"
        self.port = free_port()
        self.secret = strong_secret()
        self.config = write_node_config(
            self.home,
            host="127.0.0.1",
            port=self.port,
            secret=self.secret,
            extra={
                "update.url": server.url("feed.json"),
                "update.public_key": TEST_PUB,
                "update.health_timeout_secs": 30,
            },
        )
        self.env = node_env(self.home, {"PINKYBRAIN_CONFIG": str(self.config)})
        self.cli_env = {**self.env, "P2P_SECRET": self.secret}
        self.start()

    def pip_install(self, wheel: Path) -> None:
        subprocess.run(
            [str(self.python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
            cwd=self.cwd,
            check=True,
            capture_output=True,
            timeout=300,
        )

    def start(self) -> None:
        done = subprocess.run(
            [str(self.python), "-m", "pinkybrain.node", "serve", "--daemon", "--json"],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, **kw) -> httpx.Response:
        with httpx.Client(base_url=self.url, auth=owner_auth(self.home), timeout=120) as c:
            return c.request(method, path, **kw)

    def ping(self) -> dict:
        return self.request("GET", "/api/ping").json()

    def daemon_pid(self) -> int:
        return self.request("GET", "/api/daemon").json()["pid"]

    def installed_version(self) -> str:
        probe = "import importlib.metadata as m; print(m.version('pinkybrain'))"
        return subprocess.run(
            [str(self.python), "-c", probe], cwd=self.cwd, capture_output=True, text=True, check=True
        ).stdout.strip()

    def wait_outcome(self, attempt: str, timeout: float = 150) -> dict:
        """The final status of an attempt; the node is down for a while in between."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                r = self.request("GET", "/api/update", params={"fetch": "false"})
                last = (r.json().get("last_attempt") or {}) if r.status_code == 200 else {}
                if last.get("id") == attempt and last.get("final") and not r.json()["in_progress"]:
                    return last
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        log = (self.home / "updates" / "update.log").read_text(errors="replace")
        raise AssertionError(f"no outcome for attempt {attempt} in {timeout}s; update.log:\n{log}")

    def stop(self) -> None:
        kill_unfinished_worker(self.home)
        subprocess.run(
            [str(self.python), "-m", "pinkybrain.node", "serve", "--stop"],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            timeout=60,
        )


def test_wheel_ships_the_pinned_release_key(releases):
    names = zipfile.ZipFile(releases["1.0.0"]).namelist()
    assert "pinkybrain/node/release_key.pub" in names, (
        "release_key.pub missing from [tool.setuptools.package-data]"
    )


def kill_unfinished_worker(home: Path) -> None:
    """A worker left behind by a failed test must not outlive it."""
    status = home / "update-status.json"
    data = json.loads(status.read_text()) if status.exists() else {}
    if data.get("worker_pid") and not data.get("final"):
        try:
            os.kill(data["worker_pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    work = tmp_path_factory.mktemp("releases")
    return {
        "1.0.0": build_wheel(work, "1.0.0"),
        "2.0.0": build_wheel(work, "2.0.0"),
        "3.0.0": build_wheel(work, "3.0.0", broken=True),
    }


@pytest.fixture(scope="module")
def installed(tmp_path_factory, server, releases):
    node = InstalledNode(tmp_path_factory.mktemp("installed"), server, releases["1.0.0"])
    yield node
    node.stop()


def publish_wheel(
    server: ReleaseServer, wheel: Path, *, mode: str = "ok", key: SigningKey = TEST_KEY, **over
):
    data = wheel.read_bytes()
    version = wheel.name.split("-")[1]
    m = manifest(version, data, notes=f"pinkybrain {version}", **over)
    server.put(m.filename, data, mode)
    server.publish(m, key)
    return m


def _tamper_notes(server, wheel):
    m = publish_wheel(server, wheel)
    server.publish(m, notes="now with a backdoor")  # changed after signing


BAD_CASES = {
    "wrong hash": (
        lambda s, w: publish_wheel(s, w, sha256=hashlib.sha256(b"other").hexdigest()),
        502,
        "hash_mismatch",
        "SHA-256",
    ),
    "wrong key": (lambda s, w: publish_wheel(s, w, key=OTHER_KEY), 502, "bad_signature", "another key"),
    "tampered manifest": (_tamper_notes, 502, "bad_signature", "does not match"),
    "dropped connection": (lambda s, w: publish_wheel(s, w, mode="drop"), 502, "download_failed", "of "),
    "truncated download": (lambda s, w: publish_wheel(s, w, mode="short"), 502, "truncated", "bytes arrived"),
    "wrong size": (
        lambda s, w: publish_wheel(s, w, size=w.stat().st_size - 1),
        502,
        "size_mismatch",
        "signed manifest says",
    ),
    "feed cut off": (
        lambda s, w: (publish_wheel(s, w), s.publish(manifest("2.0.0"), feed_mode="drop")),
        502,
        None,
        "update feed",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_release_changes_nothing(installed, server, releases, case):
    prepare, status_code, code, words = BAD_CASES[case]
    before_pid = installed.daemon_pid()
    prepare(server, releases["2.0.0"])
    r = installed.request("POST", "/api/update/apply")
    assert r.status_code == status_code, r.text
    body = r.json()
    if code:
        assert body["error"] == code, body
    assert words in body["detail"], body
    assert installed.ping()["version"] == "1.0.0" and installed.daemon_pid() == before_pid
    assert installed.installed_version() == "1.0.0"
    # Nothing downloaded is kept, not even in part.
    assert not list((installed.home / "updates").glob("pinkybrain-2.0.0*"))
    assert not list((installed.home / "updates").glob(".download-*"))
    last = installed.request("GET", "/api/update", params={"fetch": "false"}).json()["last_attempt"]
    assert last["state"] == "failed" and "nothing was changed" in last["reason"]


def test_one_update_at_a_time(installed, server, releases):
    publish_wheel(server, releases["2.0.0"])
    with open(installed.home / "updates" / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a running update worker holds it
        r = installed.request("POST", "/api/update/apply")
        assert r.status_code == 409 and r.json()["error"] == "update_in_progress"
        assert (
            installed.request("GET", "/api/update", params={"fetch": "false"}).json()["in_progress"] is True
        )
    assert installed.request("GET", "/api/update", params={"fetch": "false"}).json()["in_progress"] is False
    assert installed.ping()["version"] == "1.0.0"


def test_up_to_date_and_downgrade_are_refused(installed, server, releases):
    publish_wheel(server, releases["1.0.0"])
    r = installed.request("POST", "/api/update/apply")
    assert r.status_code == 409 and r.json()["error"] == "up_to_date"
    server.publish(manifest("0.9.0"))
    check = installed.request("GET", "/api/update").json()
    assert (
        check["downgrade"] is True
        and check["update_available"] is False
        and "--allow-downgrade" in check["detail"]
    )
    r = installed.request("POST", "/api/update/apply")
    assert r.status_code == 409 and r.json()["error"] == "downgrade_refused"
    assert installed.ping()["version"] == "1.0.0"


def test_failing_new_version_is_rolled_back(installed, server, releases):
    publish_wheel(server, releases["3.0.0"])
    old_pid = installed.daemon_pid()
    applied = run_cli("update", "apply", "--url", installed.url, env=installed.cli_env)
    assert applied.returncode == 1, applied.stdout + applied.stderr
    assert "verified pinkybrain 3.0.0" in applied.stdout
    assert "update to 3.0.0 rolled back" in applied.stderr and "cannot start" in applied.stderr
    assert "Traceback" not in applied.stderr
    outcome = installed.request("GET", "/api/update", params={"fetch": "false"}).json()["last_attempt"]
    assert outcome["state"] == "rolled_back" and outcome["from"] == "1.0.0" and outcome["to"] == "3.0.0"
    assert "3.0.0 did not come up" in outcome["reason"] and "rolled back to 1.0.0" in outcome["reason"]
    assert installed.ping()["version"] == "1.0.0" and installed.daemon_pid() != old_pid
    assert installed.installed_version() == "1.0.0"
    assert installed.request("GET", "/api/daemon").json()["start_mode"] == "daemon"


def test_good_update_applies_then_downgrade_only_when_allowed(installed, server, releases):
    installed.request(
        "POST", "/api/memory/set", json={"key": "kept", "value": "across updates"}
    ).raise_for_status()
    publish_wheel(server, releases["2.0.0"])
    check = run_cli("update", "check", "--url", installed.url, env=installed.cli_env)
    assert check.returncode == 0 and "1.0.0 -> 2.0.0" in check.stdout, check.stderr
    old_pid = installed.daemon_pid()
    r = installed.request("POST", "/api/update/apply")
    assert r.status_code == 202, r.text
    assert (r.json()["from"], r.json()["to"], r.json()["mode"]) == ("1.0.0", "2.0.0", "daemon")
    assert r.json()["sha256"] == hashlib.sha256(releases["2.0.0"].read_bytes()).hexdigest()
    outcome = installed.wait_outcome(r.json()["attempt"])
    assert outcome["state"] == "succeeded", outcome
    assert outcome["progress"] == {
        "done": releases["2.0.0"].stat().st_size,
        "total": releases["2.0.0"].stat().st_size,
    }
    assert installed.ping()["version"] == "2.0.0" and installed.daemon_pid() != old_pid
    assert installed.installed_version() == "2.0.0"
    assert installed.request("GET", "/api/memory/kept").json()["value"] == "across updates"
    assert installed.request("GET", "/api/update").json()["detail"] == "this node runs the latest release"

    # Going back to 1.0.0 is a downgrade: refused, then done when asked for explicitly.
    publish_wheel(server, releases["1.0.0"])
    refused = run_cli("update", "apply", "--url", installed.url, env=installed.cli_env)
    assert refused.returncode == 1 and "downgrades are refused" in refused.stderr
    allowed = run_cli(
        "update", "apply", "--allow-downgrade", "--json", "--url", installed.url, env=installed.cli_env
    )
    assert allowed.returncode == 0, allowed.stderr
    assert json.loads(allowed.stdout)["outcome"]["state"] == "succeeded"
    assert installed.ping()["version"] == "1.0.0"


class PlainNode:
    """A node process of the installed venv run directly (the way systemd runs ExecStart)."""

    def __init__(self, python: Path, home: Path, server: ReleaseServer, extra_env: dict | None = None):
        self.python, self.home = python, home
        self.port, self.secret = free_port(), strong_secret()
        self.config = write_node_config(
            home,
            host="127.0.0.1",
            port=self.port,
            secret=self.secret,
            extra={"update.url": server.url("feed.json"), "update.public_key": TEST_PUB},
        )
        self.env = node_env(home, extra_env)
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        with open(self.home / "node.log", "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.python), "-m", "pinkybrain.node", "serve", "--config", str(self.config)],
                env=self.env,
                cwd=self.home,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                self.request("GET", "/api/ping").raise_for_status()
                return
            except httpx.HTTPError:
                assert time.monotonic() < deadline and self.proc.poll() is None, (
                    self.home / "node.log"
                ).read_text()
                time.sleep(0.2)

    def request(self, method: str, path: str, **kw) -> httpx.Response:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{self.port}", auth=owner_auth(self.home), timeout=60
        ) as c:
            return c.request(method, path, **kw)

    def last_attempt(self) -> dict:
        return self.request("GET", "/api/update", params={"fetch": "false"}).json()["last_attempt"] or {}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


def test_systemd_mode_outside_the_release_layout_refuses(installed, server, releases, tmp_path):
    """Under systemd the unit must run through $PINKYBRAIN_HOME/current (tests/test_update_systemd.py runs
    the real layout); a service started some other way is told so, with nothing changed."""
    publish_wheel(server, releases["2.0.0"])
    node = PlainNode(installed.python, tmp_path / "svc", server, {"PINKYBRAIN_START_MODE": "systemd"})
    try:
        r = node.request("POST", "/api/update/apply")
        assert r.status_code == 409 and r.json()["error"] == "not_release_layout", r.text
        assert str(node.home / "current") in r.json()["detail"]
        assert node.last_attempt() == {} and installed.installed_version() == "1.0.0"
    finally:
        node.stop()


def test_foreground_node_refuses_to_apply(installed, server, releases, tmp_path):
    publish_wheel(server, releases["2.0.0"])
    node = PlainNode(installed.python, tmp_path / "fg", server)
    try:
        r = node.request("POST", "/api/update/apply")
        assert r.status_code == 409 and r.json()["error"] == "cannot_restart"
        assert "foreground" in r.json()["detail"] and "--daemon" in r.json()["detail"]
        assert node.last_attempt() == {}
    finally:
        node.stop()
