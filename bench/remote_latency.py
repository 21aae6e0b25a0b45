"""What running a query on a peer adds: the same query served locally vs through the mesh, over loopback.

One run, on 127.0.0.1 only (mDNS off, stealthy nodes):
  * node B holds a GGUF (the embedded default model unless --model) in its shared_models/ and shares it,
  * node A has no model and B as its static peer, so A's queries run on B over the encrypted link with
    the query and answer sealed end to end (services/remote.py),
  * both have a `bench` specialist profile with temperature 0 (greedy decoding: both paths produce the
    same tokens) and the same inference settings,
then, after one unmeasured warm-up per path (model load excluded), times `--runs` rounds of four
queries, rotating their order each round so drift and background noise hit all alike:

  local         POST /api/query on B: B runs the model itself.
  remote        POST /api/query on A: A seals the query to B, B runs the same model, A opens the answer.
  local-stream  the same with stream=true on B: time to the first token event, and to the end.
  remote-stream the same with stream=true on A: every piece crosses the mesh in its own sealed envelope.

Both paths go through one signed HTTP request, routing and a conversation record (on the node asked),
so the difference is what the mesh adds: candidate choice, sealing and opening, the RPC over the peer
link (and one envelope per streamed piece), B's admission checks.

    python bench/remote_latency.py [--runs 10] [--max-tokens 16] [--threads N] [--n-ctx 1024] [--model PATH] [--json]

Exit status: 0 on success, 1 when a query failed, was not served where expected, or the paths generated
different token counts, 2 when a node did not start or the nodes did not link.
"""

from __future__ import annotations

import argparse
import json
import math
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

# Sibling benchmarks hold the node plumbing and the bench profile; run as a script, bench/ is on sys.path.
from api_load import NotReady, _stop, free_port, percentile, save_node_config, start_ready
from query_overhead import PROFILE, default_model_file, profile

from pinkybrain.node.services.brain import EMBEDDED_DEFAULT

DEFAULT_PROMPT = "Explain how a bicycle stays upright while it is moving."
QUERY_TIMEOUT = 600.0
LINK_TIMEOUT = 60.0


def write_config(home: Path, secret: str, port: int, args: argparse.Namespace, peers: list[str]) -> Path:
    config = {
        "node": {"name": f"bench-{home.name}"},
        "p2p": {"secret": secret, "listen": f"127.0.0.1:{port}", "mdns": False, "peers": peers},
        "mesh": {"public": False, "stealth": True},
        "sharing": {"shared_models_dir": str(home / "shared_models")},
        "logging": {"level": "warning"},
        # The guard would refuse remote queries on a busy machine; this measures latency, not the guard.
        "resource_guard": {"cpu_threshold": 100, "ram_threshold": 100},
        "inference": {"n_ctx": args.n_ctx, "n_threads": args.threads, "max_loaded_models": 1},
        "specialists": {"profiles": {PROFILE: profile(args.max_tokens)}},
    }
    return save_node_config(home, config)


def body(args: argparse.Namespace, stream: bool) -> dict:
    return {"prompt": args.prompt, "mode": "single", "specialist": PROFILE, "max_tokens": args.max_tokens,
            "stream": stream}


