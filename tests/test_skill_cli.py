"""Every skill command against one real node, found by discovery (no --url): human output, --json output,
and errors as one `pinkybrain: ...` line with a non-zero status.

Most runs go through typer's CliRunner in this process (an interpreter start per command would make this
file slow); a few run the installed console script to check what a user really sees.
"""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
from typer.testing import CliRunner

from model import write_tiny_gguf
from nodes import RunningNode, node_env, run_cli, start_node
from pinkybrain.cli import build_app


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> RunningNode:
    running = start_node(tmp_path_factory.mktemp("skill-cli") / "node")
    write_tiny_gguf(running.home / "shared_models" / "tiny.gguf")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def node_id(node) -> str:
    return node.get("/api/ping").json()["node_id"]


@pytest.fixture
def cli(node, tmp_path, monkeypatch):
    """Run a command in-process, discovering the node through the (redirected) localhost port. The CLI has
    a home of its own into which the node's owner key was imported (`owner-key import`), as an owner who
    drives the node from another machine does."""
    monkeypatch.chdir(tmp_path)  # no stray ./pinkybrain.yaml
    env = {"P2P_SECRET": node.secret, "PINKYBRAIN_DISCOVERY_PORTS": str(node.port),
           "PINKYBRAIN_HOME": str(tmp_path / "cli-home"), "PINKYBRAIN_URL": None, "PINKYBRAIN_CONFIG": None,
           "PINKYBRAIN_MDNS_TIMEOUT": "0", "PINKYBRAIN_DEBUG": None, "PINKYBRAIN_CREDENTIAL": None}
    app = build_app()
    runner = CliRunner()
    token = runner.invoke(app, ["owner-key", "export"], env={**env, "PINKYBRAIN_HOME": str(node.home)}).stdout
    imported = runner.invoke(app, ["owner-key", "import", token.strip()], env=env)
    assert imported.exit_code == 0, imported.stderr

    def run(*args: str, ok: bool = True, extra_env: dict | None = None):
        result = runner.invoke(app, list(args), env={**env, **(extra_env or {})})
        combined = result.stdout + result.stderr
        assert "Traceback" not in combined
        # Exit via typer.Exit/SystemExit only: any other exception escaped the one-line error handling.
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        if ok:
            assert result.exit_code == 0, f"{args}: {result.stderr}"
            assert result.stdout.strip(), f"{args} printed nothing"
        else:
            assert result.exit_code != 0, f"{args} should have failed: {result.stdout}"
            # A streamed query may have shown its progress line ("loading MODEL (size)… Ns") first.
            lines = [ln for ln in result.stderr.strip().splitlines() if not ln.startswith("loading ")]
            assert len(lines) == 1 and lines[0].startswith("pinkybrain: "), result.stderr
        return result

    return run


READ_ONLY = [
    ["status"], ["ping"], ["capabilities"], ["daemon", "status"], ["models", "list"], ["peers"], ["discover"],
    ["conversations", "list"], ["conversations", "search", "quantum"], ["update", "check"], ["mesh", "leave"],
    ["memory", "list"],
]


@pytest.mark.parametrize("args", READ_ONLY, ids=lambda a: " ".join(a))
def test_command_human_and_json(cli, args):
    cli(*args)
    parsed = json.loads(cli(*args, "--json").stdout)
    assert isinstance(parsed, dict)


def test_status_summary(cli, node, node_id):
    out = cli("status").stdout
    assert node_id in out and "test-node" in out
    assert "CPU" in out and "RAM" in out and "/ 100%" in out  # thresholds from the test config
    assert f"found via localhost:{node.port}" in out


def test_ping_reports_discovery_step(cli, node, node_id):
    answer = json.loads(cli("ping", "--json").stdout)
    assert answer["pong"] is True and answer["node_id"] == node_id
    assert answer["discovered_via"] == f"localhost:{node.port}"
    assert answer["url"] == f"http://localhost:{node.port}"


