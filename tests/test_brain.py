"""The brain on a real node with the real embedded default model: six modes, streaming, queueing,
conversations, the OpenAI-compatible API, and the RAM check."""

import json
import threading

import httpx
import pytest

from model import DEFAULT_NAME, place_default_model
from nodes import run_cli, start_node

MODES = [
    ("single", []),
    ("vote", ["--specialists", "factchecker,skeptic"]),
    ("chain", ["--specialist", "coder"]),
    ("fuse", []),
    ("compare", []),
    ("specialist", ["--specialist", "teacher"]),
]


@pytest.fixture(scope="module")
def brain_node(tmp_path_factory):
    home = tmp_path_factory.mktemp("brain")
    place_default_model(home / "shared_models")
    node = start_node(home, extra={"inference.n_ctx": 1024})
    yield node
    node.stop()


def cli_env(node):
    return dict(node.env, PINKYBRAIN_URL=node.url, P2P_SECRET=node.secret)


@pytest.mark.parametrize(("mode", "args"), MODES, ids=[m for m, _ in MODES])
def test_each_mode_answers_with_the_real_model(brain_node, mode, args):
    out = run_cli("query", "Is the Great Wall of China visible from space?", "--mode", mode, *args,
                  "--max-tokens", "16", "--json", env=cli_env(brain_node), timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["mode"] == mode
    assert result["answer"].strip()
    answers = result["answers"]
    assert answers and all(a["model"] == DEFAULT_NAME and a["text"].strip() for a in answers)
    assert result["node"] and result["session_id"]
    if mode == "vote":
        assert set(result["votes"]) == {"factchecker", "skeptic"} and result["rule"]
    if mode == "chain":
        assert len(result["steps"]) >= 2
    if mode == "fuse":
        assert len(result["sources"]) >= 2
    if mode == "single":
        assert result["routing"]["chosen"] == result["specialist"]


def test_unknown_mode_and_specialist_are_clear_errors(brain_node):
    r = brain_node.post("/api/query", json={"prompt": "hi", "mode": "telepathy"})
    assert r.status_code == 400 and "vote" in r.json()["detail"]
    r = brain_node.post("/api/query", json={"prompt": "hi", "mode": "specialist", "specialists": ["wizard"]})
    assert r.status_code == 400
    assert "coder" in r.json()["detail"] and "factchecker" in r.json()["detail"]


def test_streaming_tokens(brain_node):
    events = []
    with brain_node.client() as c, c.stream("POST", "/api/query", json={
            "prompt": "Write a haiku about autumn.", "mode": "single", "max_tokens": 12, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in r.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                events.append((event, json.loads(line[5:])))
    kinds = [e for e, _ in events]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("token") >= 2
    end = events[-1][1]
    assert end["answer"] == "".join(d["text"] for e, d in events if e == "token").strip()
    assert end["model"] == DEFAULT_NAME


def test_concurrent_queries_queue_on_one_loaded_model(brain_node):
    results, errors = [], []

    def ask(i):
        try:
            r = brain_node.post("/api/query", json={"prompt": f"Name a colour number {i}.", "mode": "single",
                                                    "max_tokens": 8})
            results.append(r.status_code)
        except httpx.HTTPError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and results == [200] * 4
    assert brain_node.log().count(f"loading model {DEFAULT_NAME}") == 1  # loaded once, kept warm


def test_every_answer_lands_in_searchable_exportable_history(brain_node):
    r = brain_node.post("/api/query", json={"prompt": "Tell me about zebrafish regeneration", "mode": "single",
                                            "max_tokens": 8})
    session = r.json()["session_id"]
    hits = brain_node.post("/api/conversations/search", params={"q": "zebrafish"}).json()["results"]
    assert session in {h["session_id"] for h in hits}
    md = brain_node.post(f"/api/conversations/{session}/export", params={"format": "markdown"})
    assert "zebrafish" in md.text
    follow = brain_node.post("/api/query", json={"prompt": "And in axolotls?", "session_id": session,
                                                 "max_tokens": 8}).json()
    assert follow["session_id"] == session
    exported = json.loads(brain_node.post(f"/api/conversations/{session}/export").text)
    assert len(exported["messages"]) == 4


def test_models_list_reports_gguf_facts(brain_node):
    models = brain_node.get("/api/models").json()["models"]
    gemma = next(m for m in models if m["name"] == DEFAULT_NAME)
    assert gemma["architecture"] == "gemma3" and gemma["quantization"] == "Q4_K_M"
    assert 200_000_000 < gemma["parameters"] < 300_000_000 and gemma["context_length"] == 32768


def test_openai_client_gets_a_completion_and_a_stream(brain_node):
    import openai

    key = run_cli("openai-key", "--json", env=dict(brain_node.env, PINKYBRAIN_CONFIG=str(brain_node.config_path)))
    assert key.returncode == 0, key.stderr
    api_key = json.loads(key.stdout)["api_key"]
    client = openai.OpenAI(base_url=f"{brain_node.url}/v1", api_key=api_key, max_retries=0, timeout=300)
    ids = [m.id for m in client.models.list().data]
    assert "pinkybrain" in ids and DEFAULT_NAME in ids and "pinkybrain/coder" in ids
    done = client.chat.completions.create(model="pinkybrain", max_tokens=12,
                                          messages=[{"role": "user", "content": "Say hello to the mesh."}])
    assert done.choices[0].message.content.strip()
    assert done.usage.completion_tokens > 0
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=DEFAULT_NAME, max_tokens=12, stream=True,
        messages=[{"role": "user", "content": "Count to five."}]) if c.choices]
    assert "".join(pieces).strip()
    bad = openai.OpenAI(base_url=f"{brain_node.url}/v1", api_key="pb-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_a_model_that_does_not_fit_in_ram_is_refused_before_loading(tmp_path, node_factory):
    import gguf
    import numpy as np

    home = tmp_path / "big"
    models = home / "shared_models"
    models.mkdir(parents=True)
    path = models / "huge.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(80)
    writer.add_context_length(4096)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with path.open("r+b") as fh:  # a sparse terabyte: the size the RAM check sees, no disk used
        fh.truncate(2**40)
    node = node_factory(home=home)
    r = node.post("/api/query", json={"prompt": "hi", "mode": "single", "model": "huge", "max_tokens": 4})
    assert r.status_code == 502
    assert "needs about" in r.text and "GiB" in r.text and "free" in r.text
    assert node.get("/api/ping").status_code == 200
