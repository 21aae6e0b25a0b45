"""Cloud models: usable by the node's own user, never shared without force (and the config's consent),
always with a cost warning. Their APIs cannot be reached here, so respx stands in for them."""

import json

import httpx
import pytest

from nodes import strong_secret
from pinkybrain.node.api.app import create_app
from pinkybrain.node.core.config import load_config
from pinkybrain.node.core.identity import Identity
from pinkybrain.node.services.runtime import NodeRuntime
from pinkybrain.skill.signing import HmacAuth

OPENAI = "https://api.openai.com/v1/chat/completions"
ANTHROPIC = "https://api.anthropic.com/v1/messages"


def make_runtime(tmp_path, monkeypatch, *, cloud_sharing=False):
    monkeypatch.setenv("PINKYBRAIN_HOME", str(tmp_path))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-openai")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-anthropic")
    (tmp_path / "shared_models").mkdir()
    secret = strong_secret()
    (tmp_path / "pinkybrain.yaml").write_text(json.dumps({
        "p2p": {"secret": secret, "mdns": False},
        "sharing": {"shared_models_dir": "./shared_models", "cloud_models": cloud_sharing},
        "cloud": {"models": [{"name": "gpt", "provider": "openai", "model": "gpt-4o-mini"},
                             {"name": "claude", "provider": "anthropic", "model": "claude-3-5-haiku"}]},
    }))
    cfg = load_config(str(tmp_path / "pinkybrain.yaml"))
    return NodeRuntime(cfg, Identity.generate(), bind_host="127.0.0.1", port=1), secret


@pytest.fixture
async def api(tmp_path, monkeypatch, request):
    runtime, secret = make_runtime(tmp_path, monkeypatch, cloud_sharing=getattr(request, "param", False))
    await runtime.start()
    transport = httpx.ASGITransport(app=create_app(runtime, manage_lifecycle=False))
    owner = HmacAuth(runtime.owner_key.key, credential="owner")  # the owner drives its cloud models
    async with httpx.AsyncClient(transport=transport, base_url="http://node", auth=owner) as client:
        yield client
    await runtime.stop()


def openai_reply(text):
    return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": text},
                                                  "finish_reason": "stop"}],
                                     "usage": {"prompt_tokens": 5, "completion_tokens": 3}})


async def test_cloud_models_are_listed_for_the_owner(api):
    models = (await api.get("/api/models")).json()["models"]
    cloud = {m["name"]: m for m in models if m["kind"] == "cloud"}
    assert set(cloud) == {"gpt", "claude"}
    assert cloud["gpt"]["shared"] is False and cloud["gpt"]["usable"] is True


async def test_owner_queries_openai_and_anthropic_models(api, respx_mock):
    openai_route = respx_mock.post(OPENAI).mock(return_value=openai_reply("Paris."))
    anthropic_route = respx_mock.post(ANTHROPIC).mock(return_value=httpx.Response(200, json={
        "content": [{"type": "text", "text": "Bonjour."}], "usage": {"input_tokens": 4, "output_tokens": 2}}))
    r = await api.post("/api/query", json={"prompt": "Capital of France?", "mode": "single", "model": "gpt"})
    assert r.status_code == 200, r.text
    assert r.json()["answer"] == "Paris." and r.json()["answers"][0]["model"] == "gpt"
    sent = json.loads(openai_route.calls[0].request.content)
    assert sent["model"] == "gpt-4o-mini" and sent["messages"][0]["role"] == "system"
    assert openai_route.calls[0].request.headers["authorization"] == "Bearer sk-test-openai"
    r = await api.post("/api/query", json={"prompt": "Say hello in French", "mode": "single", "model": "claude"})
    assert r.json()["answer"] == "Bonjour."
    body = json.loads(anthropic_route.calls[0].request.content)
    assert "system" in body and all(m["role"] != "system" for m in body["messages"])
    assert anthropic_route.calls[0].request.headers["x-api-key"] == "sk-test-anthropic"


async def test_a_failing_cloud_api_is_a_clear_error(api, respx_mock):
    respx_mock.post(OPENAI).mock(return_value=httpx.Response(429, json={"error": {"message": "rate limited"}}))
    r = await api.post("/api/query", json={"prompt": "hi", "mode": "single", "model": "gpt"})
    assert r.status_code == 502 and "rate limited" in r.json()["detail"]


async def test_sharing_a_cloud_model_without_force_is_refused_with_a_cost_warning(api):
    r = await api.post("/api/models/gpt/share")
    assert r.status_code == 403
    assert "force" in r.json()["detail"] and "COST WARNING" in r.json()["detail"]
    assert all(not m["shared"] for m in (await api.get("/api/models")).json()["models"])


async def test_force_alone_is_not_enough_when_the_config_forbids_it(api):
    r = await api.post("/api/models/gpt/share", params={"force": "true"})
    assert r.status_code == 403 and "sharing.cloud_models is false" in r.json()["detail"]


@pytest.mark.parametrize("api", [True], indirect=True)
async def test_config_allows_but_force_is_still_required(api):
    refused = await api.post("/api/models/claude/share")
    assert refused.status_code == 403 and "force" in refused.json()["detail"]
    shared = await api.post("/api/models/claude/share", params={"force": "true"})
    assert shared.status_code == 200
    assert "COST WARNING" in shared.json()["cost_warning"] and "anthropic" in shared.json()["cost_warning"]
    listed = {m["name"]: m for m in (await api.get("/api/models")).json()["models"]}
    assert listed["claude"]["shared"] is True and listed["gpt"]["shared"] is False


async def test_a_session_sends_a_cloud_model_the_earlier_turns(api, respx_mock):
    route = respx_mock.post(OPENAI).mock(side_effect=[openai_reply("Nice to meet you, Ada."), openai_reply("Ada.")])
    first = await api.post("/api/query", json={"prompt": "My name is Ada.", "model": "gpt",
                                               "specialist": "conversationalist"})
    assert first.status_code == 200, first.text
    second = await api.post("/api/query", json={"prompt": "What is my name?", "model": "gpt",
                                                "specialist": "conversationalist",
                                                "session_id": first.json()["session_id"]})
    assert second.status_code == 200, second.text
    assert second.json()["history"] == {"turns": 1, "dropped": 0}
    sent = json.loads(route.calls[1].request.content)["messages"]
    assert [(m["role"], m["content"]) for m in sent[1:]] == [
        ("user", "My name is Ada."), ("assistant", "Nice to meet you, Ada."), ("user", "What is my name?")]
    assert sent[0]["role"] == "system"
    assert len(json.loads(route.calls[0].request.content)["messages"]) == 2  # the first turn had no history
