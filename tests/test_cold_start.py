"""A lean start: the node process loads only what its first request needs, keeps every start-up check,
and starts mDNS after its API answers (bench/cold_start.py measures the time and memory)."""

import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from pinkybrain.node.core.secrets import WeakSecretError, check_secret, release_estimator
from pinkybrain.node.server import foreground_args

# Modules the serve path must not import before its first request: each costs megabytes of resident
# memory and tens to hundreds of milliseconds (see bench/README.md).
NOT_AT_START = ("httpx", "httpcore", "zeroconf", "typer", "rich", "llama_cpp", "trio", "numpy", "fastapi", "pydantic")


@pytest.mark.parametrize(
    ("args", "parsed"),
    [
        ([], (None, None, None, ())),
        (["--config", "/etc/pb.yaml"], ("/etc/pb.yaml", None, None, ())),
        (["--host=0.0.0.0", "--port", "8080"], (None, "0.0.0.0", 8080, ())),
        (["--peer", "http://a:1", "--peer=http://b:2"], (None, None, None, ("http://a:1", "http://b:2"))),
    ],
)
def test_a_plain_foreground_serve_is_parsed_without_the_cli(args, parsed):
    assert foreground_args(args) == parsed


@pytest.mark.parametrize(
    "args",
    [
        ["--daemon"],
        ["--stop"],
        ["--json"],
        ["--help"],
        ["--config"],  # no value
        ["--config", "--host"],  # an option where a value should be
        ["--port", "0"],
        ["--port", "65536"],
        ["--port", "80a"],
        ["--port", "٨٠"],  # non-ASCII digits
        ["--host", "a", "--host", "b"],  # repeated: the CLI decides
        ["--unknown", "x"],
        ["extra"],
    ],
)
def test_anything_else_goes_through_the_cli(args):
    assert foreground_args(args) is None


def test_the_cli_still_reports_errors_the_fast_path_leaves_to_it(tmp_path):
    bad_port = subprocess.run(
        [sys.executable, "-m", "pinkybrain.node", "serve", "--port", "0"],
        capture_output=True, text=True, timeout=60,
    )
    assert bad_port.returncode == 2 and "Traceback" not in bad_port.stderr
    assert "--port" in bad_port.stderr


