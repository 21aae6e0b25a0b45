"""Owner, mesh member, public peer: three real nodes on one network secret.

    A  the node under attack: a full node runtime served by uvicorn on a real 127.0.0.1 socket, in this
       process so respx can stand in for its cloud provider (OpenAI); owns a cloud model `gpt` and a
       tiny GGUF, holds conversations at each privacy level.
    B  a peer (own process, same secret, linked to A): its user has B's owner key, never A's.
    C  another peer (own process, same secret, linked to A).
    D  a public peer: only an Ed25519 identity, vouched for by A's owner; E: one nobody vouched for.

Checked: every owner-only route (core.principals.ROUTES) from B's and C's side, signed with the secret,
and from D's, is 403 with a one-line reason while A's owner gets 200 (or, for the routes that reach
outside, an answer that is not a refusal); the same for every owner-only CLI command run on B's machine
with --url A, and they succeed on A's machine (the skill finds A's owner key by itself); a peer's query
naming A's cloud model (/api/query, streaming, /v1 signed, /v1 with a query-scope key, through the mesh)
is refused and the provider is never called, while the owner's reaches it; the key derived from the
secret (the old /v1 key) no longer opens /v1; conversation privacy levels for each principal, and a
change of level applies at once; the auth middleware answers before reading a body it will refuse.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import threading
import time

import httpx
import pytest
import respx
import uvicorn
from typer.testing import CliRunner

from model import write_tiny_gguf
from nodes import free_port, start_node, strong_secret, write_node_config
from pinkybrain.cli import build_app
from pinkybrain.node.api.app import create_app
from pinkybrain.node.core.config import load_config
from pinkybrain.node.core.identity import Identity, save_identity
from pinkybrain.node.core.principals import ROUTES, Principal, RouteTable, render_route_table
from pinkybrain.node.services.runtime import NodeRuntime
from pinkybrain.skill.signing import HmacAuth, PeerAuth, signature_headers

OPENAI = "https://api.openai.com/v1/chat/completions"
WORDS = {"private": "aardvark", "peers-only": "bison", "public": "cheetah"}  # one word only each session has


def openai_reply(text: str) -> httpx.Response:
    return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": text},
                                                  "finish_reason": "stop"}],
                                     "usage": {"prompt_tokens": 5, "completion_tokens": 3}})


class InProcessNode:
    """A real node runtime and API on a real socket, in this process (so respx reaches its cloud calls)."""

    def __init__(self, home, secret: str, extra: dict):
        self.home, self.secret, self.port = home, secret, free_port()
        config = write_node_config(home, host="127.0.0.1", port=self.port, secret=secret, extra=extra)
        saved = os.environ.get("PINKYBRAIN_HOME")
        os.environ["PINKYBRAIN_HOME"] = str(home)
        try:
            cfg = load_config(str(config))
        finally:
            os.environ.pop("PINKYBRAIN_HOME") if saved is None else os.environ.__setitem__("PINKYBRAIN_HOME", saved)
        self.identity = Identity.generate()
        save_identity(self.identity, cfg.identity_path)
        self.runtime = NodeRuntime(cfg, self.identity, bind_host="127.0.0.1", port=self.port)
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.runtime), host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "in-process node did not start"
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    def owner(self) -> httpx.Client:
        key = json.loads((self.home / "owner.key").read_text())["key"]
        return httpx.Client(base_url=self.url, auth=HmacAuth(key, credential="owner"), timeout=60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    base = tmp_path_factory.mktemp("principals")
    secret = strong_secret()
    saved_key = os.environ.get("OPENAI_API_KEY")
    os.environ["OPENAI_API_KEY"] = "sk-test-openai"
    with respx.mock(assert_all_called=False) as router:
        router.route(host="127.0.0.1").pass_through()  # our own nodes: real sockets
        provider = router.post(OPENAI).mock(side_effect=lambda request: openai_reply("Mammals, yes."))
        a = InProcessNode(base / "a", secret, {
            "cloud.models": [{"name": "gpt", "provider": "openai", "model": "gpt-4o-mini"}],
            "update.url": "http://127.0.0.1:9/feed.json",  # nothing there: an owner's update attempt fails fast
            "p2p.heartbeat_secs": 0.5,
        })
        write_tiny_gguf(a.home / "shared_models" / "tiny.gguf")
        peers = []
        try:
            for name in ("b", "c"):
                peers.append(start_node(base / name, secret=secret,
                                        extra={"p2p.peers": [a.url], "p2p.heartbeat_secs": 0.5}))
            with a.owner() as owner:
                deadline = time.monotonic() + 60
                while owner.get("/api/peers").json()["count"] < 2:
                    assert time.monotonic() < deadline, "B and C did not link to A"
                    time.sleep(0.2)
                sessions = {}
                for level, word in WORDS.items():
                    answer = owner.post("/api/query", json={"prompt": f"Is the {word} a mammal?", "model": "gpt"})
                    assert answer.status_code == 200, answer.text
                    sessions[level] = answer.json()["session_id"]
                    owner.post(f"/api/conversations/{sessions[level]}/privacy",
                               json={"privacy": level}).raise_for_status()
            assert provider.call_count == 3  # the mock is wired: the owner's queries reached it
            yield {"a": a, "b": peers[0], "c": peers[1], "secret": secret, "sessions": sessions,
                   "provider": provider}
        finally:
            for node in peers:
                node.stop()
            a.stop()
            if saved_key is None:
                os.environ.pop("OPENAI_API_KEY", None)
            else:
                os.environ["OPENAI_API_KEY"] = saved_key


def member(mesh) -> httpx.Client:
    return httpx.Client(base_url=mesh["a"].url, auth=HmacAuth(mesh["secret"]), timeout=60)


def public_peer(identity: Identity, url: str) -> httpx.Client:
    return httpx.Client(base_url=url, auth=PeerAuth(bytes(identity.signing_key), identity.node_id), timeout=60)


def owner_only_calls(mesh) -> dict[tuple[str, str], tuple[str, dict, int | None]]:
    """Every owner-only route with a request the owner can make succeed: (path, httpx kwargs, owner status);
    None: the owner's call reaches outside (a tracker, an update feed) that this test does not run, so its
    answer only has to be something other than a refusal."""
    c_id = mesh["c"].get("/api/ping").json()["node_id"]
    sid = mesh["sessions"]["private"]
    return {
        ("GET", "/api/discover"): ("/api/discover", {}, 200),
        ("GET", "/api/daemon"): ("/api/daemon", {}, 200),
        ("GET", "/api/update"): ("/api/update", {"params": {"fetch": "false"}}, 200),
        ("POST", "/api/update/apply"): ("/api/update/apply", {"json": {}}, None),
        ("POST", "/api/network/mesh/join"): ("/api/network/mesh/join", {}, None),
        ("POST", "/api/network/mesh/leave"): ("/api/network/mesh/leave", {}, 200),
        ("POST", "/api/models/{name}/share"): ("/api/models/tiny/share", {}, 200),
        ("POST", "/api/models/{name}/unshare"): ("/api/models/tiny/unshare", {}, 200),
        ("POST", "/api/conversations/{session_id}/privacy"):
            (f"/api/conversations/{sid}/privacy", {"json": {"privacy": "private"}}, 200),
        ("POST", "/api/trust/vouch"): ("/api/trust/vouch", {"json": {"node_id": c_id}}, 200),
        ("POST", "/api/trust/revoke"): ("/api/trust/revoke", {"json": {"node_id": c_id}}, 200),
        ("POST", "/api/trust/set"): ("/api/trust/set", {"json": {"node_id": c_id, "introducer": "marginal"}}, 200),
        ("GET", "/api/credits"): ("/api/credits", {}, 200),
        ("GET", "/api/keys"): ("/api/keys", {}, 200),
        ("POST", "/api/keys"): ("/api/keys", {"json": {"name": "sweep", "scope": "owner"}}, 201),
        ("DELETE", "/api/keys/{name}"): ("/api/keys/sweep", {}, 200),
        ("POST", "/api/dashboard/login"): ("/api/dashboard/login", {}, 200),
        ("GET", "/api/events"): ("/api/events", {}, 200),
    }


def assert_refused(response: httpx.Response, who: str) -> None:
    assert response.status_code == 403, (who, response.request.url, response.status_code, response.text)
    body = response.json()
    detail = body["detail"] if "detail" in body else body["error"]["message"]
    assert isinstance(detail, str) and "\n" not in detail and "owner" in detail, detail


def test_every_owner_only_route_is_refused_to_peers_and_served_to_the_owner(mesh):
    calls = owner_only_calls(mesh)
    table = {(r.method, r.path) for r in ROUTES if r.principal is Principal.OWNER}
    assert set(calls) == table, f"owner-only routes this test does not try: {table ^ set(calls)}"
    d = Identity.generate()
    with mesh["a"].owner() as owner:
        owner.post("/api/trust/vouch", json={"node_id": d.node_id}).raise_for_status()
        with member(mesh) as peer, public_peer(d, mesh["a"].url) as stranger:
            # B's and C's users sign with the secret they share with A; D signs as a WoT-valid public peer.
            via_b = httpx.Client(base_url=mesh["a"].url, auth=HmacAuth(mesh["b"].secret), timeout=60)
            for (method, _), (path, kwargs, expected) in calls.items():
                assert_refused(peer.request(method, path, **kwargs), "member")
                assert_refused(via_b.request(method, path, **kwargs), "member via B")
                assert_refused(stranger.request(method, path, **kwargs), "public peer")
                if method == "GET":  # the router answers HEAD like GET: so does the table
                    assert peer.head(path, **kwargs).status_code == 403, path
                answer = owner.request(method, path, **kwargs)
                if expected is None:
                    assert answer.status_code not in (401, 403, 500), (path, answer.text)
                else:
                    assert answer.status_code == expected, (path, answer.text)
            via_b.close()
    # Nothing a peer asked for happened: the owner's own changes are all that is there.
    with mesh["a"].owner() as owner:
        assert [k["name"] for k in owner.get("/api/keys").json()["keys"]] == []


def test_owner_only_cli_commands_from_a_peer_machine_are_refused(mesh):
    a, b, c = mesh["a"], mesh["b"], mesh["c"]
    c_id = c.get("/api/ping").json()["node_id"]
    sid = mesh["sessions"]["peers-only"]
    app, runner = build_app(), CliRunner()
    clean = {"P2P_SECRET": None, "PINKYBRAIN_URL": None, "PINKYBRAIN_CONFIG": None, "PINKYBRAIN_CREDENTIAL": None,
             "PINKYBRAIN_DEBUG": None}

    def run(home, *args):
        return runner.invoke(app, [*args, "--url", a.url], env={**clean, "PINKYBRAIN_HOME": str(home)})

    owner_only = [["daemon", "status"], ["discover"], ["update", "check"], ["mesh", "join"], ["mesh", "leave"],
                  ["models", "share", "tiny"], ["models", "unshare", "tiny"], ["trust", "vouch", c_id],
                  ["trust", "revoke", c_id], ["credits"], ["conversations", "set-privacy", sid, "public"],
                  ["keys", "list"], ["keys", "create", "from-b"], ["keys", "revoke", "default"], ["openai-key"]]
    for args in owner_only:
        # B's machine: B's own pinkybrain.yaml (the shared secret) and B's owner key, which is not A's.
        result = run(b.home, *args)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1, (args, result.stdout, result.stderr)
        assert lines[0].startswith("pinkybrain: ") and "owner" in lines[0], (args, lines)
    for args in (["status"], ["peers"], ["conversations", "list"], ["models", "list"]):
        assert run(b.home, *args).exit_code == 0, args  # what a member may do, it may
    # A's machine: the skill finds A's owner key in A's home by itself and prefers it.
    for args in (["daemon", "status"], ["credits"], ["keys", "list"], ["trust", "vouch", c_id],
                 ["conversations", "set-privacy", sid, "peers-only"], ["openai-key", "--json"]):
        result = run(a.home, *args)
        assert result.exit_code == 0, (args, result.stderr)
    assert json.loads(result.stdout)["base_url"] == f"{a.url}/v1"


def test_a_peer_never_reaches_the_owners_cloud_model(mesh):
    provider = mesh["provider"]
    before = provider.call_count
    ask = {"prompt": "What does a cloud cost?", "model": "gpt"}
    with member(mesh) as peer:
        assert_refused(peer.post("/api/query", json=ask), "query")
        assert_refused(peer.post("/api/query", json={**ask, "stream": True}), "streamed query")
        assert_refused(peer.post("/api/query", json={**ask, "mode": "vote", "specialists": ["coder", "skeptic"]}),
                       "vote")
        assert_refused(peer.post("/v1/chat/completions", json={"model": "gpt", "messages": [
            {"role": "user", "content": "hi"}]}), "signed /v1")
        names = {m["id"] for m in peer.get("/v1/models").json()["data"]}
        assert "gpt" not in names and "tiny" not in names  # neither is shared
        assert "gpt" not in {m["name"] for m in peer.get("/api/models").json()["models"]}
    # The /v1 key every holder of the secret could compute before: no longer a key.
    derived = "pb-" + hmac.new(mesh["secret"].encode(), b"pinkybrain-openai-compatible-key-v1",
                               hashlib.sha256).hexdigest()[:48]
    chat = {"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=mesh["a"].url, timeout=60) as raw:
        refused = raw.post("/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {derived}"})
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        # The most a peer can be given: a query-scope key from the owner. It still cannot spend the owner's money.
        with mesh["a"].owner() as owner:
            query_key = owner.post("/api/keys", json={"name": "for-a-peer", "scope": "query"}).json()["api_key"]
            owner_key = owner.post("/api/keys", json={"name": "mine", "scope": "owner"}).json()["api_key"]
        assert_refused(raw.post("/v1/chat/completions", json=chat,
                                headers={"Authorization": f"Bearer {query_key}"}), "query-scope key")
        # Through the mesh: B asks its own node, which asks A; A does not offer gpt to anyone.
        through_mesh = mesh["b"].post("/api/query", json=ask)
        assert through_mesh.status_code != 200 and "gpt" in through_mesh.text
        assert provider.call_count == before, "a peer's request reached the owner's cloud provider"
        mine = raw.post("/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {owner_key}"})
        assert mine.status_code == 200, mine.text
    assert provider.call_count == before + 1  # the owner's key does reach it
    with mesh["a"].owner() as owner:
        for name in ("for-a-peer", "mine"):
            owner.delete(f"/api/keys/{name}").raise_for_status()


def test_privacy_levels_for_each_principal_and_at_once(mesh):
    a, sessions = mesh["a"], mesh["sessions"]
    d, e = Identity.generate(), Identity.generate()
    with a.owner() as owner:
        owner.post("/api/trust/vouch", json={"node_id": d.node_id}).raise_for_status()
        with member(mesh) as peer, public_peer(d, a.url) as stranger, public_peer(e, a.url) as unknown:
            expected = {"owner": ("private", "peers-only", "public"), "member": ("peers-only", "public"),
                        "public": ("public",)}
            ours = set(sessions.values())  # other tests' queries (the owner's) add conversations of their own
            for who, client in (("owner", owner), ("member", peer), ("public", stranger)):
                listed = {c["id"] for c in client.get("/api/conversations").json()["conversations"]}
                assert listed & ours == {sessions[level] for level in expected[who]}, who
                found = {h["session_id"] for h in client.post("/api/conversations/search",
                                                               params={"q": "mammal"}).json()["results"]}
                assert found & ours == {sessions[level] for level in expected[who]}, who
                for level, word in WORDS.items():
                    hits = client.post("/api/conversations/search", params={"q": word}).json()["results"]
                    exported = client.post(f"/api/conversations/{sessions[level]}/export")
                    if level in expected[who]:
                        assert hits and exported.status_code == 200 and word in exported.text, (who, level)
                    else:
                        assert hits == [], (who, level)
                        assert exported.status_code == 403 and level in exported.json()["detail"], (who, level)
                        assert word not in exported.text
            # A public peer reaches nothing else; one nobody vouched for reaches nothing at all.
            assert stranger.get("/api/ping").status_code == 200
            assert_refused_member = stranger.get("/api/status")
            assert assert_refused_member.status_code == 403 and "mesh member" in assert_refused_member.json()["detail"]
            assert stranger.post("/api/query", json={"prompt": "hi"}).status_code == 403
            untrusted = unknown.get("/api/conversations")
            assert untrusted.status_code == 401 and untrusted.json()["error"] == "untrusted_peer"
            # A change of level applies to the very next request.
            private = sessions["private"]
            owner.post(f"/api/conversations/{private}/privacy", json={"privacy": "public"}).raise_for_status()
            assert stranger.post(f"/api/conversations/{private}/export").status_code == 200
            owner.post(f"/api/conversations/{private}/privacy", json={"privacy": "private"}).raise_for_status()
            assert stranger.post(f"/api/conversations/{private}/export").status_code == 403
            assert peer.post(f"/api/conversations/{private}/export").status_code == 403
            # A member cannot write into a conversation it may not read by continuing it.
            cont = peer.post("/api/query", json={"prompt": "and then?", "session_id": private})
            assert cont.status_code == 403 and "private" in cont.json()["detail"]
        owner.post("/api/trust/revoke", json={"node_id": d.node_id}).raise_for_status()
        with public_peer(d, a.url) as revoked:
            assert revoked.get("/api/conversations").status_code == 401  # revoked: no longer valid


# -- authenticate before reading ------------------------------------------------------------------------
def raw_exchange(url: str, head: str, body_parts=(), timeout: float = 5.0) -> int:
    """Send a request head (and maybe some body) on a socket and return the status the node answers,
    without ever sending the rest of the body: an answer at all proves the body was not waited for."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head.encode("latin-1"))
        for part in body_parts:
            try:
                sock.sendall(part)
            except OSError:
                break  # the node answered and closed while we were still sending: what we want
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            assert chunk, "connection closed without an answer"
            data += chunk
    return int(data.split(b" ", 2)[1])


