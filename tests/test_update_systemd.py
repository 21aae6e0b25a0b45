"""`pinkybrain update apply` under the shipped systemd unit, with the unit's own layout and permissions.

The unit file itself is read: ExecStart, ExecStopPost, Environment=, EnvironmentFile=, WorkingDirectory=,
UMask=, Restart=/RestartForceExitStatus=/RestartSec= drive a small supervisor playing systemd's part (no
systemd runs here). Its paths are moved under a temporary folder (/opt/pinkybrain -> <tmp>/opt/pinkybrain,
/var/lib/pinkybrain -> <tmp>/state, ...); the node runs as a throwaway system user; the install tree is
root's and read-only to it. Nothing at update time runs as root: the node and its update worker are that
user's processes. What systemd alone does and is not reproduced: the sandbox (checked by
systemd-analyze in test_service_units) and the readiness timeout (the supervisor waits for the API).

Releases: 1.0.0 installed; 2.0.0 adds a dependency (a wheel served from PIP_FIND_LINKS, set in the
unit's EnvironmentFile) and imports it; 3.0.0 cannot start at all; 4.0.0 starts in a trial run but dies
under the unit, so only ExecStopPost can roll it back.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from test_service_units import UNIT, last, parse_unit, values
from test_update import TEST_PUB, ReleaseServer, publish_wheel

from nodes import free_port, owner_auth, strong_secret, write_node_config
from pinkybrain.node.core import release

ROOT = Path(__file__).parents[1]
USER = "pinkybrain-test"
DEP = "pinkybrain-testdep"


def _need_root() -> None:
    if os.geteuid() != 0 or not shutil.which("useradd"):
        pytest.skip("needs root and useradd to create the unit's service user (CI runs as root)")


@pytest.fixture(scope="module")
def service_user():
    _need_root()
    created = subprocess.run(["id", USER], capture_output=True).returncode != 0
    if created:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
                       check=True, capture_output=True)
    yield pwd.getpwnam(USER)
    if created:
        subprocess.run(["userdel", USER], capture_output=True)


def _as_user(user: pwd.struct_passwd, argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, user=user.pw_uid, group=user.pw_gid, extra_groups=[], capture_output=True,
                          text=True, timeout=60, **kw)


def base_python(user: pwd.struct_passwd) -> str:
    """An interpreter of this Python version that the service user may run (this venv's may live in
    root's home)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (getattr(sys, "_base_executable", ""), os.path.realpath(sys.executable),
                      shutil.which(f"python{version}") or "", f"/usr/bin/python{version}"):
        try:
            if candidate and _as_user(user, [candidate, "-c", "pass"], env={}).returncode == 0:
                return candidate
        except OSError:  # e.g. under /root, which the user may not enter
            continue
    pytest.fail(f"no Python {version} that {USER} may run (this one: {sys.executable})")


def build_release(work: Path, version: str, *, prelude: str = "", dependency: str | None = None) -> Path:
    """A wheel of this tree at `version`; `prelude` runs first in node/server.py (the unit's ExecStart and
    the updater's trial run both import it)."""
    src = work / f"src-{version}"
    src.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "pinkybrain", "node", "skill"):
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    pyproject = src / "pyproject.toml"
    text = re.sub(r'(?m)^version = "[^"]*"', f'version = "{version}"', pyproject.read_text())
    if dependency:
        text = text.replace("dependencies = [\n", f'dependencies = [\n    "{dependency}",\n', 1)
    pyproject.write_text(text)
    server_py = src / "node" / "server.py"
    future = "from __future__ import annotations\n"
    server_py.write_text(server_py.read_text().replace(future, future + prelude, 1))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(work / "wheels"), str(src)],
                   check=True, capture_output=True, timeout=300)
    return work / "wheels" / release.wheel_filename(version)


def build_dependency(work: Path) -> Path:
    src = work / "testdep"
    (src / "pinkybrain_testdep").mkdir(parents=True)
    (src / "pinkybrain_testdep" / "__init__.py").write_text('MARK = "installed from the release\'s requirements"\n')
    (src / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=69"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "{DEP}"\nversion = "1.0"\n[tool.setuptools]\npackages = ["pinkybrain_testdep"]\n'
    )
    out = work / "deps"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
                   check=True, capture_output=True, timeout=300)
    return out


