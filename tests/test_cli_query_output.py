"""The CLI's human output for queries, against a real node with the embedded default model: streaming,
the multi-answer modes, and the GGUF facts in `models list`. The answers' wording is the model's; only
their shape is checked."""

import json

import pytest

from model import DEFAULT_NAME, place_default_model
from nodes import run_cli, start_node

PROMPT = "Is the Great Wall of China visible from space?"


@pytest.fixture(scope="module")
def brain_node(tmp_path_factory):
    home = tmp_path_factory.mktemp("cli-query")
    place_default_model(home / "shared_models")
    node = start_node(home, extra={"inference.n_ctx": 1024})
    yield node
    node.stop()


def ask(node, *args):
    env = dict(node.env, PINKYBRAIN_URL=node.url, P2P_SECRET=node.secret)
    out = run_cli("query", PROMPT, "--max-tokens", "8", *args, env=env, timeout=600)
    assert "Traceback" not in out.stdout + out.stderr
    return out


def test_stream_prints_the_answer_then_a_status_line(brain_node):
    out = ask(brain_node, "--stream")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    assert f"model {DEFAULT_NAME}" in out.stderr and "specialist " in out.stderr and " ms" in out.stderr

    end = ask(brain_node, "--stream", "--json")
    assert end.returncode == 0, end.stderr
    event = json.loads(end.stdout)  # --json stays one JSON document, and nothing else on stdout
    assert event["answer"].strip() and event["model"] == DEFAULT_NAME and event["session_id"]
    assert event["finish_reason"] in ("stop", "length")


def test_multi_answer_modes_stream_each_specialists_progress(brain_node):
    out = ask(brain_node, "--mode", "compare", "--specialists", "coder,writer")
    assert out.returncode == 0, out.stderr
    progress = [line for line in out.stderr.splitlines() if line.startswith(("✓ ", "✗ "))]
    assert sorted(line.split()[1] for line in progress) == ["coder", "writer"]  # one line as each finishes
    assert "── coder" in out.stdout and "── writer" in out.stdout  # then the result, as without streaming


def test_single_answer_then_status_line(brain_node):
    out = ask(brain_node, "--specialist", "teacher")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() and "specialist teacher (score " in out.stderr
    assert f"model {DEFAULT_NAME}" in out.stderr and "node " in out.stderr


def test_vote_shows_the_winner_and_both_votes(brain_node):
    out = ask(brain_node, "--mode", "vote", "--specialists", "factchecker,skeptic")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()  # the winning answer alone, so it can be piped
    table = out.stderr.splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith("SPECIALIST"))
    rows = table[header + 1: header + 3]
    assert sorted(r.split()[0] for r in rows) == ["factchecker", "skeptic"]
    assert all(DEFAULT_NAME in r for r in rows)
    assert "rule: " in out.stderr and "winner " in out.stderr


def test_compare_shows_each_specialist_with_model_and_time(brain_node):
    out = ask(brain_node, "--mode", "compare", "--specialists", "teacher,writer")
    assert out.returncode == 0, out.stderr
    for name in ("teacher", "writer"):
        assert f"── {name} · {DEFAULT_NAME} · " in out.stdout
    assert out.stdout.count(" ms\n") == 2


def test_chain_steps_then_final_answer(brain_node):
    out = ask(brain_node, "--mode", "chain", "--specialist", "coder")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    assert "step 1 · coder (draft)" in out.stderr and "step 3 · coder (final)" in out.stderr


def test_models_list_shows_gguf_facts(brain_node):
    env = dict(brain_node.env, PINKYBRAIN_URL=brain_node.url, P2P_SECRET=brain_node.secret)
    out = run_cli("models", "list", env=env)
    assert out.returncode == 0, out.stderr
    header, row = out.stdout.splitlines()[:2]
    assert header.split()[:7] == ["NAME", "KIND", "ARCH", "PARAMS", "QUANT", "CONTEXT", "SIZE"]
    assert row.split()[:7] == [DEFAULT_NAME, "local", "gemma3", "268M", "Q4_K_M", "32K", "241.4"]