def signed_head(method: str, path: str, secret: str, extra: str, *, ts: float | None = None) -> str:
    headers = signature_headers(secret, method, path, "", b"")
    if ts is not None:
        headers["X-PinkyBrain-Timestamp"] = f"{ts:.3f}"
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\n{lines}{extra}\r\n"


def test_refusals_come_before_the_body_is_read(mesh):
    url, secret = mesh["b"].url, mesh["secret"]
    pending = "Content-Type: application/json\r\nContent-Length: 900000\r\n"
    # Unsigned, with a body announced and never sent: refused at once.
    assert raw_exchange(url, f"POST /api/memory/set HTTP/1.1\r\nHost: x\r\n{pending}\r\n") == 401
    # Signed by a member, for an owner-only route: refused at once, the body never read.
    assert raw_exchange(url, signed_head("POST", "/api/trust/vouch", secret, pending)) == 403
    # A stale timestamp: refused before the body too.
    assert raw_exchange(url, signed_head("POST", "/api/memory/set", secret, pending, ts=time.time() - 600)) == 401
    # A declared length over the route's limit (1 MiB for memory writes): 413 before reading.
    big = "Content-Type: application/json\r\nContent-Length: 2000000\r\n"
    assert raw_exchange(url, signed_head("POST", "/api/memory/set", secret, big)) == 413
    # A chunked body declares no length: it is cut off once it passes the limit, not read to the end.
    chunk = b"%x\r\n%s\r\n" % (64 * 1024, b"x" * 64 * 1024)
    chunked = "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
    status = raw_exchange(url, signed_head("POST", "/api/memory/set", secret, chunked), [chunk] * 24, timeout=20)
    assert status == 413
    assert mesh["b"].get("/api/ping").status_code == 200


