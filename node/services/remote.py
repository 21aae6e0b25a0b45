"""Remote inference: running a model a peer shares, and serving this node's shared models to peers.

Serving (`infer.chat`, unary; `infer.stream`, streamed pieces) answers only sealed requests (see
core/sealed.py): the query and the answer are encrypted end to end between the asking node's key and
ours, and signed, so a relay on the way sees ciphertext. A request is refused with an RPC error code:
  busy        this node's resource guard has paused sharing, sharing is disabled, or it is serving
              MAX_SERVING remote queries already (the caller tries another peer)
  not_shared  the model is not one of this node's current shares. The file is found from our own
              signed entry and resolved through `resolve_shared` (never a path from the request), and
              must still have the size it was shared with. Cloud models are served only when their
              owner shared them with force and `sharing.cloud_models` is still true.
  malformed / wrong_recipient / bad_signature / unexpected_sender / tampered / stale / replay
              an envelope that fails the checks in sealed.py
  invalid_request, inference_failed
The asker is whoever signed the envelope (normally the link's peer; a relayed envelope names its origin),
and the answer is sealed to that key. The serving node keeps nothing of the exchange (it is the asker's
conversation), and neither side logs prompt or answer text.

Asking: `candidates(model)` lists connected peers whose signed catalog has the model (the entry must
verify and be owned by that peer), leaving out peers whose guard has paused sharing, cheapest first by
fit (exact name before a pattern match), CPU and RAM load, and link latency. `chat` and `stream` try
them in that order; a refusal, a dead link (reported within the mesh's heartbeat bound) or a timeout
moves on to the next, all within `p2p.remote_timeout_secs`. A stream fails over only before its first
piece; a peer lost after that ends it with StreamBroken, since the pieces already shown cannot be taken
back.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from pinkybrain.node.core.sealed import CHUNK, REPLY, REQUEST, ReplayGuard, Sealer, SealError, new_query_id
from pinkybrain.node.core.specialists import MAX_TOKENS_LIMIT
from pinkybrain.node.services.cloud import CloudError
from pinkybrain.node.services.inference import InferenceError
from pinkybrain.node.services.mesh import MessageTooLarge, PeerGone, RemoteError, RpcError, RpcTimeout
from pinkybrain.node.services.models import (
    ModelNotFound,
    ModelPathError,
    ShareChanged,
    entry_bytes,
    verify_entry,
)

log = logging.getLogger("pinkybrain.remote")

CHAT, STREAM = "infer.chat", "infer.stream"
MAX_SERVING = 4  # remote queries run or queued here at once; more are told `busy` and go elsewhere
MAX_MESSAGES = 512
MAX_TEXT = 1_000_000  # characters over all messages: a frame holds about this much JSON
ROLES = ("system", "user", "assistant")
UNKNOWN_LATENCY_MS = 50.0
_GLOB = set("*?[")


class RemoteFailed(RuntimeError):
    """No peer could run the call. `attempts`: [{"node", "error", "detail"}] in the order tried."""

    def __init__(self, message: str, attempts: list[dict] | None = None):
        super().__init__(message)
        self.attempts = attempts or []


class StreamBroken(RemoteFailed):
    """The serving peer failed after pieces of the answer had been passed on."""


@dataclass(frozen=True)
class Candidate:
    peer_id: str
    peer_name: str | None
    model: str
    kind: str  # local (a GGUF file on the peer) or cloud
    exact: bool
    cost: float
    reasons: tuple[str, ...]


@dataclass
class RemoteResult:
    text: str
    usage: dict
    elapsed_ms: float
    model: str
    node: str
    attempts: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class _Job:
    sender: str
    qid: str
    model: str
    kind: str
    path: Path | None
    messages: list[dict]
    settings: dict
    payment: object = None  # what _accept_payment returned (the public mesh: the asker's commitment)


class RemoteInference:
    """On the private mesh as it is; services/public_mesh.py binds a subclass to the public mesh (`mesh`)
    and fills the hooks below: whom to ask and serve (Web of Trust) and how a query is paid (credits)."""

    def __init__(self, runtime, mesh=None):
        self.runtime = runtime
        self.mesh = runtime.mesh if mesh is None else mesh
        self.sealer = Sealer(runtime.identity)
        self.replay = ReplayGuard()
        self.timeout = float(runtime.cfg["p2p.remote_timeout_secs"])
        self.serving = 0
        # Whether serving a query leaves log lines (peer, model, timing; never text). The public mesh turns
        # this off unless logging.public_mesh is on: a stranger's use of this node leaves no trace.
        self.log_serving = True
        self._verified: OrderedDict[bytes, bool] = OrderedDict()  # catalog entries already checked
        self.mesh.register_handler(CHAT, self._serve_chat)
        self.mesh.register_handler(STREAM, self._serve_stream)

    # -- asking ------------------------------------------------------------------------------------
    def candidates(self, model: str) -> list[Candidate]:
        """Peers that can run `model` (a name, or an fnmatch pattern), cheapest first; paused peers left out."""
        pattern = bool(_GLOB & set(model))
        out = []
        for peer_id in self.mesh.peer_ids():
            info = self.mesh.peer(peer_id)
            if info is None or info["guard"].get("sharing_paused") or info.get("sharing") is False:
                continue
            for entry in info.get("models", []):
                name = entry.get("name")
                if not isinstance(name, str) or not (name == model or (pattern and fnmatch.fnmatch(name, model))):
                    continue
                if entry.get("owner") != peer_id or not self._entry_ok(entry):
                    continue  # someone else's entry passed along, or a forged one: not this peer's to serve
                out.append(_candidate(peer_id, info, name, entry, exact=name == model))
        out.sort(key=lambda c: (c.cost, c.peer_id))
        return [c for c in out if self._may_ask(c.peer_id)]

    def model_names(self) -> list[str]:
        """Models some unpaused peer shares, in a stable order."""
        return sorted({c.model for c in self.candidates("*")})

    def not_serving(self) -> list[str]:
        """Linked peers that serve no model now, and why: what an error saying "available: none" should name."""
        out = []
        for peer_id in self.mesh.peer_ids():
            info = self.mesh.peer(peer_id)
            if info is None:
                continue
            name = info.get("name")
            who = f"{name[:40] if isinstance(name, str) else '?'} ({peer_id[:7]})"
            guard = info.get("guard") if isinstance(info.get("guard"), dict) else {}
            if guard.get("sharing_paused"):
                reason = guard.get("reason")
                out.append(f"{who} has paused sharing: {reason[:120] if isinstance(reason, str) else 'its resource guard'}")
            elif info.get("sharing") is False:
                out.append(f"{who} has sharing turned off")
        return out

    def _entry_ok(self, entry: dict) -> bool:
        signature = entry.get("signature")
        if not isinstance(signature, str):
            return False
        # Keyed by the signed bytes and the signature together: an altered entry is checked afresh.
        key = hashlib.sha256(entry_bytes(entry) + signature.encode()).digest()
        known = self._verified.get(key)
        if known is None:
            known = verify_entry(entry)
            self._verified[key] = known
            while len(self._verified) > 4096:
                self._verified.popitem(last=False)
        return known

    def _request(self, peer_id: str, model: str, messages: list[dict], settings: dict) -> tuple[str, bytes, object]:
        qid = new_query_id()
        body = {"qid": qid, "ts": time.time(), "model": model, "messages": messages, "settings": settings}
        token = self._prepare_request(peer_id, body)
        return qid, self.sealer.seal(peer_id, REQUEST, body), token

    # -- hooks (no-ops on the private mesh) ----------------------------------------------------------
    def _may_ask(self, peer_id: str) -> bool:
        """Whether queries may be routed to this peer at all."""
        return True

    def _prepare_request(self, peer_id: str, body: dict) -> object:
        """Add to a request before it is sealed; may raise to stop the whole call (not a failover)."""
        return None

    def _settle(self, peer_id: str, token: object, final: dict, text: str) -> None:
        """After a complete answer (`final`: the reply or the last stream piece); SealError rejects it."""

    def _check_asker(self, sender: str) -> None:
        """Refuse (RpcError) an asker before anything else is looked at."""

    def _accept_payment(self, sender: str, body: dict) -> object:
        """The last check before work starts; RpcError refuses. Its result rides on the job."""
        return None

    def _delivered(self, job: _Job, text: str, elapsed_ms: float) -> dict:
        """Extra fields for the answer's final message, once the answer is complete."""
        return {}

    async def chat(self, model: str, messages: list[dict], *, max_tokens: int, temperature: float,
                   top_p: float) -> RemoteResult:
        settings = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        attempts: list[dict] = []
        for cand in self.candidates(model):
            left = deadline - loop.time()
            if left <= 0:
                break
            start = time.perf_counter()
            try:
                qid, envelope, token = self._request(cand.peer_id, cand.model, messages, settings)
                reply = await self.mesh.request(cand.peer_id, CHAT, envelope, timeout=left)
                body = self.sealer.open(reply, REPLY, sender=cand.peer_id).body
                if body.get("qid") != qid or not isinstance(body.get("text"), str):
                    raise SealError("malformed", "the reply does not answer this query")
                self._settle(cand.peer_id, token, body, body["text"])
            except (RemoteError, PeerGone, RpcTimeout, SealError, MessageTooLarge) as exc:
                attempts.append(_attempt(cand, exc))
                log.info("remote %s on %s failed (%s); %s", cand.model, cand.peer_id[:7], attempts[-1]["error"],
                         "trying the next peer" if deadline > loop.time() else "out of time")
                continue
            usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
            return RemoteResult(text=body["text"], usage=usage,
                                elapsed_ms=round((time.perf_counter() - start) * 1000, 1),
                                model=cand.model, node=cand.peer_id, attempts=attempts)
        raise _failed(model, attempts, self.timeout, self.not_serving())

    async def stream(self, model: str, messages: list[dict], *, max_tokens: int, temperature: float,
                     top_p: float, meta: dict | None = None) -> AsyncIterator[str]:
        """Text pieces from the first peer that starts answering; `meta` gets node, model and attempts."""
        settings = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
        meta = {} if meta is None else meta
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        attempts: list[dict] = []
        meta["attempts"] = attempts
        for cand in self.candidates(model):
            left = deadline - loop.time()
            if left <= 0:
                break
            pieces = 0
            texts: list[str] = []  # the answer so far, for _settle (a receipt is for the whole answer)
            try:
                qid, envelope, token = self._request(cand.peer_id, cand.model, messages, settings)
                async with self.mesh.stream(cand.peer_id, STREAM, envelope, timeout=left) as chunks:
                    while True:
                        left = deadline - loop.time()
                        if left <= 0:
                            raise RpcTimeout(f"no answer within p2p.remote_timeout_secs ({self.timeout:g}s)")
                        try:
                            raw = await asyncio.wait_for(chunks.__anext__(), left)
                        except StopAsyncIteration:
                            raise SealError("malformed", "the stream ended without its final piece") from None
                        except RpcTimeout:
                            raise
                        except TimeoutError:
                            raise RpcTimeout(
                                f"no answer within p2p.remote_timeout_secs ({self.timeout:g}s)") from None
                        body = self.sealer.open(raw, CHUNK, sender=cand.peer_id).body
                        if body.get("qid") != qid or body.get("seq") != pieces:
                            raise SealError("malformed", "a stream piece is out of order or for another query")
                        if body.get("done"):
                            self._settle(cand.peer_id, token, body, "".join(texts))
                            break
                        text = body.get("text")
                        if not isinstance(text, str):
                            raise SealError("malformed", "a stream piece has no text")
                        if pieces == 0:
                            meta.update(node=cand.peer_id, model=cand.model, remote=True)
                        pieces += 1
                        texts.append(text)
                        yield text
                meta.update(node=cand.peer_id, model=cand.model, remote=True)
                return
            except (RemoteError, PeerGone, RpcTimeout, SealError, MessageTooLarge) as exc:
                attempts.append(_attempt(cand, exc))
                if pieces:
                    raise StreamBroken(
                        f"the answer from peer {cand.peer_id[:7]} broke off after {pieces} pieces "
                        f"({attempts[-1]['error']}: {attempts[-1]['detail']}); it is incomplete",
                        attempts) from None
                log.info("remote stream of %s on %s failed before its first piece (%s); %s", cand.model,
                         cand.peer_id[:7], attempts[-1]["error"],
                         "trying the next peer" if deadline > loop.time() else "out of time")
        raise _failed(model, attempts, self.timeout, self.not_serving())

    # -- serving -----------------------------------------------------------------------------------
    def _admit(self, ctx, payload) -> _Job:
        if not isinstance(payload, (bytes, bytearray)):
            raise RpcError("malformed", "expected a sealed envelope")
        try:
            opened = self.sealer.open(payload, REQUEST)
            body = opened.body
            self._check_asker(opened.sender)
            self.replay.check(opened.sender, body.get("qid"), body.get("ts"))
        except SealError as exc:
            raise RpcError(exc.code, str(exc)) from None
        runtime = self.runtime
        if not runtime.sharing_active:
            why = runtime.guard.reason if runtime.guard.paused else "sharing is disabled on this node"
            raise RpcError("busy", f"sharing is paused: {why}")
        if self.serving >= MAX_SERVING:
            raise RpcError("busy", f"already serving {self.serving} remote queries")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise RpcError("invalid_request", "the request names no model")
        kind, path = self._shared_target(model)
        messages = _check_messages(body.get("messages"))
        settings = _check_settings(body.get("settings"))
        payment = self._accept_payment(opened.sender, body)
        return _Job(opened.sender, body["qid"], model, kind, path, messages, settings, payment)

    def _shared_target(self, model: str) -> tuple[str, Path | None]:
        runtime = self.runtime
        entry = next((e for e in runtime.models.shared_entries() if e.get("name") == model), None)
        shown = model[:80]
        if entry is None:
            raise RpcError("not_shared", f"this node does not share a model named {shown!r}")
        if entry.get("kind") == "cloud":
            # Shared only with force; the config switch is checked again in case it was turned off since.
            if model not in runtime.brain.cloud_models or not runtime.cfg["sharing.cloud_models"]:
                raise RpcError("not_shared", f"{shown!r} is a cloud model this node does not share")
            return "cloud", None
        try:  # the file must still be the one shared: a changed stamp is re-hashed before it is served
            path = runtime.models.served_path(model)
        except ShareChanged:
            raise RpcError("not_shared", f"the shared model {shown!r} changed on disk since it was shared; "
                                         "not served until its hash is checked again") from None
        except (ModelPathError, ModelNotFound, OSError):
            raise RpcError("not_shared", f"the shared model {shown!r} is no longer available here") from None
        return "local", path

    def _serve_log(self, level: int, msg: str, *args) -> None:
        if self.log_serving:
            log.log(level, msg, *args)

    async def _serve_chat(self, ctx, payload) -> bytes:
        job = self._admit(ctx, payload)
        self.serving += 1
        start = time.perf_counter()
        self._serve_log(logging.INFO, "serving a remote query from %s on %s", job.sender[:7], job.model)
        try:
            brain = self.runtime.brain
            try:
                if job.kind == "cloud":
                    text, usage, _ = await brain.cloud.chat(brain.cloud_models[job.model], job.messages,
                                                            **job.settings)
                else:
                    facts = await asyncio.to_thread(brain.facts.get, job.path)
                    result = await brain.engine.chat(job.model, job.path, facts, job.messages, **job.settings)
                    text = result.text
                    usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens}
            except (InferenceError, CloudError, OSError, ValueError, IndexError) as exc:
                self._serve_log(logging.WARNING, "remote query from %s on %s failed: %s", job.sender[:7], job.model,
                                type(exc).__name__)
                raise RpcError("inference_failed", _one_line(exc)) from None
            elapsed = round((time.perf_counter() - start) * 1000, 1)
            self._serve_log(logging.INFO, "served a remote query from %s on %s in %.0f ms", job.sender[:7],
                            job.model, elapsed)
            return self.sealer.seal(job.sender, REPLY, {
                "qid": job.qid, "text": text, "usage": usage, "model": job.model,
                "node": self.runtime.identity.node_id, "elapsed_ms": elapsed,
                **self._delivered(job, text, elapsed)})
        finally:
            self.serving -= 1

    async def _serve_stream(self, ctx, payload):
        job = self._admit(ctx, payload)
        self.serving += 1
        start = time.perf_counter()
        self._serve_log(logging.INFO, "serving a remote stream from %s on %s", job.sender[:7], job.model)
        seq = 0
        texts: list[str] = []
        try:
            brain = self.runtime.brain
            try:
                if job.kind == "cloud":
                    pieces = brain.cloud.stream(brain.cloud_models[job.model], job.messages, **job.settings)
                else:
                    facts = await asyncio.to_thread(brain.facts.get, job.path)
                    pieces = brain.engine.stream_chat(job.model, job.path, facts, job.messages, **job.settings)
            except (OSError, ValueError, IndexError) as exc:
                raise RpcError("inference_failed", _one_line(exc)) from None
            try:
                async for piece in pieces:
                    texts.append(piece)
                    yield self.sealer.seal(job.sender, CHUNK, {"qid": job.qid, "seq": seq, "text": piece})
                    seq += 1
            except (InferenceError, CloudError, OSError, ValueError, IndexError) as exc:
                self._serve_log(logging.WARNING, "remote stream from %s on %s failed: %s", job.sender[:7],
                                job.model, type(exc).__name__)
                raise RpcError("inference_failed", _one_line(exc)) from None
            finally:
                await pieces.aclose()
            elapsed = round((time.perf_counter() - start) * 1000, 1)
            self._serve_log(logging.INFO, "served a remote stream from %s on %s in %.0f ms", job.sender[:7],
                            job.model, elapsed)
            yield self.sealer.seal(job.sender, CHUNK, {
                "qid": job.qid, "seq": seq, "done": True, "model": job.model,
                "node": self.runtime.identity.node_id, "elapsed_ms": elapsed,
                **self._delivered(job, "".join(texts), elapsed)})
        finally:
            self.serving -= 1