def loaded_after(imports: tuple[str, ...], watched: tuple[str, ...]) -> list[str]:
    """Which of `watched` a fresh interpreter has loaded once it imported `imports`."""
    code = (f"import json, sys\nimport {', '.join(imports)}\n"
            f"print(json.dumps(sorted(m for m in {watched!r} if m in sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout)


def test_the_serve_path_imports_nothing_its_first_request_does_not_need():
    assert loaded_after(("pinkybrain.node.server", "pinkybrain.node.api.front", "pinkybrain.node.services.runtime",
                         "pinkybrain.node.services.mesh", "pinkybrain.node.services.discovery",
                         "pinkybrain.node.split.service"), NOT_AT_START) == []


def test_the_secret_check_works_after_its_dictionaries_are_released():
    strong = secrets.token_urlsafe(32)
    check_secret(strong)
    assert "zxcvbn" in sys.modules
    release_estimator()
    assert not any(name == "zxcvbn" or name.startswith("zxcvbn.") for name in sys.modules)
    with pytest.raises(WeakSecretError, match="guessable"):
        check_secret("password12345678901234567890123456")  # imports the estimator again
    check_secret(strong)


def test_a_node_answers_pings_before_it_loads_fastapi_and_builds_the_api_on_first_use(node_factory):
    """The front (node/api/front.py) answers ping and status itself; FastAPI and pydantic (whose C core
    shows in the process's memory maps once imported) load on the first request for another route."""
    node = node_factory()
    maps = Path(f"/proc/{node.proc.pid}/maps")
    assert node.get("/api/ping").status_code == 200 and node.get("/api/status").status_code == 200
    assert "pydantic_core" not in maps.read_text()
    assert node.get("/api/memory").status_code == 200  # built now, then served as always
    assert "pydantic_core" in maps.read_text()
    assert node.get("/api/status").json()["node_id"] == node.get("/api/ping").json()["node_id"]


# What a node loads before its port answers: the front (auth, skill link, hot routes), uvicorn, config,
# identity, credentials. The stores, the mesh, the brain and what they import load once the API answers
# (NodeRuntime.start_services, in a worker thread).
NOT_BEFORE_BIND = (
    "starlette", "anyio", "psutil", "pycrdt", "cryptography", "packaging", "sqlite3", "importlib.metadata",
    "pinkybrain.node.services.memory_store", "pinkybrain.node.services.conversations",
    "pinkybrain.node.services.trust_store", "pinkybrain.node.services.ledger_store",
    "pinkybrain.node.services.brain", "pinkybrain.node.services.mesh", "pinkybrain.node.services.remote",
    "pinkybrain.node.services.public_mesh", "pinkybrain.node.split.service", "pinkybrain.node.services.updater",
)


def test_the_port_is_bound_before_the_stores_and_the_mesh_are_imported():
    assert loaded_after(("pinkybrain.node.server", "pinkybrain.node.api.front", "pinkybrain.node.services.runtime",
                         "pinkybrain.node.services.credentials", "pinkybrain.node.services.http_guard"),
                        NOT_BEFORE_BIND) == []


def test_the_version_is_read_without_importlib_metadata():
    from importlib.metadata import version

    import pinkybrain

    assert pinkybrain._installed_version() == version("pinkybrain") == pinkybrain.__version__


# -- the start gate, on a real runtime in this process ------------------------------------------------
def _runtime(tmp_path, monkeypatch):
    from nodes import strong_secret
    from pinkybrain.node.core.config import load_config
    from pinkybrain.node.core.identity import Identity
    from pinkybrain.node.services.runtime import NodeRuntime

    monkeypatch.setenv("PINKYBRAIN_HOME", str(tmp_path))
    secret = strong_secret()
    (tmp_path / "pinkybrain.yaml").write_text(json.dumps({"p2p": {"secret": secret, "mdns": False},
                                                          "mesh": {"stealth": True}}))
    cfg = load_config(str(tmp_path / "pinkybrain.yaml"))
    return NodeRuntime(cfg, Identity.generate(), bind_host="127.0.0.1", port=1), secret


def _front(runtime):
    from pinkybrain.node.api.app import create_app
    from pinkybrain.node.api.front import NodeFront

    return NodeFront(runtime, lambda: create_app(runtime, manage_lifecycle=False, layers=False))


async def test_a_ping_answers_while_the_services_start_and_other_requests_wait_for_them(tmp_path, monkeypatch):
    import asyncio

    import httpx

    from pinkybrain.node.core.identity import Identity
    from pinkybrain.skill.signing import HmacAuth, PeerAuth

    runtime, secret = _runtime(tmp_path, monkeypatch)
    await runtime.start_front()
    transport = httpx.ASGITransport(app=_front(runtime))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://node", auth=HmacAuth(secret)) as client:
            ping = await client.get("/api/ping")
            assert ping.status_code == 200 and ping.json()["node_id"] == runtime.identity.node_id
            assert not runtime.services_started and runtime.memory is None
            # Authenticated as ever: unsigned, a wrong secret, the owner credential.
            assert (await client.get("/api/ping", auth=None)).status_code == 401
            assert (await client.get("/api/ping", auth=HmacAuth(secret + "x"))).status_code == 401
            owner = HmacAuth(runtime.owner_key.key, credential="owner")
            assert (await client.get("/api/ping", auth=owner)).status_code == 200
            # A status, a memory read and a peer-signed ping (its standing is in the trust store) wait.
            stranger = Identity.generate()
            peer = PeerAuth(bytes(stranger.signing_key), stranger.node_id)
            waiting = [asyncio.create_task(client.get(path, auth=auth)) for path, auth in
                       (("/api/status", HmacAuth(secret)), ("/api/memory", owner), ("/api/ping", peer))]
            await asyncio.sleep(0.3)
            assert not any(task.done() for task in waiting)
            await runtime.start_services()
            status, memory, peer_ping = await asyncio.gather(*waiting)
            assert status.status_code == 200 and status.json()["memory"]["commits"] == 0
            assert memory.status_code == 200
            assert peer_ping.status_code == 401 and peer_ping.json()["error"] == "untrusted_peer"  # as before
    finally:
        await runtime.stop()


async def test_requests_waiting_on_a_start_that_fails_get_a_503_saying_why(tmp_path, monkeypatch):
    import asyncio

    import httpx

    from pinkybrain.skill.signing import HmacAuth

    runtime, secret = _runtime(tmp_path, monkeypatch)
    store = tmp_path / "memory" / "memory-private.sqlite3"
    store.parent.mkdir()
    store.write_bytes(b"not a database, " * 512)
    await runtime.start_front()
    transport = httpx.ASGITransport(app=_front(runtime))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://node", auth=HmacAuth(secret)) as client:
            waiting = asyncio.create_task(client.get("/api/status"))
            await asyncio.sleep(0.1)
            with pytest.raises(Exception, match="corrupt"):
                await runtime.start_services()
            answer = await waiting
            assert answer.status_code == 503 and answer.json()["error"] == "start_failed"
            assert "corrupt" not in answer.text and str(tmp_path) not in answer.text  # not yet authenticated
            again = await client.get("/api/status")
            assert again.status_code == 503 and again.json()["error"] == "start_failed"
    finally:
        await runtime.stop()


async def test_a_request_gets_a_503_starting_when_the_services_take_too_long(tmp_path, monkeypatch):
    import httpx

    from pinkybrain.node.api import front
    from pinkybrain.skill.signing import HmacAuth

    runtime, secret = _runtime(tmp_path, monkeypatch)
    await runtime.start_front()
    monkeypatch.setattr(front, "STARTING_WAIT_SECS", 0.2)
    transport = httpx.ASGITransport(app=_front(runtime))  # start_services() is never called here
    async with httpx.AsyncClient(transport=transport, base_url="http://node", auth=HmacAuth(secret)) as client:
        answer = await client.get("/api/status")
        assert answer.status_code == 503 and answer.json()["error"] == "starting"
        assert answer.headers["retry-after"] == "2"
        assert (await client.get("/api/ping")).status_code == 200


def test_websockets_load_at_the_first_peer_link_not_when_the_server_starts():
    code = (
        "import json, sys, uvicorn\n"
        "from pinkybrain.node.services.http_guard import websocket_protocol\n"
        "async def app(scope, receive, send): pass\n"
        "config = uvicorn.Config(app, ws=websocket_protocol, lifespan='off'); config.load()\n"
        "print(json.dumps('websockets' in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout) is False  # the mesh tests show peer links still connect through it


def test_the_forked_secret_check_gives_the_verdicts_of_the_check_itself_and_leaves_zxcvbn_out():
    code = (
        "import json, sys\n"
        "from pinkybrain.node.services.secret_check import SecretCheck\n"
        "from pinkybrain.node.core.secrets import WeakSecretError\n"
        "out = []\n"
        "for secret in (sys.argv[1], 'password12345678901234567890123456', 'short', None):\n"
        "    try:\n"
        "        SecretCheck.start(secret).result(); out.append('ok')\n"
        "    except WeakSecretError as exc:\n"
        "        out.append(str(exc))\n"
        "out.append(any(m == 'zxcvbn' or m.startswith('zxcvbn.') for m in sys.modules))\n"
        "print(json.dumps(out))\n"
    )
    strong = secrets.token_urlsafe(32)
    out = subprocess.run([sys.executable, "-c", code, strong], capture_output=True, text=True, timeout=120,
                         check=True)
    verdicts = json.loads(out.stdout)
    expected = []
    for secret in (strong, "password12345678901234567890123456", "short", None):
        try:
            check_secret(secret)
            expected.append("ok")
        except WeakSecretError as exc:
            expected.append(str(exc))
    assert verdicts[:4] == expected and expected[0] == "ok" and "guessable" in expected[1]
    if sys.platform == "linux":
        assert verdicts[4] is False  # the estimator ran in the children only


def test_without_a_verdict_from_the_child_the_check_runs_in_the_node(monkeypatch):
    from pinkybrain.node.services import secret_check

    monkeypatch.setattr(secret_check.threading, "active_count", lambda: 2)  # as if a thread ran: no fork
    check = secret_check.SecretCheck.start("password12345678901234567890123456")
    assert check._fd is None
    with pytest.raises(WeakSecretError, match="guessable"):
        check.result()
