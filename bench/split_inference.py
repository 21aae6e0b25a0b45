"""What a split costs: one model run whole, split over 2 and 3 nodes through our encrypted peer links, and
split over llama.cpp's plain RPC on loopback (the engine's own baseline), in one run on 127.0.0.1.

  whole      llama-server (the binary install.sh builds) with the whole model, no RPC
  ours-3     node A borrows from lenders B and C (`query --split`): llama-server on A talks to loopback
             listeners of A's node, each joined to a `split.rpc` tunnel on the encrypted link to a lender,
             whose node joins it to its own loopback rpc-server
  ours-2     the same after C is stopped: A and B
  plain-3/2  the same llama-server arguments and layer plan, its --rpc pointing straight at rpc-servers on
             loopback (no node, no encryption): what the engine costs without us

Every configuration runs the same greedy query `--runs` times after one unmeasured warm-up (the load);
ours-N and plain-N are up side by side and asked in turn (ABAB.., then BABA..), so load from elsewhere on
the machine, which drifts over minutes, weighs on both alike; "vs plain" is the median of each ours run's
tokens/s over that of the plain run next to it.
tokens/s and prompt time come from llama-server's own timings (the same clock for every row); time to
first token is measured by this script at the HTTP stream it reads (through node A for ours, straight
from llama-server for plain and whole). Bytes and frames per token: what A's peer links carried (sealed,
both ways, heartbeats included) during the measured runs, over the tokens generated. All nodes and servers share this machine's cores,
so a split here shows the cost of the links, never a speed-up.

    .venv/bin/python bench/split_inference.py [--runs 3] [--max-tokens 64] [--threads 1] [--json]

Exit status 0, or 1 when a configuration failed or the answers differ, 2 when setup failed.
"""

from __future__ import annotations

import argparse
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
from api_load import NotReady, _stop, free_port, save_node_config, start_ready
from query_overhead import default_model_file

from pinkybrain.node.services.inference import TRANSCRIPT_STOPS, transcript_prompt
from pinkybrain.node.split.borrower import llama_server_argv
from pinkybrain.node.split.plan import Offer, plan_split
from pinkybrain.node.split.service import block_sizes
from pinkybrain.node.split.tools import find_tools

PROMPT = "Explain how a bicycle stays upright while it is moving."
SYSTEM = "You answer briefly."
# The node's request: a profile with a fixed system prompt, greedy. The direct runs send llama-server what
# the node's split sends for this model (it has no chat template): the local engine's transcript prompt
# and sampling, so every configuration must produce the same tokens.
PROFILE = {"bench": {"description": "Greedy, for the split benchmark.", "system_prompt": SYSTEM,
                     "temperature": 0.0, "top_p": 1.0, "max_tokens": 4096}}
NAME = "gemma3-270m-q4-k-m"


def write_config(home: Path, secret: str, port: int, args, peers: list[str], lend: bool) -> Path:
    config = {
        "node": {"name": f"bench-{home.name}"},
        "p2p": {"secret": secret, "listen": f"127.0.0.1:{port}", "mdns": False, "peers": peers},
        "mesh": {"public": False, "stealth": True},
        "sharing": {"shared_models_dir": str(home / "shared_models"), "split": lend},
        "logging": {"level": "warning"},
        "resource_guard": {"cpu_threshold": 100, "ram_threshold": 100},
        "inference": {"n_ctx": args.n_ctx, "n_threads": args.threads},
        "specialists": {"profiles": PROFILE},
    }
    return save_node_config(home, config)


