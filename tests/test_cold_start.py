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


def test_the_serve_path_imports_nothing_its_first_request_does_not_need():
    code = (
        "import json, sys\n"
        "import pinkybrain.node.server, pinkybrain.node.api.front, pinkybrain.node.services.runtime\n"
        "import pinkybrain.node.services.mesh, pinkybrain.node.services.discovery, pinkybrain.node.split.service\n"
        f"print(json.dumps(sorted(m for m in {NOT_AT_START!r} if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout) == []


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