class Unit:
    """systemd's part for one service: start ExecStart as User= with the unit's environment, and when the
    main process exits run ExecStopPost and restart by Restart=on-failure / RestartForceExitStatus=."""

    def __init__(self, text: str, user: pwd.struct_passwd, log: Path):
        svc = parse_unit(text)["Service"]
        self.user, self.log = user, log
        self.exec_start = shlex.split(last(svc, "ExecStart"))
        self.stop_post = shlex.split(last(svc, "ExecStopPost"))
        self.cwd = last(svc, "WorkingDirectory")
        self.umask = int(last(svc, "UMask"), 8)
        self.restart_sec = float(last(svc, "RestartSec"))
        self.force_restart = {int(v) for v in last(svc, "RestartForceExitStatus").split()}
        self.success = {0} | {int(v) for v in last(svc, "SuccessExitStatus").split()}
        assert last(svc, "Restart") == "on-failure"
        env = dict(v.split("=", 1) for v in values(svc, "Environment"))
        env_file = Path(last(svc, "EnvironmentFile").lstrip("-"))
        if env_file.exists():
            env.update(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
        self.env = {**env, "PATH": "/usr/bin:/bin", "HOME": self.cwd, "LANG": "C.UTF-8"}
        self.history: list[int] = []  # exit statuses of the main process, in order
        self.proc: subprocess.Popen | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None

    def _spawn(self, argv: list[str], extra: dict) -> subprocess.Popen:
        with open(self.log, "ab") as out:
            return subprocess.Popen(argv, user=self.user.pw_uid, group=self.user.pw_gid, extra_groups=[],
                                    umask=self.umask, cwd=self.cwd, env={**self.env, **extra},
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=out)

    def start(self) -> None:
        self.proc = self._spawn(self.exec_start, {"INVOCATION_ID": secrets.token_hex(16)})
        if self._thread is None:
            self._thread = threading.Thread(target=self._supervise, daemon=True)
            self._thread.start()

    def _supervise(self) -> None:
        while True:
            code = self.proc.wait()
            self.history.append(code)
            result = "success" if code in self.success else "exit-code"
            post = self._spawn(self.stop_post, {"SERVICE_RESULT": result, "EXIT_CODE": "exited",
                                                "EXIT_STATUS": str(code)})
            post.wait(120)
            restart = code in self.force_restart or code not in self.success
            if self._stopping or not restart or len(self.history) > 6:  # bounded, like StartLimitBurst
                return
            time.sleep(self.restart_sec)
            self.start()

    def stop(self) -> None:
        self._stopping = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)
        if self._thread is not None:
            self._thread.join(150)