def ask(client: httpx.Client, base: str, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    response = client.post(f"{base}/api/query", json=body(args, False))
    ms = (time.perf_counter() - start) * 1000
    if response.status_code != 200:
        raise RuntimeError(f"{base} answered HTTP {response.status_code}: {response.text[:300]}")
    answer = response.json()["answers"][0]
    if answer.get("error"):
        raise RuntimeError(f"{base}: {answer['error']}")
    return {"ms": ms, "first_ms": math.nan, "tokens": int(answer.get("tokens") or 0), "node": answer["node"],
            "text": answer["text"]}


def ask_stream(client: httpx.Client, base: str, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    first = math.nan
    pieces, end, event = [], None, None
    with client.stream("POST", f"{base}/api/query", json=body(args, True)) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{base} answered HTTP {response.status_code}: {response.read()[:300]!r}")
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data = json.loads(line[5:])
                if event == "token":
                    if not pieces:
                        first = (time.perf_counter() - start) * 1000
                    pieces.append(data["text"])
                elif event == "error":
                    raise RuntimeError(f"{base}: stream error: {data.get('detail')}")
                elif event == "end":
                    end = data
    ms = (time.perf_counter() - start) * 1000
    if end is None:
        raise RuntimeError(f"{base}: the stream ended without its end event")
    return {"ms": ms, "first_ms": first, "tokens": len(pieces), "node": end["node"], "text": end["answer"]}


def summarize(name: str, runs: list[dict]) -> dict:
    ms = sorted(r["ms"] for r in runs)
    first = sorted(r["first_ms"] for r in runs if not math.isnan(r["first_ms"]))
    return {
        "path": name,
        "runs": len(runs),
        "median_ms": statistics.median(ms),
        "p90_ms": percentile(ms, 90),
        "first_median_ms": statistics.median(first) if first else math.nan,
        "first_p90_ms": percentile(first, 90) if first else math.nan,
        "tokens": statistics.median(r["tokens"] for r in runs),
        "all_ms": [round(r["ms"], 2) for r in runs],
        "all_first_ms": [round(x, 2) for x in first],
    }


HEADER = (f"{'path':<13} {'runs':>4} {'median ms':>10} {'p90 ms':>9} {'added ms':>9} {'ratio':>7} "
          f"{'1st tok ms':>10} {'1st p90':>8} {'1st added':>9}")


def row(r: dict, base: dict) -> str:
    added = r["median_ms"] - base["median_ms"]
    ratio = r["median_ms"] / base["median_ms"] if base["median_ms"] else math.nan
    first_added = r["first_median_ms"] - base["first_median_ms"]
    first = "" if math.isnan(r["first_median_ms"]) else (
        f" {r['first_median_ms']:>10.1f} {r['first_p90_ms']:>8.1f} {first_added:>+9.1f}")
    return (f"{r['path']:<13} {r['runs']:>4} {r['median_ms']:>10.1f} {r['p90_ms']:>9.1f} {added:>+9.1f} "
            f"{ratio:>6.3f}x{first}")


def wait_linked(client: httpx.Client, base: str, b_id: str, model: str) -> None:
    deadline = time.monotonic() + LINK_TIMEOUT
    while time.monotonic() < deadline:
        peers = client.get(f"{base}/api/peers").json()["peers"]
        if any(p["node_id"] == b_id and model in p["shared_models"] for p in peers):
            return
        time.sleep(0.2)
    raise NotReady(f"node A did not see B's shared model {model!r} within {LINK_TIMEOUT:.0f} s")


def run_bench(args: argparse.Namespace) -> int:
    import psutil

    args.threads = args.threads or psutil.cpu_count(logical=True) or 1
    source = Path(args.model) if args.model else default_model_file()
    name = source.name.removesuffix(".gguf") if args.model else EMBEDDED_DEFAULT
    root = Path(tempfile.mkdtemp(prefix="pinkybrain-remote-bench-"))
    procs: dict[str, subprocess.Popen] = {}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        secret = secrets.token_urlsafe(32)
        port = {"a": free_port(), "b": free_port()}
        base = {n: f"http://127.0.0.1:{p}" for n, p in port.items()}
        home_b, home_a = root / "b", root / "a"
        config_b = write_config(home_b, secret, port["b"], args, [])
        # A copy, as tests/model.py does: the node refuses hard links (and symlinks out of its folder).
        shutil.copyfile(source, home_b / "shared_models" / f"{name}.gguf")
        config_a = write_config(home_a, secret, port["a"], args, [base["b"]])
        try:
            procs["b"] = start_ready(home_b, config_b, port["b"], secret)
            procs["a"] = start_ready(home_a, config_a, port["a"], secret)
        except NotReady as exc:
            print(f"remote_latency: {exc}", file=sys.stderr)
            return 2

        from pinkybrain.skill.signing import HmacAuth

        def owner(home: Path) -> HmacAuth:
            return HmacAuth(json.loads((home / "owner.key").read_text())["key"], credential="owner")

        # Each node driven by its owner (sharing is the owner's; B's own query is not held to its guard).
        with httpx.Client(auth=owner(home_b), timeout=QUERY_TIMEOUT) as client, \
                httpx.Client(auth=owner(home_a), timeout=QUERY_TIMEOUT) as client_a:
            shared = client.post(f"{base['b']}/api/models/{name}/share")
            if shared.status_code != 200:
                print(f"remote_latency: B could not share {name}: {shared.text[:300]}", file=sys.stderr)
                return 2
            ids = {n: c.get(f"{base[n]}/api/ping").json()["node_id"] for n, c in (("a", client_a), ("b", client))}
            try:
                wait_linked(client_a, base["a"], ids["b"], name)
            except NotReady as exc:
                print(f"remote_latency: {exc}", file=sys.stderr)
                return 2
            paths = {
                "local": lambda: ask(client, base["b"], args),
                "remote": lambda: ask(client_a, base["a"], args),
                "local-stream": lambda: ask_stream(client, base["b"], args),
                "remote-stream": lambda: ask_stream(client_a, base["a"], args),
            }
            warm = time.perf_counter()
            samples = {p: fn() for p, fn in paths.items()}  # loads the model on B, fills llama.cpp's caches
            if not args.json:
                print(f"model {name} ({source.stat().st_size / 2**20:.0f} MiB), n_ctx {args.n_ctx}, "
                      f"{args.threads} threads, max_tokens {args.max_tokens}, temperature 0; "
                      f"warm-up {time.perf_counter() - warm:.1f} s", flush=True)
            runs: dict[str, list[dict]] = {p: [] for p in paths}
            order = list(paths)
            for i in range(args.runs):
                for p in order[i % len(order):] + order[:i % len(order)]:
                    runs[p].append(paths[p]())
        wrong = [(p, r["node"][:7]) for p, rs in runs.items() for r in rs if r["node"] != ids["b"]]
        results = [summarize(p, runs[p]) for p in paths]
        counts = {p: sorted({r["tokens"] for r in rs}) for p, rs in runs.items()}
        texts = {p: {r["text"] for r in rs} for p, rs in runs.items()}
        same = len({t for ts in texts.values() for t in ts}) == 1
        paired = {}
        for key, (remote, local, field) in {"query": ("remote", "local", "ms"),
                                             "first": ("remote-stream", "local-stream", "first_ms"),
                                             "stream": ("remote-stream", "local-stream", "ms")}.items():
            # Same round, back to back: slow drift and background load cancel out of the difference.
            diffs = sorted(r[field] - x[field] for r, x in zip(runs[remote], runs[local], strict=True))
            paired[key], paired[f"{key}_p90"] = statistics.median(diffs), percentile(diffs, 90)
        if args.json:
            print(json.dumps({"model": name, "added_ms": paired, "n_ctx": args.n_ctx, "threads": args.threads,
                              "max_tokens": args.max_tokens, "runs": args.runs, "prompt": args.prompt,
                              "nodes": ids, "same_answer": same, "token_counts": counts,
                              "answer": samples["local"]["text"], "results": results}, indent=2))
        else:
            print(f"{HEADER}\n{'-' * len(HEADER)}")
            by = {r["path"]: r for r in results}
            for r in results:
                print(row(r, by["local-stream" if r["path"].endswith("stream") else "local"]))
            print(f"\nadded by the mesh, median of the per-round differences (p90): "
                  f"{paired['query']:+.1f} ms ({paired['query_p90']:+.1f}) per query, "
                  f"{paired['first']:+.1f} ms ({paired['first_p90']:+.1f}) to the first streamed token, "
                  f"{paired['stream']:+.1f} ms ({paired['stream_p90']:+.1f}) per streamed query.\n"
                  "ratio: median / the local path's median.")
        if wrong:
            print(f"remote_latency: answers not served by B: {wrong[:5]}", file=sys.stderr)
            return 1
        if not same:
            print(f"warning: the paths answered differently (token counts {counts})", file=sys.stderr)
            return 1
        return 0
    except RuntimeError as exc:
        print(f"remote_latency: {exc}", file=sys.stderr)
        return 1
    finally:
        for n in ("a", "b"):
            _stop(procs.get(n), f"node {n.upper()}")
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="measured rounds (one query per path each)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens to generate per query")
    parser.add_argument("--threads", type=int, default=0, help="llama.cpp threads on B (0: all CPUs)")
    parser.add_argument("--n-ctx", type=int, default=1024, help="context window")
    parser.add_argument("--model", help="a GGUF file (default: the embedded default model)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the user prompt")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    if args.runs < 1 or args.max_tokens < 1 or args.threads < 0 or args.n_ctx < 256:
        parser.error("--runs and --max-tokens must be >= 1, --threads >= 0, --n-ctx >= 256")
    sys.exit(run_bench(args))


if __name__ == "__main__":
    main()