def test_memory_round_trip(cli):
    # The store keeps this module's node state; keys are unique to this test.
    cli("memory", "set", "cli/obj", '{"a": [1, 2]}')
    assert json.loads(cli("memory", "get", "cli/obj", "--json").stdout)["value"] == {"a": [1, 2]}
    assert json.loads(cli("memory", "get", "cli/obj").stdout) == {"a": [1, 2]}

    cli("memory", "set", "cli/text", "hello world")
    assert cli("memory", "get", "cli/text").stdout == "hello world\n"
    cli("memory", "set", "cli/num", "42")  # a bare number stays the string the user typed
    assert json.loads(cli("memory", "get", "cli/num", "--json").stdout)["value"] == "42"
    cli("memory", "set", "cli/num", "42", "--json-value")
    assert json.loads(cli("memory", "get", "cli/num", "--json").stdout)["value"] == 42
    cli("memory", "set", "cli/str", '{"a": 1}', "--string")
    assert json.loads(cli("memory", "get", "cli/str", "--json").stdout)["value"] == '{"a": 1}'

    listed = json.loads(cli("memory", "list", "--prefix", "cli/", "--json").stdout)
    assert set(listed["keys"]) >= {"cli/obj", "cli/text", "cli/num", "cli/str"}
    assert "cli/obj" in cli("memory", "list", "--prefix", "cli/").stdout.split()

    cli("memory", "delete", "cli/obj")
    cli("memory", "get", "cli/obj", ok=False)
    assert "cli/obj" not in json.loads(cli("memory", "list", "--json").stdout)["keys"]

    err = cli("memory", "set", "cli/bad", "{not json", "--json-value", ok=False).stderr
    assert "--json-value" in err
    cli("memory", "set", "cli/bad", "x", "--json-value", "--string", ok=False)


def test_models_share_and_unshare(cli):
    listed = json.loads(cli("models", "list", "--json").stdout)
    assert [m["name"] for m in listed["models"]] == ["tiny"]
    assert "tiny" in cli("models", "list").stdout

    shared = json.loads(cli("models", "share", "tiny", "--force", "--json").stdout)
    assert shared["shared"] is True and shared["entry"]["name"] == "tiny"
    assert cli("models", "unshare", "tiny").stdout.startswith("stopped sharing tiny")
    cli("models", "share", "tiny")
    cli("models", "unshare", "tiny")

    assert "no model" in cli("models", "share", "missing", ok=False).stderr


def test_score(cli, node_id):
    assert node_id in cli("score", node_id).stdout
    answer = json.loads(cli("score", node_id, "--json").stdout)
    assert answer["peer"] == node_id and isinstance(answer["score"], (int, float))

    err = cli("score", "not-a-node-id", ok=False).stderr
    assert "not a node id" in err


def test_query_errors(cli):
    err = cli("query", "hello", "--mode", "bogus", ok=False).stderr
    assert "unknown mode 'bogus'" in err
    for mode in ("single", "vote", "chain", "fuse", "compare", "specialist"):
        assert mode in err
    err = cli("query", "hello", "--mode", "bogus", "--json", ok=False).stderr
    assert "valid modes" in err


def test_conversation_errors(cli):
    assert "no conversation" in cli("conversations", "export", "no-such-session", ok=False).stderr
    err = cli("conversations", "set-privacy", "some-session", "secret", ok=False).stderr
    assert "private, peers-only, public" in err
    cli("conversations", "export", "some-session", "--format", "pdf", ok=False)


def test_url_flag_and_unreachable_node(cli, node):
    answer = json.loads(cli("ping", "--json", "--url", node.url).stdout)
    assert answer["discovered_via"] == "url-flag"
    err = cli("status", "--url", "http://127.0.0.1:9", ok=False).stderr
    assert "cannot reach the node at http://127.0.0.1:9" in err