def test_the_readme_carries_the_principal_table():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert render_route_table() in readme, "README.md's principal table is stale: paste render_route_table()"
    from pinkybrain.node.api.app import describe_api

    # Every HTTP route the node describes (all go through the auth middleware; the dashboard's page
    # routes, which check their own session cookie, are outside the description and the table).
    served = {(method.upper(), path) for path, ops in describe_api()["paths"].items() for method in ops}
    served.add(("GET", "/api/openapi.json"))  # FastAPI's own
    assert served == {(r.method, r.path.replace(":path}", "}")) for r in ROUTES}, \
        "routes and core.principals.ROUTES differ"
    table = RouteTable()
    for rule in ROUTES:  # each template's pattern finds its own rule
        concrete = rule.path.replace("{key:path}", "a/b").replace("{", "x").replace("}", "")
        assert table.rule(rule.method, concrete) is rule, rule
    assert table.rule("GET", "/api/nothing-here").principal is Principal.MEMBER


def test_every_cli_command_has_a_row_in_the_table():
    import typer.main

    from pinkybrain.node.core.principals import CLI_COMMANDS, LOCAL_COMMANDS

    group = typer.main.get_command(build_app())
    shown = " ".join(name for name, _ in CLI_COMMANDS)
    for name, command in group.commands.items():
        if command.hidden:
            continue  # `openapi`: prints the API description, nothing else
        subs = list(getattr(command, "commands", {}) or [None])
        for sub in subs:
            words = name if sub is None else f"{name} {sub}"
            assert name in LOCAL_COMMANDS or words in shown or (
                sub and any(row.startswith(f"{name} ") and sub in row.split(" ", 1)[1].split("/")
                            for row, _ in CLI_COMMANDS)), f"`pinkybrain {words}` has no row in CLI_COMMANDS"


