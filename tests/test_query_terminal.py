"""`pinkybrain query` and `pinkybrain chat` as a user lives them, against a real node with the embedded
default model: tokens on a terminal (a pty) before the answer is complete, the load line before the first
token on a cold node, the cut marker, the prompt from stdin, a chat whose second turn is sent with the
first, `specialists` and `models ps`. A second node with a small context shows the context rules: a prompt
over it is refused with 400 before any stream, and a long session is trimmed oldest turn first."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model import DEFAULT_NAME, default_model_file, place_default_model
from nodes import run_cli, start_node
from pinkybrain.node.core.specialists import builtin_specialists
from pinkybrain.node.services.inference import transcript_prompt

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    home = tmp_path_factory.mktemp("terminal")
    place_default_model(home / "shared_models")
    # inference.n_ctx is left at its default: the model's trained context, bounded by free memory.
    running = start_node(home)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def small_ctx_node(tmp_path_factory):
    home = tmp_path_factory.mktemp("small-ctx")
    place_default_model(home / "shared_models")
    running = start_node(home, extra={"inference.n_ctx": 512})
    yield running
    running.stop()


def cli_env(node) -> dict:
    return dict(node.env, PINKYBRAIN_URL=node.url, P2P_SECRET=node.secret)


def run_in_pty(args: list[str], env: dict, timeout: float = 600) -> tuple[int, list[tuple[float, str]]]:
    """Run `pinkybrain ARGS` on a pseudo-terminal (stdin, stdout and stderr): what a user's terminal
    receives, read by read with the time each read arrived."""
    exe = str(Path(sys.executable).with_name("pinkybrain"))
    master, slave = pty.openpty()
    proc = subprocess.Popen([exe, *args], stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    reads: list[tuple[float, str]] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the command exited and the terminal closed
                break
            if not data:
                break
            reads.append((time.monotonic(), data.decode("utf-8", "replace")))
        return proc.wait(timeout=30), reads
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def screen(text: str) -> str:
    return ANSI.sub("", text).replace("\r", "")


def session_messages(node, session_id: str) -> list[dict]:
    r = node.post(f"/api/conversations/{session_id}/export", params={"format": "json"})
    assert r.status_code == 200, r.text
    return json.loads(r.text)["messages"]


def session_of(text: str) -> str:
    found = re.search(r"\(session (\S+): continue with", text)
    assert found, text
    return found.group(1)


def count_tokens(messages: list[dict]) -> int:
    """The prompt tokens of these messages as the default model (no chat template: a transcript) reads them."""
    from llama_cpp import Llama

    vocab = Llama(model_path=str(default_model_file()), vocab_only=True, n_ctx=256, verbose=False)
    return len(vocab.tokenize(transcript_prompt(messages).encode(), add_bos=True, special=False))


def test_first_token_shows_before_the_answer_is_complete_and_the_load_line_before_it(node):
    assert node.get("/api/models/ps").json()["models"] == []  # a cold node: the model is not loaded
    code, reads = run_in_pty(["query", "Explain quantum entanglement", "--specialist", "teacher",
                              "--max-tokens", "40"], cli_env(node))
    everything = screen("".join(text for _, text in reads))
    assert code == 0, everything
    answer = session_messages(node, session_of(everything))[1]["text"]
    assert len(answer) > 20, answer
    shown = [screen("".join(text for _, text in reads[: i + 1])) for i in range(len(reads))]
    first = next(i for i, text in enumerate(shown) if answer[:6] in text)
    complete = next(i for i, text in enumerate(shown) if answer in text)
    # The first piece of the answer was on the screen in an earlier read than the rest of it.
    assert first < complete and reads[first][0] < reads[complete][0]
    assert answer not in shown[first]
    # The load line (name and size) was on the screen before the first token.
    before = shown[first][: shown[first].index(answer[:6])]
    assert re.search(rf"loading {DEFAULT_NAME} \(\d+\.\d MiB\)…", before), before


def test_an_answer_cut_by_max_tokens_is_marked(node):
    out = run_cli("query", "Write a long story about a dragon.", "--max-tokens", "3", env=cli_env(node), timeout=600)
    assert out.returncode == 0, out.stderr
    assert "[cut at 3 tokens: --max-tokens]" in out.stderr and "[cut" not in out.stdout

    waited = run_cli("query", "Write a long story about a dragon.", "--max-tokens", "3", "--no-stream",
                     env=cli_env(node), timeout=600)
    assert waited.returncode == 0 and "[cut at 3 tokens: --max-tokens]" in waited.stderr

    as_json = run_cli("query", "Write a long story about a dragon.", "--max-tokens", "3", "--json",
                      env=cli_env(node), timeout=600)
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["finish_reason"] == "length"


def test_the_prompt_comes_from_stdin_with_a_dash_or_a_pipe(node):
    question = "What is the capital of France?\nAnswer in one word."
    for args in (["query", "-"], ["query"]):
        out = run_cli(*args, "--max-tokens", "4", env=cli_env(node), input=question, timeout=600)
        assert out.returncode == 0, out.stderr
        assert session_messages(node, session_of(out.stderr))[0]["text"] == question  # not "-"


def test_chat_sends_the_model_the_earlier_turn(node):
    out = run_cli("chat", "--specialist", "conversationalist", "--max-tokens", "24", env=cli_env(node),
                  input="My name is Ada.\nWhat is my name?\n/exit\n", timeout=900)
    assert out.returncode == 0, out.stderr
    notes = re.findall(r"\((\S+) · (\d+) earlier turns?, (\d+) prompt tokens\)", out.stderr)
    assert [(model, int(turns)) for model, turns, _ in notes] == [(DEFAULT_NAME, 0), (DEFAULT_NAME, 1)], out.stderr
    messages = session_messages(node, session_of(out.stderr))  # one session holds both turns
    assert [(m["role"], m["text"]) for m in messages[::2]] == [("user", "My name is Ada."),
                                                               ("user", "What is my name?")]
    system = {"role": "system", "content": builtin_specialists()["conversationalist"].system_prompt}
    first = [system, {"role": "user", "content": "My name is Ada."}]
    second = [*first, {"role": "assistant", "content": messages[1]["text"]},
              {"role": "user", "content": "What is my name?"}]
    # The node counted the prompt its engine was given; it is exactly the one holding both turns.
    assert int(notes[0][2]) == count_tokens(first)
    assert int(notes[1][2]) == count_tokens(second)


def test_specialists_and_models_ps(node):
    data = node.get("/api/specialists").json()["specialists"]
    coder = next(s for s in data if s["name"] == "coder")
    assert coder["description"] and coder["hints"] and "preferred_models" in coder
    out = run_cli("specialists", env=cli_env(node))
    assert out.returncode == 0 and "coder" in out.stdout and "factchecker" in out.stdout

    import llama_cpp

    ps = node.get("/api/models/ps").json()
    loaded = next(m for m in ps["models"] if m["model"] == DEFAULT_NAME)  # loaded by the queries above
    on_gpu = bool(llama_cpp.llama_supports_gpu_offload())
    assert ps["gpu_offload"] is on_gpu
    assert loaded["device"] == ("gpu" if on_gpu else "cpu") and loaded["ram_bytes"] > 0
    assert 2048 <= loaded["n_ctx"] <= 32768  # the trained context (32768), or less when memory is short
    human = run_cli("models", "ps", env=cli_env(node))
    assert human.returncode == 0 and DEFAULT_NAME in human.stdout and "UNLOADS IN" in human.stdout
    caps = node.get("/api/capabilities").json()["llama_cpp"]
    assert caps["gpu_offload"] is on_gpu


def test_a_prompt_over_the_context_is_refused_before_any_stream(small_ctx_node):
    long_prompt = "Tell me about the sea. " * 300  # ~1,800 tokens, over the 512-token context
    for stream in (True, False):
        r = small_ctx_node.post("/api/query", json={"prompt": long_prompt, "stream": stream})
        assert r.status_code == 400 and not r.headers["content-type"].startswith("text/event-stream")
        body = r.json()
        assert body["error"] == "context_length_exceeded" and body["limit"] == 512 and "512" in body["detail"]
        assert body["prompt_tokens"] > 512
    out = run_cli("query", long_prompt, env=cli_env(small_ctx_node), timeout=300)
    assert out.returncode == 1 and "maximum context length is 512 tokens" in out.stderr


def test_a_long_session_sends_the_newest_turns_that_fit(small_ctx_node):
    session = None
    for topic in ("rivers", "mountains", "deserts"):
        body = {"prompt": f"Describe {topic}. " + "Add many details please. " * 30, "max_tokens": 4,
                "specialist": "writer", "session_id": session}
        r = small_ctx_node.post("/api/query", json=body)
        assert r.status_code == 200, r.text
        session = r.json()["session_id"]
    events = []
    with small_ctx_node.client() as c, c.stream("POST", "/api/query", json={
            "prompt": "Which topic came last?", "max_tokens": 16, "specialist": "writer", "session_id": session,
            "stream": True}) as r:
        assert r.status_code == 200
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    end = events[-1]
    history = end["history"]
    assert history["turns"] >= 1 and history["dropped"] >= 1 and history["turns"] + history["dropped"] == 3
    assert end["prompt_tokens"] <= 512 - 16  # the answer's room is kept
