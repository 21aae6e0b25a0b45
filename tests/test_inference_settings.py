"""The local engine's settings and rules, in process: GPU offload arguments and where a model lives,
the context size (trained context bounded by free memory), keep-alive unloading with the real model,
the conversation-history rule, a session's turns from the store, install.sh's llama.cpp build choice."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import pytest

from model import default_model_file
from pinkybrain.node.core import history
from pinkybrain.node.core.config import KEYS, ConfigError, coerce
from pinkybrain.node.services.conversations import ConversationStore
from pinkybrain.node.services.gguf_facts import read_gguf_facts
from pinkybrain.node.services.inference import (
    MIN_AUTO_CTX,
    ContextLengthExceeded,
    GpuSettings,
    LocalEngine,
    context_size,
    estimate_bytes,
    gpu_load_kwargs,
    placement,
)

ROOT = Path(__file__).resolve().parents[1]
FACTS = {"context_length": 32768, "block_count": 18, "head_count_kv": 1, "key_length": 256, "value_length": 256}


def test_gpu_layers_default_to_all_on_a_gpu_build_and_none_on_a_cpu_build():
    assert gpu_load_kwargs(GpuSettings(), supported=True) == {"n_gpu_layers": -1, "main_gpu": 0}
    assert gpu_load_kwargs(GpuSettings(), supported=False) == {"n_gpu_layers": 0, "main_gpu": 0}
    explicit = GpuSettings(n_gpu_layers=10, main_gpu=1, tensor_split=(3.0, 1.0))
    assert gpu_load_kwargs(explicit, supported=True) == {"n_gpu_layers": 10, "main_gpu": 1, "tensor_split": [3.0, 1.0]}


def test_placement_says_where_a_model_lives():
    weights, kv = 1000, 100
    assert placement(0, 18, True, weights, kv)["device"] == "cpu"
    everything = placement(-1, 18, True, weights, kv)
    assert everything["device"] == "gpu" and everything["gpu_layers"] == 19 and everything["vram_bytes"] == 1100
    assert everything["ram_bytes"] == 0
    half = placement(9, 17, True, weights, kv)
    assert half["device"] == "gpu+cpu" and half["vram_bytes"] == 550 and half["ram_bytes"] == 550
    assert placement(-1, 18, False, weights, kv) == {"device": "cpu", "gpu_layers": 0, "layers": 19,
                                                      "vram_bytes": 0, "ram_bytes": 1100}


def test_context_is_the_trained_one_bounded_by_free_memory():
    size = 250 * 2**20
    plenty = 64 * 2**30
    assert context_size(0, FACTS, size, plenty) == 32768
    tight = estimate_bytes(size, FACTS, 8192) / 0.8  # room for 8192 tokens, not for 16384
    assert context_size(0, FACTS, size, int(tight)) == 8192
    assert context_size(0, FACTS, size, 0) == MIN_AUTO_CTX  # never below the floor
    assert context_size(2048, FACTS, size, plenty) == 2048  # configured wins ...
    assert context_size(65536, FACTS, size, plenty) == 32768  # ... up to the trained context
    assert context_size(0, {"context_length": 512}, size, plenty) == 512
    assert context_size(0, {}, size, plenty) == 4096  # a GGUF that does not say


def test_config_keys_for_gpu_and_keep_alive():
    assert KEYS["inference.n_ctx"].default == 0 and KEYS["inference.keep_alive_secs"].default == 300
    assert KEYS["inference.n_gpu_layers"].default is None
    assert coerce(KEYS["inference.tensor_split"], "3, 1") == [3.0, 1.0]
    assert coerce(KEYS["inference.tensor_split"], [1, 0.5]) == [1.0, 0.5]
    for bad in (["a"], [-1], "x,y", [True]):
        with pytest.raises(ConfigError, match="tensor_split"):
            coerce(KEYS["inference.tensor_split"], bad)
    with pytest.raises(ConfigError):
        coerce(KEYS["inference.n_gpu_layers"], -2)


def test_history_keeps_the_newest_turns_that_fit():
    # turns oldest first: 50, 40, 30 tokens; base 20; budget 100 -> the two newest (30 + 40) fit
    assert history.keep_newest([50, 40, 30], 20, 100) == 2
    assert history.keep_newest([50, 40, 30], 20, 49) == 0  # not even the newest
    assert history.keep_newest([10, 10], 0, 1000) == 2
    assert history.keep_newest([10, 500, 10], 0, 100) == 1  # a turn that does not fit stops the walk back
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "new"}]
    out = history.with_history(msgs, [("q1", "a1"), ("q2", "a2")])
    assert [m["content"] for m in out] == ["S", "q1", "a1", "q2", "a2", "new"]
    assert history.answer_reserve(512, 16) == 16 and history.answer_reserve(512, 4000) == 256


def test_a_sessions_turns_come_back_oldest_first(tmp_path):
    store = ConversationStore.open(tmp_path / "conv", bytes(range(32)))
    try:
        sid = None
        for i in range(5):
            sid = store.record(sid, f"q{i}", f"a{i}", mode="single", specialists=[], model=None,
                               node_id=None)["session_id"]
        assert store.recent_turns(sid) == [(f"q{i}", f"a{i}") for i in range(5)]
        assert store.recent_turns(sid, limit=2) == [("q3", "a3"), ("q4", "a4")]
        assert store.recent_turns("no-such-session-yet") == []
        with pytest.raises(ValueError):
            store.recent_turns("../../etc")
    finally:
        store.close()


def test_the_real_model_counts_checks_and_unloads_when_idle():
    path = default_model_file()
    facts = read_gguf_facts(path)

    async def go():
        engine = LocalEngine(n_ctx=512, n_threads=2, keep_alive_secs=60)
        try:
            short = [{"role": "user", "content": "Hello"}]
            cold = await engine.count_tokens("m", path, facts, short)  # vocabulary only: nothing loaded
            assert not engine.is_loaded("m") and 2 <= cold < 20
            with pytest.raises(ContextLengthExceeded) as refused:
                await engine.check_context("m", path, facts, [{"role": "user", "content": "sea " * 600}])
            assert refused.value.limit == 512 and refused.value.prompt_tokens > 512 and "512" in str(refused.value)
            meta: dict = {}
            async for _ in engine.stream_chat("m", path, facts, short, max_tokens=2, meta=meta):
                pass
            assert meta["finish_reason"] == "length" and meta["completion_tokens"] >= 1
            assert await engine.count_tokens("m", path, facts, short) == cold  # the loaded model agrees
            (ps,) = engine.loaded()
            assert ps["n_ctx"] == 512 and ps["device"] in ("cpu", "gpu") and ps["unloads_in_secs"] > 0
            assert await engine.unload_idle() == []  # used just now
            assert await engine.unload_idle(time.monotonic() + 61) == ["m"]
            assert engine.loaded() == []
            engine.keep_alive_secs = 0  # 0 keeps models loaded however long they idle
            await engine.chat("m", path, facts, short, max_tokens=1)
            assert await engine.unload_idle(time.monotonic() + 10**6) == [] and engine.is_loaded("m")
        finally:
            await engine.close()

    asyncio.run(go())


def _fake_tools(tmp_path: Path, **scripts: str) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, body in scripts.items():
        tool = bin_dir / name
        tool.write_text(f"#!/bin/sh\n{body}\n")
        tool.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("CMAKE_ARGS", "PINKYBRAIN_GPU")}
    # Only the fake tools and the basics: no real nvcc or nvidia-smi of this machine leaks in.
    env["PATH"] = f"{bin_dir}:/usr/bin:/bin"
    return env


def _build_args(env: dict) -> str:
    out = subprocess.run(["bash", str(ROOT / "install.sh"), "--print-llama-build"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_install_builds_llama_cpp_for_the_gpu_it_finds(tmp_path):
    linux = 'case "$1" in -s) echo Linux;; *) echo x86_64;; esac'
    cpu_only = _build_args(_fake_tools(tmp_path, uname=linux))
    assert "-DGGML_NATIVE=OFF" in cpu_only and "CUDA" not in cpu_only and "METAL" not in cpu_only
    no_driver = _build_args(_fake_tools(tmp_path, uname=linux, nvcc="exit 0"))
    assert "CUDA" not in no_driver  # nvcc without the NVIDIA driver: a CUDA build would not even import
    env = _fake_tools(tmp_path, uname=linux, nvcc="exit 0", **{"nvidia-smi": "echo GPU 0: fake"})
    cuda = _build_args(env)
    assert "-DGGML_CUDA=ON" in cuda and cuda.startswith(cpu_only)  # the portable CPU flags stay
    assert "-DGGML_CUDA" not in _build_args({**env, "PINKYBRAIN_GPU": "0"})
    assert _build_args({**env, "CMAKE_ARGS": "-DGGML_VULKAN=on"}) == "-DGGML_VULKAN=on"
    mac = _build_args(_fake_tools(tmp_path / "mac", uname='case "$1" in -s) echo Darwin;; *) echo arm64;; esac'))
    assert "-DGGML_METAL=ON" in mac and "CUDA" not in mac


def test_a_chat_template_models_prompt_is_counted_as_its_template_renders_it():
    path = default_model_file()
    facts = {**read_gguf_facts(path), "has_chat_template": True}

    async def go():
        engine = LocalEngine(n_ctx=512, n_threads=1)
        try:
            vocab = engine._tokenizer("t", path)  # the vocabulary-only load counting uses
            vocab.metadata["tokenizer.chat_template"] = (
                "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
            messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "My name is Ada."}]
            rendered = "<system>Be brief.</s><user>My name is Ada.</s><assistant>"
            expected = len(vocab.tokenize(rendered.encode(), add_bos=True, special=True))
            assert await engine.count_tokens("t", path, facts, messages) == expected
        finally:
            await engine.close()

    asyncio.run(go())
