"""Real node processes for tests: each in its own PINKYBRAIN_HOME, on 127.0.0.x, signed calls via httpx."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from pinkybrain.skill.signing import HmacAuth


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def strong_secret() -> str:
    return secrets.token_urlsafe(32)


class OwnerAuth(HmacAuth):
    """Requests signed with the owner key the node in `home` created (identity init, or its first start),
    read at each request: before the node has made it, the request is signed with a key that cannot match
    (the node is not answering yet anyway)."""

    def __init__(self, home: Path):
        super().__init__("", credential="owner")
        self.home = Path(home)

    def auth_flow(self, request):
        try:
            self.secret = json.loads((self.home / "owner.key").read_text())["key"]
        except FileNotFoundError:
            self.secret = "0" * 64
        yield from super().auth_flow(request)


def owner_auth(home: Path) -> HmacAuth:
    return OwnerAuth(home)


@dataclass
class RunningNode:
    home: Path
    host: str
    port: int
    secret: str
    config_path: Path
    proc: subprocess.Popen | None
    env: dict
    log_path: Path
    extra: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def owner_key(self) -> str | None:
        """The owner key the node created in its home at start (None before it has)."""
        try:
            return json.loads((self.home / "owner.key").read_text())["key"]
        except FileNotFoundError:
            return None

    def client(self, secret: str | None = None) -> httpx.Client:
        """Signed as the node's owner (the test drives its own node), or as a mesh member with `secret`."""
        owner = None if secret is not None else self.owner_key()
        auth = HmacAuth(owner, credential="owner") if owner else HmacAuth(secret or self.secret)
        # Generous: sharing hashes a 250 MB model and CI machines may be loaded; a hang still ends.
        return httpx.Client(base_url=self.url, auth=auth, timeout=180)

    def member(self) -> httpx.Client:
        """Signed with the network secret only: what any mesh member can send."""
        return self.client(secret=self.secret)

    def get(self, path: str, **kw) -> httpx.Response:
        with self.client() as c:
            return c.get(path, **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        with self.client() as c:
            return c.post(path, **kw)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def write_node_config(
    home: Path, *, host: str, port: int, secret: str | None, extra: dict | None = None
) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    cfg: dict = {
        "node": {"name": f"test-{home.name}", "port": port},
        # Tests never reach the internet: the default tracker is a closed local port unless a test sets one.
        "p2p": {"listen": f"{host}:{port}", "mdns": False, "tracker": "ws://127.0.0.1:9"},
        "sharing": {"shared_models_dir": str(home / "shared_models")},
        "resource_guard": {"cpu_threshold": 100, "ram_threshold": 100, "sample_secs": 0.5},
    }
    if secret is not None:
        cfg["p2p"]["secret"] = secret
    for dotted, value in (extra or {}).items():
        section, key = dotted.split(".", 1)
        cfg.setdefault(section, {})[key] = value
    (home / "shared_models").mkdir(exist_ok=True)
    path = home / "pinkybrain.yaml"
    path.write_text(yaml.safe_dump(cfg))
    path.chmod(0o600)
    return path


def node_env(home: Path, extra_env: dict | None = None) -> dict:
    env = {
        k: v for k, v in os.environ.items() if k not in ("P2P_SECRET", "PINKYBRAIN_URL", "PINKYBRAIN_CONFIG")
    }
    env.update({"PINKYBRAIN_HOME": str(home), "PYTHONUNBUFFERED": "1"})
    env.update(extra_env or {})
    return env


def start_node(
    home: Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    secret: str | None = None,
    extra: dict | None = None,
    extra_env: dict | None = None,
    wait: bool = True,
    timeout: float = 60,
) -> RunningNode:
    port = port or free_port(host)
    secret = secret or strong_secret()
    config_path = write_node_config(home, host=host, port=port, secret=secret, extra=extra)
    env = node_env(home, extra_env)
    log_path = home / "test-node.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pinkybrain.node", "serve", "--config", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(home),
        )
    node = RunningNode(home, host, port, secret, config_path, proc, env, log_path)
    if wait:
        wait_until_up(node, timeout)
    return node


def wait_until_up(node: RunningNode, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.proc is not None and node.proc.poll() is not None:
            raise RuntimeError(f"node exited with {node.proc.returncode}:\n{node.log()}")
        try:
            if node.get("/api/ping").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"node did not come up in {timeout}s:\n{node.log()}")


def run_cli(
    *args: str, env: dict, cwd: Path | None = None, timeout: float = 120, input: str | None = None
) -> subprocess.CompletedProcess:
    """Run the `pinkybrain` console script as a user would."""
    exe = Path(sys.executable).with_name("pinkybrain")
    return subprocess.run(
        [str(exe), *args],
        env=env,
        cwd=str(cwd) if cwd else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
    )


def wait_for(check, timeout: float, what: str, interval: float = 0.05):
    """Poll `check` until it returns something truthy (returned), or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def query_events(node: RunningNode, body: dict, on_event=None, timeout: float = 180) -> list[tuple[str, dict]]:
    """The server-sent events of a streamed POST /api/query, as (event, data); `on_event(event, data)` is
    called as each arrives. A read waits `timeout` at most, so a hang fails."""
    events, event = [], None
    with node.client() as c:
        c.timeout = timeout
        with c.stream("POST", "/api/query", json={**body, "stream": True}) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    events.append((event, json.loads(line[5:])))
                    if on_event:
                        on_event(event, events[-1][1])
    return events