@pytest.fixture(scope="module")
def tree(service_user):
    """The unit's layout under a folder the service user can reach: a root-owned install tree with 1.0.0,
    the state and cache directories owned by the user, `current` linked to the install tree."""
    top = Path(tempfile.mkdtemp(prefix="pinkybrain-unit-", dir="/tmp"))
    try:
        yield _layout(top, service_user)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _layout(top: Path, service_user: pwd.struct_passwd) -> dict:
    top.chmod(0o755)
    paths = {"/opt/pinkybrain": top / "opt" / "pinkybrain", "/var/lib/pinkybrain": top / "state",
             "/var/cache/pinkybrain": top / "cache", "/etc/pinkybrain": top / "etc"}
    work = top / "build"
    work.mkdir()
    wheels = {
        "1.0.0": build_release(work, "1.0.0"),
        "2.0.0": build_release(work, "2.0.0", dependency=f"{DEP}>=1.0",
                               prelude="import pinkybrain_testdep  # noqa: F401  (the added dependency)\n"),
        "3.0.0": build_release(work, "3.0.0", prelude='raise SystemExit("this build cannot start")\n'),
        "4.0.0": build_release(work, "4.0.0", prelude=(
            "import os as _os\nif _os.environ.get('INVOCATION_ID'):\n"
            "    raise SystemExit('this build dies under the unit')\n")),
    }
    deps = build_dependency(work)
    install = paths["/opt/pinkybrain"]
    venv = install / ".venv"
    subprocess.run([base_python(service_user), "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c",
                                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # Third-party packages come from this test's environment (as in test_update), not from the network.
    (site / "_outer_site_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                    str(wheels["1.0.0"])], check=True, capture_output=True, timeout=300, cwd=top)
    subprocess.run(["chmod", "-R", "a+rX,go-w", str(top)], check=True)
    can_import = _as_user(service_user, [str(venv / "bin" / "python"), "-c", "import fastapi, pinkybrain.node"],
                          env={}, cwd=top)
    if can_import.returncode != 0:
        pytest.fail(f"{USER} cannot use this test environment's packages ({sysconfig.get_paths()['purelib']}): "
                    f"the checkout must be readable by other users: {can_import.stderr.strip()[-300:]}")
    uid, gid = service_user.pw_uid, service_user.pw_gid
    for key in ("/var/lib/pinkybrain", "/var/cache/pinkybrain"):  # StateDirectory=, CacheDirectory=
        paths[key].mkdir(mode=0o700)
        os.chown(paths[key], uid, gid)
    state = paths["/var/lib/pinkybrain"]
    os.symlink(venv, state / "current")  # what install.sh --system links
    os.chown(state / "current", uid, gid, follow_symlinks=False)
    # The admin's EnvironmentFile: where pip finds what a release's requirements add.
    paths["/etc/pinkybrain"].mkdir()
    (paths["/etc/pinkybrain"] / "pinkybrain.env").write_text(f"PIP_NO_INDEX=1\nPIP_FIND_LINKS={deps}\n")
    return {"top": top, "paths": paths, "wheels": wheels, "state": state, "venv": venv}


def install_tree_listing(install: Path) -> dict[str, tuple[int, int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size, p.stat().st_uid)
            for p in install.rglob("*") if not p.is_symlink() and "__pycache__" not in p.parts}


def test_update_and_rollback_under_the_shipped_unit(tree, service_user):
    state, wheels = tree["state"], tree["wheels"]
    server = ReleaseServer()
    port, secret = free_port(), strong_secret()
    config = write_node_config(state, host="127.0.0.1", port=port, secret=secret, extra={
        "update.url": server.url("feed.json"), "update.public_key": TEST_PUB, "update.health_timeout_secs": 60})
    assert config == state / "pinkybrain.yaml"  # where the unit's PINKYBRAIN_HOME makes the node look
    for p in [state, *state.rglob("*")]:
        os.chown(p, service_user.pw_uid, service_user.pw_gid, follow_symlinks=False)
    text = UNIT.read_text(encoding="utf-8")
    for real, moved in tree["paths"].items():
        text = text.replace(real, str(moved))
    assert "User=pinkybrain\n" in text
    unit = Unit(text, service_user, tree["top"] / "unit.log")
    # The owner asks (status of the daemon is the owner's): its key is in the unit's state directory.
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", auth=owner_auth(state), timeout=30)

    def answer(path: str, timeout: float = 240, until=lambda r: True) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                r = http.get(path)
                if r.status_code == 200 and until(r.json()):
                    return r.json()
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"{path}: no such answer; log:\n" + unit.log.read_text()[-4000:]
            time.sleep(0.3)

    def outcome(attempt: str) -> dict:
        done = answer("/api/update?fetch=false", until=lambda d: (d.get("last_attempt") or {}).get("id") == attempt
                      and d["last_attempt"].get("final") and not d["in_progress"])["last_attempt"]
        print(f"update {done['from']} -> {done['to']}: {done['state']} ({done.get('reason')})")
        return done

    def update_log() -> str:
        return (state / "updates" / "update.log").read_text(errors="replace")[-3000:]

    before = install_tree_listing(tree["venv"].parent)
    unit.start()
    try:
        first = answer("/api/daemon")
        assert first["start_mode"] == "systemd"
        assert answer("/api/ping")["version"] == "1.0.0"

        # 2.0.0 needs a package the install tree does not have: it lands in the release's own venv.
        publish_wheel(server, wheels["2.0.0"])
        r = http.post("/api/update/apply")
        assert r.status_code == 202 and r.json()["mode"] == "systemd", r.text
        done = outcome(r.json()["attempt"])
        assert done["state"] == "succeeded", update_log()
        assert answer("/api/ping")["version"] == "2.0.0"
        assert unit.history == [release.RESTART_EXIT_CODE]  # one restart, asked for by exit status 75
        release_dir = state / "releases" / "2.0.0"
        assert (state / "current").resolve() == release_dir
        assert (state / "previous").resolve() == tree["venv"]
        dep = _as_user(service_user, [str(release_dir / "bin" / "python"), "-c",
                                      "import pinkybrain_testdep as d, pinkybrain; print(d.__file__, pinkybrain.__file__)"],
                       env={}, cwd=state)  # not this checkout, whose pinkybrain/ would come first
        assert dep.returncode == 0, dep.stderr
        assert all(str(release_dir) in f for f in dep.stdout.split()), dep.stdout
        running = answer("/api/daemon")["pid"]

        # 3.0.0 cannot start: its trial run fails, the service never stops, nothing is switched.
        publish_wheel(server, wheels["3.0.0"])
        r = http.post("/api/update/apply")
        assert r.status_code == 202, r.text
        done = outcome(r.json()["attempt"])
        assert done["state"] == "rolled_back" and "trial run" in done["reason"], done
        assert "the service kept running 2.0.0" in done["reason"]
        assert answer("/api/daemon")["pid"] == running and unit.history == [75]
        assert (state / "current").resolve() == release_dir and not (state / "releases" / "3.0.0").exists()

        # 4.0.0 passes its trial run but dies under the unit: ExecStopPost switches back, the unit restarts
        # the previous release.
        publish_wheel(server, wheels["4.0.0"])
        r = http.post("/api/update/apply")
        assert r.status_code == 202, r.text
        done = outcome(r.json()["attempt"])
        assert done["state"] == "rolled_back", done
        assert "4.0.0 stopped before it answered" in done["reason"] and "exit status 1" in done["reason"]
        assert answer("/api/ping")["version"] == "2.0.0"
        assert unit.history == [75, 75, 1]
        assert (state / "current").resolve() == release_dir
    finally:
        unit.stop()
        http.close()
        server.close()
    # No step wrote to the install tree, and everything the node wrote belongs to its user.
    assert install_tree_listing(tree["venv"].parent) == before
    foreign = [str(p) for p in state.rglob("*") if p.lstat().st_uid != service_user.pw_uid]
    assert foreign == []
    assert json.loads((state / "update-status.json").read_text())["state"] == "rolled_back"
