"""The skill's node discovery, end to end: the `pinkybrain` CLI as a subprocess against real nodes.

Each step of the seed's order is shown to be taken, and taken in order. The localhost ports are
redirected with PINKYBRAIN_DISCOVERY_PORTS so nothing on the machine's real 8080/8081 interferes, and
PATH holds only a folder of our own, so a real `tailscale` can never answer for the fake one. mDNS is
browsed only where a test is about it, on loopback, and there a node with another secret (any other
PinkyBrain node advertising on this machine) is passed over: .ci/run runs the suite with one advertising.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from nodes import RunningNode, free_port, node_env, run_cli, start_node, strong_secret, wait_until_up


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    """Three nodes sharing one secret: two on localhost ports, one on another loopback address."""
    base = tmp_path_factory.mktemp("discovery")
    secret = strong_secret()
    started: dict[str, RunningNode] = {}
    try:
        # Started together, then awaited: the three start-ups overlap.
        started["first"] = start_node(base / "first", secret=secret, wait=False)
        started["second"] = start_node(base / "second", secret=secret, wait=False)
        started["other"] = start_node(base / "other", host="127.0.0.2", secret=secret, wait=False)
        for node in started.values():
            wait_until_up(node)
        yield started
    finally:
        for node in started.values():
            node.stop()


def node_id(node: RunningNode) -> str:
    return node.get("/api/ping").json()["node_id"]


def unused_port() -> int:
    """A port nothing listens on at 127.0.0.1 (nor at 127.0.0.2, where the 'other' node lives)."""
    while True:
        port = free_port()
        if not listening("127.0.0.2", port):
            return port


def listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def cli_env(tmp_path: Path, *, secret: str | None, ports: list[int], mdns_secs: float = 0, **extra: str) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    env = node_env(tmp_path / "cli-home", {
        "PINKYBRAIN_DISCOVERY_PORTS": ",".join(str(p) for p in ports),
        "PINKYBRAIN_MDNS_TIMEOUT": str(mdns_secs),
        "PATH": str(bin_dir),
        **extra,
    })
    if secret is not None:
        env["P2P_SECRET"] = secret
    return env


def ping(tmp_path: Path, env: dict, *args: str) -> dict:
    result = run_cli("ping", "--json", *args, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def fake_tailscale(tmp_path: Path, status: dict) -> None:
    script = tmp_path / "bin" / "tailscale"
    script.parent.mkdir(exist_ok=True)
    script.write_text(
        f"#!{sys.executable}\nimport sys\n"
        f"assert sys.argv[1:] == ['status', '--json'], sys.argv\n"
        f"print({json.dumps(json.dumps(status))})\n"
    )
    script.chmod(0o755)


def test_env_var_wins_over_localhost(nodes, tmp_path):
    first, other = nodes["first"], nodes["other"]
    env = cli_env(tmp_path, secret=first.secret, ports=[first.port], PINKYBRAIN_URL=f"{other.url}/")
    answer = ping(tmp_path, env)
    assert answer["discovered_via"] == "env"
    assert answer["node_id"] == node_id(other)
    assert answer["url"] == other.url


def test_dead_env_url_is_an_error_not_a_fallback(nodes, tmp_path):
    """A node on the first discovery port would answer, but the user named another URL: that one
    answers or the command fails; it never quietly answers from somewhere else."""
    first = nodes["first"]
    dead = f"http://127.0.0.1:{unused_port()}"
    env = cli_env(tmp_path, secret=first.secret, ports=[first.port], PINKYBRAIN_URL=dead)
    result = run_cli("ping", "--json", env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    error = json.loads(result.stderr)  # --json: the error is one JSON object on stderr
    assert error["exit_code"] == 1
    assert error["error"].startswith(f"PINKYBRAIN_URL={dead} does not answer (connection refused)")
    assert "unset PINKYBRAIN_URL" in error["error"]
    plain = run_cli("status", env=env, cwd=tmp_path)
    assert plain.returncode == 1 and plain.stderr.startswith(f"pinkybrain: PINKYBRAIN_URL={dead} does not")


def test_dead_url_flag_is_an_error_not_a_fallback(nodes, tmp_path):
    first = nodes["first"]
    dead = f"127.0.0.1:{unused_port()}"
    env = cli_env(tmp_path, secret=first.secret, ports=[first.port])
    result = run_cli("ping", "--url", dead, env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == f"pinkybrain: cannot reach the node at http://{dead}: connection refused"


def test_first_localhost_port_wins(nodes, tmp_path):
    first, second = nodes["first"], nodes["second"]
    answer = ping(tmp_path, cli_env(tmp_path, secret=first.secret, ports=[first.port, second.port]))
    assert answer["discovered_via"] == f"localhost:{first.port}"
    assert answer["node_id"] == node_id(first)


def test_second_localhost_port_when_first_is_free(nodes, tmp_path):
    second = nodes["second"]
    answer = ping(tmp_path, cli_env(tmp_path, secret=second.secret, ports=[unused_port(), second.port]))
    assert answer["discovered_via"] == f"localhost:{second.port}"
    assert answer["node_id"] == node_id(second)


def test_configured_port_and_secret_from_the_config_file(nodes, tmp_path):
    """No P2P_SECRET: the secret comes from pinkybrain.yaml, whose port is probed before the default ones."""
    first, second = nodes["first"], nodes["second"]
    env = cli_env(tmp_path, secret=None, ports=[first.port])
    home = Path(env["PINKYBRAIN_HOME"])
    home.mkdir(parents=True)
    (home / "pinkybrain.yaml").write_text(yaml.safe_dump({"node": {"port": second.port},
                                                          "p2p": {"secret": second.secret}}))
    answer = ping(tmp_path, env)
    assert answer["discovered_via"] == f"localhost:{second.port}"
    assert answer["node_id"] == node_id(second)

    # A node bound to one address is looked for there (here 127.0.0.2), not on localhost.
    other = nodes["other"]
    (home / "pinkybrain.yaml").write_text(yaml.safe_dump({"p2p": {"secret": other.secret,
                                                                  "listen": f"127.0.0.2:{other.port}"}}))
    answer = ping(tmp_path, env)
    assert answer["discovered_via"] == f"127.0.0.2:{other.port}"
    assert answer["node_id"] == node_id(other)


def test_tailscale_peer(nodes, tmp_path):
    other = nodes["other"]
    assert not listening("127.0.0.1", other.port), "the port must be free on localhost for this test"
    fake_tailscale(tmp_path, {
        "Self": {"HostName": "me", "TailscaleIPs": ["127.0.0.9", "fd7a:115c:a1e0::9"], "Online": True},
        "Peer": {
            "nodekey:aaa": {"HostName": "asleep", "TailscaleIPs": ["127.0.0.1"], "Online": False},
            "nodekey:bbb": {"HostName": "box", "TailscaleIPs": ["127.0.0.2", "fd7a:115c:a1e0::2"], "Online": True},
        },
    })
    answer = ping(tmp_path, cli_env(tmp_path, secret=other.secret, ports=[other.port]))
    assert answer["discovered_via"] == "tailscale"
    assert answer["node_id"] == node_id(other)
    assert answer["url"] == other.url


def test_mdns(node_factory, tmp_path):
    advertised = node_factory(host="127.0.0.3", extra={"p2p.mdns": True})
    env = cli_env(tmp_path, secret=advertised.secret, ports=[unused_port()], mdns_secs=10,
                  PINKYBRAIN_MDNS_INTERFACES="127.0.0.1")
    assert not (Path(env["PATH"]) / "tailscale").exists()
    answer = ping(tmp_path, env)
    assert answer["discovered_via"] == "mdns"
    assert answer["node_id"] == node_id(advertised)
    assert answer["url"] == advertised.url


def test_wrong_secret_is_reported_not_skipped(nodes, tmp_path):
    first = nodes["first"]
    # mDNS off: another node advertising on this machine or the LAN would be a second refusal.
    env = cli_env(tmp_path, secret=strong_secret(), ports=[first.port], mdns_secs=0)
    result = run_cli("status", env=env, cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip() == (
        f"pinkybrain: found a node at http://localhost:{first.port}, but the secret does not match (P2P_SECRET)"
    )
    assert "Traceback" not in result.stderr + result.stdout


def test_no_node_at_all(tmp_path):
    ports = [unused_port(), unused_port()]
    # mDNS off: a node advertising on this machine or the LAN is not "no node" (test_mdns covers mDNS).
    result = run_cli("ping", env=cli_env(tmp_path, secret=strong_secret(), ports=ports, mdns_secs=0),
                     cwd=tmp_path)
    assert result.returncode != 0
    line = result.stderr.strip()
    assert line.startswith("pinkybrain: no PinkyBrain node found; tried: ")
    assert "\n" not in line
    assert f"localhost:{ports[0]}" in line and f"localhost:{ports[1]}" in line
    assert "tailscale (not installed)" in line
    assert "mDNS (disabled: PINKYBRAIN_MDNS_TIMEOUT=0)" in line


def test_no_secret_at_all(tmp_path):
    result = run_cli("ping", env=cli_env(tmp_path, secret=None, ports=[unused_port()]), cwd=tmp_path)
    assert result.returncode != 0
    assert "set P2P_SECRET" in result.stderr
    assert "Traceback" not in result.stderr


def test_url_flag_skips_discovery(nodes, tmp_path):
    first, other = nodes["first"], nodes["other"]
    env = cli_env(tmp_path, secret=first.secret, ports=[first.port], PINKYBRAIN_URL=first.url)
    answer = ping(tmp_path, env, "--url", other.url.removeprefix("http://"))
    assert answer["discovered_via"] == "url-flag"
    assert answer["node_id"] == node_id(other)


class FakeResponder:
    """What an mDNS or Tailscale responder that is not a node of ours can do: answer `{"pong": true}` to
    any ping and 200 to anything else, without holding the secret. It records every request it gets."""

    def __init__(self):
        self.requests: list[tuple[str, str, bytes]] = []
        seen = self.requests

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("content-length") or 0)
                seen.append((self.command, self.path, self.rfile.read(length) if length else b""))
                body = json.dumps({"pong": True, "node_id": "FAKE", "key": "k", "value": "v", "stored": True})
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                # Headers shaped like a node's proof, made without the secret: they must not pass.
                self.send_header("x-pinkybrain-node", "FAKE")
                self.send_header("x-pinkybrain-proof", "00" * 32)
                self.send_header("x-pinkybrain-node-sig", "AAAA")
                self.end_headers()
                self.wfile.write(body.encode())

            do_GET = do_POST = do_DELETE = _answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    responder = FakeResponder()
    yield responder
    responder.close()


def test_discovery_skips_a_responder_that_cannot_prove_itself(nodes, fake, tmp_path):
    """The fake answers ping on the first port probed; discovery goes past it to the real node."""
    second = nodes["second"]
    env = cli_env(tmp_path, secret=second.secret, ports=[fake.port, second.port])
    answer = ping(tmp_path, env)
    assert answer["discovered_via"] == f"localhost:{second.port}"
    assert answer["node_id"] == node_id(second)
    assert [r[:2] for r in fake.requests] == [("GET", "/api/ping")]  # probed, then nothing more

    verbose = run_cli("ping", "--verbose", env=env, cwd=tmp_path)
    assert verbose.returncode == 0, verbose.stderr
    assert verbose.stderr.strip() == (
        f"pinkybrain: skipped http://localhost:{fake.port} (localhost:{fake.port}): the responder at "
        f"http://localhost:{fake.port} is not a proven node of your network (its node proof does not match "
        f"our secret); its answer is refused")

    # Alone, the fake is not taken for a node either.
    alone = run_cli("status", env=cli_env(tmp_path, secret=second.secret, ports=[fake.port]), cwd=tmp_path)
    assert alone.returncode == 1
    assert alone.stderr.startswith(f"pinkybrain: the responder at http://localhost:{fake.port} is not a proven node")
    assert alone.stderr.count("\n") == 1


def test_url_to_a_fake_responder_is_refused_before_anything_is_sent(nodes, fake, tmp_path):
    first = nodes["first"]
    env = cli_env(tmp_path, secret=first.secret, ports=[first.port])
    for args in (["ping"], ["status", "--json"], ["memory", "set", "note", "the-memory-value-for-nobody"],
                 ["query", "a prompt for nobody"]):
        result = run_cli(*args, "--url", fake.url, env=env, cwd=tmp_path)
        assert result.returncode == 1, (args, result.stdout)
        message = (f"the responder at {fake.url} is not a proven node of your network "
                   f"(its node proof does not match our secret); its answer is refused")
        if "--json" in args:  # --json: the error is one JSON object on stderr
            assert json.loads(result.stderr) == {"error": message, "exit_code": 1}
        else:
            assert result.stderr == f"pinkybrain: {message}\n"
        assert result.stdout == ""
    # Only pings reached it: no memory value, no prompt.
    assert {r[:2] for r in fake.requests} == {("GET", "/api/ping")}
    assert b"nobody" not in b"".join(r[2] for r in fake.requests)


def test_pinned_node_id_refuses_any_other_node(nodes, tmp_path):
    first, second = nodes["first"], nodes["second"]
    first_id, second_id = node_id(first), node_id(second)
    env = cli_env(tmp_path, secret=first.secret, ports=[first.port], PINKYBRAIN_NODE=second_id)
    result = run_cli("status", env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == (f"pinkybrain: found node {first_id} at http://localhost:{first.port}, not the pinned "
                             f"node {second_id}; unpin with --node / PINKYBRAIN_NODE\n")

    # Discovery goes past the first node to the pinned one (and says so with --verbose).
    env["PINKYBRAIN_DISCOVERY_PORTS"] = f"{first.port},{second.port}"
    answer = ping(tmp_path, env)
    assert answer["node_id"] == second_id and answer["discovered_via"] == f"localhost:{second.port}"
    verbose = run_cli("ping", "--verbose", env=env, cwd=tmp_path)
    assert f"skipped http://localhost:{first.port}" in verbose.stderr and "not the pinned node" in verbose.stderr

    # --node beats the variable; ids are accepted in any case and without dashes.
    answer = ping(tmp_path, env, "--node", first_id.replace("-", "").lower())
    assert answer["node_id"] == first_id

    # --url to a real node that is not the pinned one: refused, nothing else sent.
    result = run_cli("memory", "set", "k", "v", "--url", first.url, env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == (f"pinkybrain: the responder at {first.url} is not a proven node of your network "
                             f"(it is node {first_id}, not {second_id}); its answer is refused\n")
    with first.client() as c:
        assert c.get("/api/memory/k").status_code == 404

    bad = run_cli("status", "--node", "not-a-node-id", env=env, cwd=tmp_path)
    assert bad.returncode == 1 and bad.stderr.startswith("pinkybrain: --node: not a node id")