def test_the_owner_key_is_random_private_and_copied_only_on_purpose(mesh, tmp_path):
    import stat

    from nodes import node_env, run_cli

    # The nodes made theirs at start: one each, 0600, although all three share one secret.
    keys = {}
    for name in ("a", "b", "c"):
        path = mesh[name].home / "owner.key"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        keys[name] = json.loads(path.read_text())["key"]
        assert mesh["secret"] not in path.read_text()
    assert len(set(keys.values())) == 3
    # `identity init` makes it too, bound to the new node id; --force replaces both.
    env = node_env(tmp_path / "home", {"P2P_SECRET": mesh["secret"]})
    made = run_cli("identity", "init", "--json", env=env)
    assert made.returncode == 0, made.stderr
    info = json.loads(made.stdout)
    owner_file = tmp_path / "home" / "owner.key"
    first = json.loads(owner_file.read_text())
    assert first["node_id"] == info["node_id"] and info["owner_key_file"] == str(owner_file)
    assert stat.S_IMODE(owner_file.stat().st_mode) == 0o600
    assert run_cli("identity", "init", "--force", env=env).returncode == 0
    assert json.loads(owner_file.read_text())["key"] != first["key"]
    # Export on the node's machine, import on another: only then does that machine act as the owner.
    token = run_cli("owner-key", "export", env=env).stdout.strip()
    other = node_env(tmp_path / "laptop", {"P2P_SECRET": mesh["secret"]})
    assert run_cli("owner-key", "import", "pbowner1:not:a-key", env=other).returncode == 1
    imported = run_cli("owner-key", "import", "-", env=other, input=token + "\n")
    assert imported.returncode == 0, imported.stderr
    kept = tmp_path / "laptop" / "owner-keys.json"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600 and token.split(":")[2] in kept.read_text()