def _candidate(peer_id: str, info: dict, name: str, entry: dict, *, exact: bool) -> Candidate:
    load = info.get("load") or {}
    cpu = _percent(load.get("cpu_percent"))
    ram = _percent(load.get("ram_percent"))
    latency = info.get("latency_ms")
    latency = UNKNOWN_LATENCY_MS if not isinstance(latency, (int, float)) else float(latency)
    # Lower is better. A pattern match costs more than any load; a busy CPU slows generation more than
    # RAM in use or a few milliseconds of link latency do.
    cost = (0.0 if exact else 100.0) + cpu * 0.5 + ram * 0.25 + min(latency, 2000.0) / 10
    reasons = (
        "exact model" if exact else "matches the pattern",
        f"cpu {cpu:.0f}%", f"ram {ram:.0f}%", f"latency {latency:.1f} ms",
    )
    return Candidate(peer_id, info.get("name"), name, "cloud" if entry.get("kind") == "cloud" else "local",
                     exact, cost, reasons)


def _percent(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return 50.0  # unknown load: assume middling rather than idle
    return min(max(float(value), 0.0), 100.0)


def _attempt(cand: Candidate, exc: BaseException) -> dict:
    if isinstance(exc, RemoteError):
        code, detail = exc.code, exc.message
    elif isinstance(exc, SealError):
        code, detail = "bad_reply", str(exc)
    elif isinstance(exc, RpcTimeout):
        code, detail = "timeout", str(exc)
    elif isinstance(exc, PeerGone):
        code, detail = "peer_gone", str(exc)
    else:
        code, detail = "too_large", str(exc)
    return {"node": cand.peer_id, "model": cand.model, "error": code, "detail": detail[:300]}


def _failed(model: str, attempts: list[dict], timeout: float, not_serving: list[str] = ()) -> RemoteFailed:
    if not attempts:
        why = f"; not serving now: {'; '.join(not_serving[:8])}" if not_serving else ""
        return RemoteFailed(f"no connected peer shares model {model!r} (or every one that does has paused "
                            f"sharing){why}")
    tried = "; ".join(f"{a['node'][:7]}: {a['error']}: {a['detail']}" for a in attempts)
    return RemoteFailed(f"no peer could run model {model!r} within {timeout:g}s (tried {tried})", attempts)


def _one_line(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__).splitlines()[0][:300]


def _check_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not 1 <= len(messages) <= MAX_MESSAGES:
        raise RpcError("invalid_request", f"messages must be a list of 1-{MAX_MESSAGES} chat messages")
    out, total = [], 0
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise RpcError("invalid_request", "each message needs a role (system, user, assistant) and text")
        total += len(m["content"])
        out.append({"role": m["role"], "content": m["content"]})
    if total > MAX_TEXT:
        raise RpcError("invalid_request", f"the messages are over {MAX_TEXT} characters")
    return out


def _check_settings(settings) -> dict:
    if not isinstance(settings, dict):
        raise RpcError("invalid_request", "settings must be an object")
    max_tokens, temperature, top_p = settings.get("max_tokens"), settings.get("temperature"), settings.get("top_p")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise RpcError("invalid_request", f"max_tokens must be a whole number from 1 to {MAX_TOKENS_LIMIT}")
    for name, value, low, high in (("temperature", temperature, 0.0, 2.0), ("top_p", top_p, 0.0, 1.0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise RpcError("invalid_request", f"{name} must be a number from {low:g} to {high:g}")
    return {"max_tokens": max_tokens, "temperature": float(temperature), "top_p": float(top_p)}
