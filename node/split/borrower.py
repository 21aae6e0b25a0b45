"""Borrowing: a model loaded over this node and lending peers, by llama.cpp's `llama-server --rpc`.

llama-cpp-python 0.3.36 cannot name RPC devices, so llama-server runs as a child process, bound to
127.0.0.1 on a free port. Its `--rpc` endpoints are loopback listeners of this process, one per lender;
each connection to one opens a `split.rpc` tunnel on the link to that lender and is joined to it, so
the RPC protocol crosses machines only inside the link's encryption. Answers come back through
llama-server's OpenAI-style streaming and are handed on as text pieces, like the local engine's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

from pinkybrain.node.services.inference import TRANSCRIPT_STOPS, InferenceError, transcript_prompt
from pinkybrain.node.services.process import die_with_parent
from pinkybrain.node.services.tunnels import pump
from pinkybrain.node.split.framing import RpcFraming
from pinkybrain.node.split.plan import SplitPlan
from pinkybrain.node.split.tools import Tools

log = logging.getLogger("pinkybrain.split")

TUNNEL_KIND = "split.rpc"
# Loading sends every lender its layers through the links; a large model on a slow link takes a while.
LOAD_TIMEOUT = 600.0
# Output and embeddings stay here: the logits never cross a link, and a tied output matrix is not sent.
KEEP_LOCAL = r"^token_embd\.weight=CPU,^output\.weight=CPU,^output_norm\.weight=CPU"


class SplitError(InferenceError):
    """The split could not load or answer; the message says which part failed."""


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_server_argv(tools: Tools, path: Path, port: int, endpoints: list[str], plan: SplitPlan | None, *,
                      n_ctx: int, threads: int, no_repack: bool = True) -> list[str]:
    """llama-server on 127.0.0.1:`port` with `plan`'s lenders at `endpoints` (None: the whole model here).

    no_repack: compute this node's layers with the CPU backend's plain kernels, as a lender's rpc-server
    does (it never repacks weights). Every layer then runs the same kernels wherever it lands, so a
    greedy answer does not depend on the split: repacked kernels round differently and can flip a near
    tie between two tokens."""
    threads = threads or max(1, (os.cpu_count() or 2) // 2)
    argv = [str(tools.llama_server), "--model", str(path), "--host", "127.0.0.1", "--port", str(port),
            "--ctx-size", str(n_ctx), "--parallel", "1", "--threads", str(threads), "--no-webui"]
    if no_repack:
        argv.append("--no-repack")
    if plan is not None:
        # Only the lenders' RPC devices, in the plan's order (a GPU here is left out of a split's plan).
        argv += ["--rpc", ",".join(endpoints), "--device", ",".join(f"RPC{i}" for i in range(len(endpoints))),
                 "--n-gpu-layers", str(plan.n_gpu_layers),
                 "--tensor-split", ",".join(str(s) for s in plan.tensor_split), "--override-tensor", KEEP_LOCAL]
    else:
        argv += ["--device", "none"]
    return argv


class SplitSession:
    """One model loaded split: the plan, the loopback listeners, the llama-server child."""

    def __init__(self, name: str, path: Path, sha256: str, plan: SplitPlan, *, tools: Tools, mesh,
                 n_ctx: int, threads: int, log_path: Path | None = None):
        self.name, self.path, self.sha256, self.plan = name, path, sha256, plan
        self.tools, self.mesh, self.n_ctx, self.threads = tools, mesh, n_ctx, threads
        self.log_path = log_path
        self.port = 0
        self.proc: asyncio.subprocess.Process | None = None
        self.listeners: list[asyncio.base_events.Server] = []
        self.endpoints: list[str] = []
        self.tunnels: list = []
        self.stats: Counter = Counter()
        self.lock = asyncio.Lock()
        self.loaded_at: float | None = None
        self.last_used = time.monotonic()
        self.failure: str | None = None  # why a lender's tunnel failed, for the error the caller sees
        self._closing = False

    # -- loading -----------------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            for part in self.plan.lenders:
                server = await asyncio.start_server(
                    lambda r, w, p=part: self._joined(p.node_id, r, w), "127.0.0.1", 0)
                self.listeners.append(server)
                self.endpoints.append(f"127.0.0.1:{server.sockets[0].getsockname()[1]}")
            self.port = _free_loopback_port()
            argv = llama_server_argv(self.tools, self.path, self.port, self.endpoints, self.plan,
                                     n_ctx=self.n_ctx, threads=self.threads)
            out = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115 - the child keeps it
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out or asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.STDOUT if out else asyncio.subprocess.DEVNULL,
                    preexec_fn=die_with_parent())
            finally:
                if out:
                    out.close()
            await self._wait_ready()
            self.loaded_at = time.time()
            self.last_used = time.monotonic()  # idle from now, not from before the load
        except BaseException:
            await self.close()
            raise

    async def _joined(self, node_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """llama-server connected to a lender's endpoint: carry the connection over a tunnel to it."""
        part = next(p for p in self.plan.lenders if p.node_id == node_id)
        try:
            # `layers`: the lender may fill its weight cache for these blocks from its own copy of the model.
            tunnel = await self.mesh.open_tunnel(node_id, TUNNEL_KIND, {
                "sha256": self.sha256, "bytes": part.bytes, "layers": [part.first_layer, part.layers]})
        except Exception as exc:  # noqa: BLE001 - told to the caller through `failure`
            self.failure = f"lender {node_id[:7]} refused the split: {exc}"
            log.warning("split of %s: %s", self.name, self.failure)
            writer.close()
            return
        self.tunnels.append(tunnel)
        ended = "remote"
        try:
            ended = await pump(tunnel, reader, writer, RpcFraming(commands=True))
        finally:
            # llama-server opens and closes RPC connections as it likes (it probes each server while it
            # starts); the lender's end closing one is what a lender (or its link) going away looks like,
            # and a split that lost a lender cannot answer again.
            if ended == "remote" and not self._closing and self.failure is None:
                self.failure = f"lender {node_id[:7]} went away: {tunnel.close_reason or 'connection ended'}"

    async def _wait_ready(self) -> None:
        import httpx  # here, not at the top: the node's start does not need it (bench/cold_start.py)

        deadline = time.monotonic() + LOAD_TIMEOUT
        async with httpx.AsyncClient(timeout=5) as client:
            while time.monotonic() < deadline:
                if self.proc.returncode is not None:
                    raise SplitError(f"the split of {self.name} failed to load: "
                                     f"{self.failure or f'llama-server exited with {self.proc.returncode}'}")
                try:
                    if (await client.get(f"http://127.0.0.1:{self.port}/health")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)
        raise SplitError(f"the split of {self.name} did not load in {LOAD_TIMEOUT:.0f}s")

    # -- answering ---------------------------------------------------------------------------------
    async def stream(self, messages: list[dict], *, max_tokens: int, temperature: float, top_p: float,
                     chat: bool = True, seed: int | None = None, meta: dict | None = None) -> AsyncIterator[str]:
        """Pieces of the answer. `chat`: the model has a chat template; without one the prompt is the same
        transcript, with the same sampling, as the local engine uses (services/inference.py), so a greedy
        answer is the same token for token."""
        import httpx

        meta = {} if meta is None else meta
        # llama-cpp-python's sampling defaults, which llama-server would otherwise set its own way.
        body = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "top_k": 40,
                "min_p": 0.05, "repeat_last_n": 64, "stream": True, "cache_prompt": False}
        if chat:
            body.update(messages=messages, repeat_penalty=1.0)
            route = "/v1/chat/completions"
        else:
            body.update(prompt=transcript_prompt(messages), repeat_penalty=1.15, stop=TRANSCRIPT_STOPS)
            route = "/v1/completions"
        if seed is not None:
            body["seed"] = seed
        pieces = 0
        async with self.lock:
            self.last_used = time.monotonic()
            try:
                async with httpx.AsyncClient(timeout=httpx.Timeout(LOAD_TIMEOUT, connect=10)) as client, \
                        client.stream("POST", f"http://127.0.0.1:{self.port}{route}", json=body) as response:
                    if response.status_code != 200:
                        detail = (await response.aread()).decode(errors="replace")[:300]
                        raise SplitError(f"the split of {self.name} refused the query: {detail}")
                    async for line in response.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            raise SplitError(f"the split of {self.name} failed: {chunk['error']}")
                        choice = (chunk.get("choices") or [{}])[0]
                        if choice.get("finish_reason"):
                            meta["finish_reason"] = choice["finish_reason"]
                        if chunk.get("timings"):
                            meta["timings"] = chunk["timings"]
                        piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                        if piece:
                            pieces += 1
                            yield piece
            except (httpx.HTTPError, json.JSONDecodeError) as exc:
                raise SplitError(f"the split of {self.name} broke off: "
                                 f"{self.failure or type(exc).__name__}") from None
            finally:
                self.last_used = time.monotonic()
                # llama-server's own count: a streamed piece can hold more than one token
                meta["completion_tokens"] = (meta.get("timings") or {}).get("predicted_n", pieces)
        if self.failure and meta.get("finish_reason") is None:
            raise SplitError(self.failure)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None and self.failure is None

    def describe(self) -> dict:
        return {"model": self.name, "split": True, "sha256": self.sha256, "pid": self.proc.pid if self.proc else None,
                "loaded_at": self.loaded_at, "idle_secs": round(time.monotonic() - self.last_used, 1),
                "n_ctx": self.n_ctx, "parts": [p.to_dict() for p in self.plan.parts],
                "tunnel_bytes_out": sum(t.bytes_out for t in self.tunnels),
                "tunnel_bytes_in": sum(t.bytes_in for t in self.tunnels)}

    async def close(self) -> None:
        self._closing = True
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        for tunnel in self.tunnels:
            tunnel.close("split unloaded")
        for server in self.listeners:
            server.close()
        self.listeners = []