def start_exe(argv: list[str], log: Path) -> subprocess.Popen:
    with log.open("ab") as fh:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise NotReady(f"{url}: the process exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise NotReady(f"{url} not ready in {timeout:.0f}s")


def wait_port(port: int, timeout: float = 20) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise NotReady(f"rpc-server on {port} did not listen")


def ask_llama(port: int, args) -> dict:
    """One greedy chat completion straight from llama-server: its timings and our time to first token."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}]
    body = {"prompt": transcript_prompt(messages), "max_tokens": args.max_tokens, "temperature": 0.0, "top_p": 1.0,
            "top_k": 40, "min_p": 0.05, "repeat_last_n": 64, "repeat_penalty": 1.15, "stop": TRANSCRIPT_STOPS,
            "stream": True, "cache_prompt": False}
    start, first, pieces, timings = time.perf_counter(), math.nan, [], {}
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            piece = (chunk.get("choices") or [{}])[0].get("text")
            if piece:
                if not pieces:
                    first = (time.perf_counter() - start) * 1000
                pieces.append(piece)
            timings = chunk.get("timings") or timings
    return {"first_ms": first, "text": "".join(pieces).strip(), "timings": timings, "bytes": math.nan,
            "frames": math.nan}


def link_bytes(client: httpx.Client, base: str) -> tuple[int, int]:
    """Bytes and frames A's peer links carried so far, both ways."""
    peers = client.get(f"{base}/api/peers").json()["peers"]
    return (sum(p["bytes_in"] + p["bytes_out"] for p in peers), sum(p["frames_in"] + p["frames_out"] for p in peers))


def ask_node(client: httpx.Client, base: str, args) -> dict:
    body = {"prompt": PROMPT, "mode": "specialist", "specialist": "bench", "model": NAME, "max_tokens": args.max_tokens,
            "temperature": 0.0, "stream": True, "split": True}
    before = link_bytes(client, base)
    start, first, end, event = time.perf_counter(), math.nan, None, None
    with client.stream("POST", f"{base}/api/query", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"node A answered HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data = json.loads(line[5:])
                if event == "token" and math.isnan(first):
                    first = (time.perf_counter() - start) * 1000
                elif event == "error":
                    raise RuntimeError(f"node A: {data.get('detail')}")
                elif event == "end":
                    end = data
    if end is None or not end.get("split"):
        raise RuntimeError("node A's answer was not split")
    after = link_bytes(client, base)
    return {"first_ms": first, "text": end["answer"], "timings": end.get("engine_timings") or {},
            "bytes": after[0] - before[0], "frames": after[1] - before[1], "parts": len(end["split"])}


def summarize(name: str, runs: list[dict]) -> dict:
    tps = [r["timings"].get("predicted_per_second") or math.nan for r in runs]
    prompt_ms = [r["timings"].get("prompt_ms") or math.nan for r in runs]
    tokens = [r["timings"].get("predicted_n") or 0 for r in runs]
    per_token = [r["bytes"] / t for r, t in zip(runs, tokens, strict=True) if t and not math.isnan(r["bytes"])]
    frames = [r["frames"] / t for r, t in zip(runs, tokens, strict=True) if t and not math.isnan(r["frames"])]
    return {"config": name, "runs": len(runs), "tokens_per_sec": statistics.median(tps), "tps_runs": tps,
            "prompt_ms": statistics.median(prompt_ms), "ttft_ms": statistics.median(r["first_ms"] for r in runs),
            "tokens": statistics.median(tokens), "bytes_per_token": statistics.median(per_token) if per_token else None,
            "frames_per_token": statistics.median(frames) if frames else None,
            "text": runs[-1]["text"]}


def run_bench(args) -> int:
    tools = find_tools()
    if not tools.usable:
        print(f"split_inference: {tools.problem}", file=sys.stderr)
        return 2
    model = default_model_file()
    sizes, other = block_sizes(model)
    root = Path(tempfile.mkdtemp(prefix="pinkybrain-split-bench-"))
    procs: dict[str, subprocess.Popen] = {}
    results: list[dict] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    def plan_for(n: int):
        big = 1 << 40  # equal offers: an even split, as a forced split over equal machines makes
        return plan_split(len(sizes), max(sizes), Offer("a", "a", big, local=True),
                          [Offer(f"l{i}", f"l{i}", big, 1.0) for i in range(n - 1)], force_all=True)

    def measure(*pairs) -> None:
        """(name, ask) pairs, their runs interleaved (ABAB.., then BABA..) so that load from elsewhere on
        the machine, which drifts over minutes, hits each configuration alike."""
        for _, ask in pairs:
            ask()  # warm-up: the load, and the first query
        runs: dict[str, list[dict]] = {name: [] for name, _ in pairs}
        for i in range(args.runs):
            for name, ask in pairs if i % 2 == 0 else pairs[::-1]:
                runs[name].append(ask())
        for name, _ in pairs:
            results.append(summarize(name, runs[name]))
            print(f"  {name}: done", file=sys.stderr)

    def start_plain(n: int) -> int:
        """llama-server with rpc-servers for n - 1 lenders on loopback (n == 1: the whole model); its port."""
        rpc_ports = [free_port() for _ in range(n - 1)]
        for i, port in enumerate(rpc_ports):
            procs[f"rpc{i}"] = start_exe([str(tools.rpc_server), "--host", "127.0.0.1", "--port", str(port),
                                          "--threads", str(args.threads)], root / f"rpc{i}.log")
            wait_port(port)
        http = free_port()
        argv = llama_server_argv(tools, model, http, [f"127.0.0.1:{p}" for p in rpc_ports],
                                 plan_for(n) if n > 1 else None, n_ctx=args.n_ctx, threads=args.threads)
        procs["llama"] = start_exe(argv, root / f"llama-{n}.log")
        wait_http(f"http://127.0.0.1:{http}/health", procs["llama"])
        return http

    def stop_plain() -> None:
        for key in [k for k in procs if k == "llama" or k.startswith("rpc")]:
            _stop(procs.pop(key), key)

    try:
        http = start_plain(1)
        measure(("whole", lambda: ask_llama(http, args)))
        stop_plain()

        # ours: three real nodes, up beside plain llama.cpp RPC with as many nodes, asked in turn
        secret = secrets.token_urlsafe(32)
        ports = {n: free_port() for n in "abc"}
        base = {n: f"http://127.0.0.1:{p}" for n, p in ports.items()}
        homes = {n: root / n for n in "abc"}
        for n in "bc":
            procs[n] = start_ready(homes[n], write_config(homes[n], secret, ports[n], args, [], True), ports[n], secret)
        config_a = write_config(homes["a"], secret, ports["a"], args, [base["b"], base["c"]], False)
        shutil.copyfile(model, homes["a"] / "shared_models" / f"{NAME}.gguf")
        procs["a"] = start_ready(homes["a"], config_a, ports["a"], secret)
        from pinkybrain.skill.signing import HmacAuth

        auth = HmacAuth(json.loads((homes["a"] / "owner.key").read_text())["key"], credential="owner")
        with httpx.Client(auth=auth, timeout=600) as client:
            def lenders() -> int:
                return client.get(f"{base['a']}/api/capabilities").json()["split"]["lenders_now"]

            deadline = time.monotonic() + 60
            while lenders() < 2:
                if time.monotonic() > deadline:
                    raise NotReady("node A did not see two lenders")
                time.sleep(0.5)
            http = start_plain(3)
            measure(("plain-3", lambda: ask_llama(http, args)), ("ours-3", lambda: ask_node(client, base["a"], args)))
            stop_plain()
            _stop(procs.pop("c"), "c")
            deadline = time.monotonic() + 60
            while lenders() != 1:
                if time.monotonic() > deadline:
                    raise NotReady("node A still sees node C lending")
                time.sleep(0.5)
            http = start_plain(2)
            measure(("plain-2", lambda: ask_llama(http, args)), ("ours-2", lambda: ask_node(client, base["a"], args)))
    except NotReady as exc:
        print(f"split_inference: {exc} (logs in {root})", file=sys.stderr)
        return 2
    finally:
        for name, proc in list(procs.items()):
            _stop(proc, name)
    if args.keep:
        print(f"logs in {root}", file=sys.stderr)
    else:
        shutil.rmtree(root, ignore_errors=True)
    return report(results, args)


def report(results: list[dict], args) -> int:
    by = {r["config"]: r for r in results}
    results = [by[name] for name in ("whole", "plain-3", "plain-2", "ours-3", "ours-2") if name in by]
    for r in results:
        plain = by.get(f"plain-{r['config'].split('-')[-1]}") if r["config"].startswith("ours") else None
        if plain:  # the median of each run over the plain run next to it: slow drift in load cancels out
            r["vs_plain"] = statistics.median(o / p for o, p in zip(r["tps_runs"], plain["tps_runs"], strict=True))
    if args.json:
        print(json.dumps({"results": results}, indent=2))
    else:
        whole = by["whole"]["tokens_per_sec"]
        print(f"{'config':<8} {'tok/s':>7} {'vs whole':>8} {'vs plain':>8} {'prompt ms':>9} {'TTFT ms':>8} "
              f"{'link B/token':>12} {'frames/token':>12}")
        for r in results:
            n = r["config"].split("-")[-1]
            plain = by.get(f"plain-{n}") if r["config"].startswith("ours") else None
            vs_plain = f"{r['vs_plain']:>7.3f}x" if plain else f"{'':>8}"
            bpt = f"{r['bytes_per_token']:>12.0f}" if r["bytes_per_token"] else f"{'-':>12}"
            bpt += f" {r['frames_per_token']:>12.1f}" if r["frames_per_token"] else f" {'-':>12}"
            print(f"{r['config']:<8} {r['tokens_per_sec']:>7.1f} {r['tokens_per_sec'] / whole:>7.3f}x {vs_plain} "
                  f"{r['prompt_ms']:>9.1f} {r['ttft_ms']:>8.1f} {bpt}")
        print(f"\n{args.runs} runs each, {args.max_tokens} tokens max, greedy, {args.threads} thread(s) per process, "
              f"all on one machine ({os.cpu_count()} cores)")
    texts = {r["text"] for r in results}
    if len(texts) != 1:
        print("the configurations' greedy answers differ", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-ctx", type=int, default=1024)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the logs folder")
    return run_bench(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