def test_console_script_errors_are_one_line(node, node_id, tmp_path):
    """The installed `pinkybrain`, as a user runs it: output and errors without tracebacks."""
    env = node_env(tmp_path / "cli-home", {"P2P_SECRET": node.secret, "PINKYBRAIN_URL": node.url})
    ok = run_cli("status", "--json", env=env, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["node_id"] == node_id

    bad = run_cli("score", "XYZ", env=env, cwd=tmp_path)
    assert bad.returncode == 1
    assert bad.stderr.startswith("pinkybrain: not a node id") and bad.stderr.count("\n") == 1
    assert "Traceback" not in bad.stdout + bad.stderr


def test_skill_does_not_import_node_code():
    code = ("import sys, pinkybrain.skill.cli, pinkybrain.skill.discovery, pinkybrain.skill.client, "
            "pinkybrain.skill.localconfig, pinkybrain.skill.output; "
            "print([m for m in sys.modules if m.startswith('pinkybrain.node')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_api_keys_are_issued_by_the_owner_and_shown_once(cli, node):
    import httpx

    first = json.loads(cli("openai-key", "--json").stdout)
    # The URL of the node this command actually talked to (found on its own port, not 8080).
    assert first["base_url"] == f"http://localhost:{node.port}/v1"
    assert first["api_key"].startswith("pbk-")
    again = json.loads(cli("openai-key", "--json").stdout)
    assert again["api_key"] == first["api_key"]  # shown again from this machine's 0600 copy, still valid

    created = json.loads(cli("keys", "create", "app1", "--scope", "query", "--json").stdout)
    key = created["api_key"]
    listed = cli("keys", "list", "--json").stdout
    assert "app1" in listed and key not in listed and first["api_key"] not in listed  # only hashes are kept
    stored = (node.home / "api-keys.json").read_text()
    assert key not in stored and oct((node.home / "api-keys.json").stat().st_mode & 0o777) == "0o600"

    with httpx.Client(base_url=node.url, timeout=30) as raw:
        models = raw.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert models.status_code == 200
        assert "app1" in cli("keys", "create", "app1", ok=False).stderr  # names are unique
        cli("keys", "revoke", "app1")
        assert raw.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    rotated = json.loads(cli("openai-key", "--rotate", "--json").stdout)
    assert rotated["api_key"] != first["api_key"]

    # The same machine without the owner key (only the network secret): a peer cannot issue keys.
    as_member = {"PINKYBRAIN_CREDENTIAL": "mesh"}
    err = cli("keys", "list", ok=False, extra_env=as_member).stderr
    assert "owner" in err and "mesh member" in err
    assert "only the owner" in cli("openai-key", ok=False, extra_env=as_member).stderr
def test_sealed_requests_work_end_to_end(cli, node, monkeypatch):
    """PINKYBRAIN_SEAL=always seals on loopback as off it: memory, a search text in the query string, error
    answers and a streamed query all travel sealed and come back opened."""
    from pinkybrain.skill.client import NodeClient

    monkeypatch.setenv("PINKYBRAIN_SEAL", "always")
    cli("memory", "set", "sealed/k", "a sealed välue")
    assert cli("memory", "get", "sealed/k").stdout == "a sealed välue\n"
    assert "sealed/k" in json.loads(cli("memory", "list", "--prefix", "sealed/", "--json").stdout)["keys"]
    assert json.loads(cli("conversations", "search", "sealed search text", "--json").stdout)["query"] == \
        "sealed search text"
    assert "no memory key" in cli("memory", "get", "sealed/missing", ok=False).stderr
    assert "unknown mode" in cli("query", "hello", "--mode", "bogus", "--stream", ok=False).stderr
    cli("query", "hello", "--stream", ok=False)  # tiny.gguf is not a real model: one line, no traceback

    # On the wire: the body and the query string are sealed, and so is the answer.
    wire: list[httpx.Request] = []
    answers: list[httpx.Response] = []
    with NodeClient(node.url, node.secret) as client:
        client._http.event_hooks["request"].append(wire.append)
        client._http.event_hooks["response"].append(answers.append)
        assert client.get("/api/memory/sealed%2Fk")["value"] == "a sealed välue"
        client.post("/api/conversations/search", params={"q": "sealed search text"})
    assert [r.url.path for r in wire] == ["/api/ping", "/api/memory/sealed/k", "/api/conversations/search"]
    assert all(r.url.query == b"" and "x-pinkybrain-seal" in r.headers for r in wire[1:])
    assert b"sealed search text" not in wire[2].content
    assert [a.headers.get("x-pinkybrain-sealed") for a in answers] == [None, "1", "1"]
@pytest.mark.parametrize("key", [".", "..", "a/b", "../up", "a/./b", "a/../b", "/lead", "trail/", "%2e", "x?y#z"])
def test_memory_keys_with_dots_and_slashes_work(cli, key):
    value = f"value of {key}"
    cli("memory", "set", key, value, "--string")
    got = json.loads(cli("memory", "get", key, "--json").stdout)
    assert got["key"] == key and got["value"] == value, got  # that key, not a listing or another key
    assert key in json.loads(cli("memory", "list", "--json").stdout)["keys"]
    cli("memory", "delete", key)
    assert "no memory key" in cli("memory", "get", key, ok=False).stderr


@pytest.mark.parametrize("args,what", [
    (["models", "share", "sub/tiny"], "model name"), (["models", "unshare", ".."], "model name"),
    (["score", "a/b"], "node id"), (["conversations", "export", "x/y"], "session id"),
])
def test_names_that_cannot_be_names_are_refused_with_the_reason(cli, args, what):
    err = cli(*args, ok=False).stderr
    assert f"cannot be a {what}" in err and "'/'" in err and "Not Found" not in err
