"""The brain: answers queries through the specialist router with local, cloud and remote models (those
connected peers share), and records every exchange in this node's conversation store.

Model choice for a specialist: its preferred model patterns in order (for each pattern a local model
before a peer's), then `inference.default_model`, then the embedded default model (each local, else on a
peer), then any usable local model, then any model a peer shares. Cloud models are candidates only when a
specialist or the caller names them (they cost money) and only for this node's own user. A model that is
not local runs on the best peer sharing it (services/remote.py picks it and fails over); the answer
names the node that served it. A model no node of the private mesh has runs on a public peer this node's
Web of Trust finds valid (services/public_mesh.py), paid in credits: local, then the private mesh, then
the public mesh. An exchange with any answer from the public mesh is not recorded in the conversation
store (zero query logging for the public mesh; the serving node keeps nothing either), so it has no
session to continue.

A query with a session sends the model the session's earlier turns, newest kept first within the model's
context (the rule is in core/history.py), for local, peer and cloud models alike. A prompt that does not
fit the local model's context is refused before anything is generated (`check_context`).
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import asdict
from pathlib import Path

from pinkybrain.node.core import history
from pinkybrain.node.core.credits import InsufficientCredit
from pinkybrain.node.core.principals import Principal, may_use_cloud_model
from pinkybrain.node.core.router import Answer, NoAnswer, route, run_query
from pinkybrain.node.core.specialists import Specialist, generation_settings, load_specialists
from pinkybrain.node.services.cloud import CloudClient, CloudError, CloudModel, parse_cloud_models
from pinkybrain.node.services.gguf_facts import GgufFactsCache
from pinkybrain.node.services.inference import (
    ContextLengthExceeded,
    EmbeddingEngine,
    GpuSettings,
    InferenceError,
    LocalEngine,
    ModelTooLarge,
)
from pinkybrain.node.services.models import ModelNotFound, ModelPathError, resolve_shared
from pinkybrain.node.services.remote import RemoteFailed

log = logging.getLogger("pinkybrain.brain")
EMBEDDED_DEFAULT = "gemma3-270m-q4-k-m"
# Contexts assumed for history fitting where this node cannot read the model: a peer does not advertise
# its context (4096 was every node's old default), a cloud model has at least this much.
REMOTE_CONTEXT = 4096
CLOUD_CONTEXT = 32768
HISTORY_TURNS = 100  # the most earlier exchanges read from a session (older ones rarely fit anyway)


class NoModel(RuntimeError):
    """No model can answer: nothing usable in shared_models/ and no cloud model named."""


class ModelRefused(NoModel):
    """The model exists but this caller may not use it: a cloud model or an unshared one, asked for by
    someone other than the node's owner (core.principals.may_use_cloud_model)."""


# Set by the API for a request whose owner asked for a split (`query --split`): every model call the request
# makes then runs split over the mesh's lenders (node/split), wherever in the router it is made.
split_requested: ContextVar[bool] = ContextVar("split_requested", default=False)


class Brain:
    def __init__(self, runtime):
        cfg = runtime.cfg
        self.runtime = runtime
        self.specialists: dict[str, Specialist] = load_specialists(cfg["specialists.profiles"])
        self.cloud_models: dict[str, CloudModel] = parse_cloud_models(cfg["cloud.models"])
        self.facts = GgufFactsCache(runtime.data_dir / "gguf-facts.json")
        gpu = GpuSettings(n_gpu_layers=cfg["inference.n_gpu_layers"], main_gpu=cfg["inference.main_gpu"],
                          tensor_split=tuple(cfg["inference.tensor_split"] or ()) or None)
        self.engine = LocalEngine(n_ctx=cfg["inference.n_ctx"], n_threads=cfg["inference.n_threads"],
                                  max_loaded=cfg["inference.max_loaded_models"], gpu=gpu,
                                  keep_alive_secs=cfg["inference.keep_alive_secs"],
                                  memory_limit=cfg["inference.memory_limit_mb"] * 2**20)
        # /v1/embeddings: a separate embedding-mode instance, loaded on first use.
        self.embeddings = EmbeddingEngine(n_ctx=cfg["inference.n_ctx"], n_threads=cfg["inference.n_threads"])
        self.cloud = CloudClient()
        self.default_model = cfg["inference.default_model"]

    async def close(self) -> None:
        await self.engine.close()
        await self.embeddings.close()
        await self.cloud.aclose()

    # -- models ------------------------------------------------------------------------------------
    def local_models(self) -> dict[str, Path]:
        out = {}
        for path in self.runtime.models.local_files():
            name = path.name[: -len(".gguf")]
            try:
                out[name] = resolve_shared(self.runtime.models.models_dir, path.name)
            except (ModelPathError, ModelNotFound):
                continue
        return out

    def remote_models(self) -> list[str]:
        """Models only peers have (local ones shadow a peer's of the same name): the private mesh's, then
        those of public peers this node trusts."""
        names: list[str] = []
        for remote in self._remotes():
            names += [n for n in remote.model_names() if n not in names]
        local = self.local_models()
        return [n for n in names if n not in local and n not in self.cloud_models]

    def _public_remote(self):
        public = getattr(self.runtime, "public", None)
        return public.inference if public is not None and public.joined else None

    def _remotes(self) -> list:
        return [r for r in (getattr(self.runtime, "remote", None), self._public_remote()) if r is not None]

    def usable(self, owner: bool) -> tuple[dict[str, Path], dict[str, CloudModel]]:
        """The local and cloud models a caller may use: all for the owner; for anyone else only what
        this node shares (a cloud model only if the owner shared it with force)."""
        local = self.local_models()
        if owner:
            return local, self.cloud_models
        shared = {e["name"] for e in self.runtime.models.shared_entries()}
        cloud_consent = self.runtime.cfg["sharing.cloud_models"]  # as the mesh's serving side checks it
        return ({n: p for n, p in local.items() if n in shared},
                {n: cm for n, cm in self.cloud_models.items()
                 if may_use_cloud_model(Principal.MEMBER, shared_with_force=cloud_consent and n in shared)})

    def choose_model(self, specialist: Specialist | None, explicit: str | None = None, *, owner: bool = True) -> str:
        local, cloud = self.usable(owner)
        remote = self.remote_models()
        if explicit:
            if explicit in local or explicit in cloud or explicit in remote:
                return explicit
            if explicit in self.cloud_models:
                raise ModelRefused(f"{explicit!r} is a cloud model of this node: only its owner may use it")
            if explicit in self.local_models():
                raise ModelRefused(f"{explicit!r} is not shared by this node: only its owner may use it")
            available = sorted(local) + sorted(cloud) + [f"{n} (on a peer)" for n in remote]
            raise NoModel(f"no model {explicit!r}; available: {', '.join(available) or 'none'}"
                          + self._not_serving_note())
        candidates = list(local) + [n for n, cm in cloud.items() if cm.key_present] + remote
        for pattern in (specialist.preferred_models if specialist else ()):
            for name in candidates:
                if fnmatch.fnmatch(name, pattern):
                    return name
        for name in (self.default_model, EMBEDDED_DEFAULT):
            if name and (name in local or name in remote):
                return name
        if local:
            return sorted(local)[0]
        if remote:
            return remote[0]
        raise NoModel(f"no usable model: put a GGUF file in {self.runtime.models.models_dir} "
                      "(install.sh places the embedded default there) or link to a peer that shares one"
                      + self._not_serving_note())

    def _not_serving_note(self) -> str:
        """Why linked peers offer nothing (paused by their guard, sharing off), so a refusal names its cause."""
        notes = [n for r in self._remotes() if hasattr(r, "not_serving") for n in r.not_serving()]
        return f"; not serving now: {'; '.join(notes[:8])}" if notes else ""

    def is_remote(self, model: str) -> bool:
        return model not in self.cloud_models and model not in self.local_models()

    def _remotes_for(self, model: str) -> list:
        """The meshes to try for a model this node lacks, private first; the first alone if none has it
        (its error says so)."""
        remotes = self._remotes()
        if not remotes:
            raise NoModel(f"no model {model!r} here, and this node has no mesh to ask peers")
        return [r for r in remotes if r.candidates(model)] or remotes[:1]

    async def complete(self, model: str, messages: list[dict], *, max_tokens: int, temperature: float,
                       top_p: float, meta: dict | None = None) -> tuple[str, dict, float]:
        """Run one chat completion where `model` lives; `meta`, when given, gets the serving node."""
        meta = {} if meta is None else meta
        meta.update(node=self.runtime.identity.node_id, model=model, remote=False)
        if model in self.cloud_models:
            return await self.cloud.chat(self.cloud_models[model], messages, max_tokens=max_tokens,
                                         temperature=temperature, top_p=top_p)
        path = self.local_models().get(model)
        if path is None:
            remotes = self._remotes_for(model)
            for i, remote in enumerate(remotes):
                try:
                    result = await remote.chat(model, messages, max_tokens=max_tokens, temperature=temperature,
                                               top_p=top_p)
                except RemoteFailed:
                    if i + 1 < len(remotes):
                        continue  # the private mesh could not: trusted public peers may
                    raise
                meta.update(node=result.node, model=result.model, remote=True, attempts=result.attempts,
                            public=remote is self._public_remote())
                return result.text, result.usage, result.elapsed_ms
        facts = await self._facts(path)
        if self._split_wanted(model, path):
            pieces = [p async for p in self._split_stream(model, path, facts, messages, meta, max_tokens=max_tokens,
                                                          temperature=temperature, top_p=top_p,
                                                          force_all=True)]
            return "".join(pieces).strip(), {"completion_tokens": meta.get("completion_tokens")}, 0.0
        try:
            result = await self.engine.chat(model, path, facts, messages, max_tokens=max_tokens,
                                            temperature=temperature, top_p=top_p)
        except ModelTooLarge:
            if self._auto_split() is not None:  # no lenders (or no tools): the refusal stands
                raise
            pieces = [p async for p in self._split_stream(model, path, facts, messages, meta, max_tokens=max_tokens,
                                                          temperature=temperature, top_p=top_p,
                                                          force_all=False)]
            return "".join(pieces).strip(), {"completion_tokens": meta.get("completion_tokens")}, 0.0
        usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens}
        meta["finish_reason"] = result.finish_reason
        return result.text, usage, result.elapsed_ms

    async def stream(self, model: str, messages: list[dict], *, max_tokens: int, temperature: float,
                     top_p: float, meta: dict | None = None, split: bool = False) -> AsyncIterator[str]:
        """Text pieces as they come; `meta`, when given, gets the serving node (set by the first piece)."""
        meta = {} if meta is None else meta
        meta.update(node=self.runtime.identity.node_id, model=model, remote=False)
        if model in self.cloud_models:
            async for piece in self.cloud.stream(self.cloud_models[model], messages, max_tokens=max_tokens,
                                                 temperature=temperature, top_p=top_p):
                yield piece
            return
        path = self.local_models().get(model)
        if path is None:
            remotes = self._remotes_for(model)
            for i, remote in enumerate(remotes):
                meta["public"] = remote is self._public_remote()
                started = False
                try:
                    async for piece in remote.stream(model, messages, max_tokens=max_tokens,
                                                     temperature=temperature, top_p=top_p, meta=meta):
                        started = True
                        yield piece
                except RemoteFailed:
                    if started or i + 1 == len(remotes):  # pieces shown cannot be taken back
                        raise
                    continue
                return
        facts = await self._facts(path)
        if split or self._split_wanted(model, path):
            async for piece in self._split_stream(model, path, facts, messages, meta, max_tokens=max_tokens,
                                                  temperature=temperature, top_p=top_p, force_all=True):
                yield piece
            return
        started = False
        try:
            async for piece in self.engine.stream_chat(model, path, facts, messages, max_tokens=max_tokens,
                                                       temperature=temperature, top_p=top_p, meta=meta):
                started = True
                yield piece
        except ModelTooLarge:
            # Too big for this node's free memory: split it over the lenders of the mesh, if there are any.
            if started or self._auto_split() is not None:
                raise
            async for piece in self._split_stream(model, path, facts, messages, meta, max_tokens=max_tokens,
                                                  temperature=temperature, top_p=top_p, force_all=False):
                yield piece

    # -- split inference (node/split) --------------------------------------------------------------------
    def _split_wanted(self, model: str, path: Path | None) -> bool:
        return split_requested.get() and path is not None and model not in self.cloud_models

    def _auto_split(self) -> str | None:
        """Why a model too big for this node cannot be split instead (None: it can)."""
        split = getattr(self.runtime, "split", None)
        return "split inference is not set up" if split is None else split.can_borrow()

    async def _split_stream(self, model: str, path: Path, facts: dict, messages: list[dict], meta: dict, *,
                            max_tokens: int, temperature: float, top_p: float, force_all: bool):
        split = getattr(self.runtime, "split", None)
        if split is None:
            raise InferenceError("split inference is not available on this node")
        async for piece in split.stream(model, path, facts, messages, force_all=force_all, max_tokens=max_tokens,
                                        temperature=temperature, top_p=top_p, meta=meta):
            yield piece

    # -- context: the model's limit, and the earlier turns of a session ----------------------------------
    async def _facts(self, path: Path) -> dict:
        # Cached facts on the event loop (a stat); a GGUF not parsed yet is parsed in a worker thread.
        cached = self.facts.peek(path)
        return cached if cached is not None else await asyncio.to_thread(self.facts.get, path)

    def _local_path(self, model: str) -> Path | None:
        return None if model in self.cloud_models else self.local_models().get(model)

    def cold_model(self, model: str) -> dict | None:
        """{"model", "size_bytes"} when `model` is local and not loaded yet (its first answer loads it)."""
        path = self._local_path(model)
        if path is None or self.engine.is_loaded(model):
            return None
        return {"model": model, "size_bytes": path.stat().st_size}

    def loading_secs(self, model: str) -> float | None:
        return self.engine.loading_secs(model)

    async def check_context(self, model: str, messages: list[dict]) -> dict | None:
        """Raise ContextLengthExceeded (answer 400 `context_length_exceeded`) when `messages` do not fit the
        local model's context, before anything is generated or streamed. Returns {"prompt_tokens", "n_ctx"}
        for a local model; None for a peer's or a cloud model (their server checks)."""
        path = self._local_path(model)
        if path is None:
            return None
        facts = await self._facts(path)
        try:
            return await self.engine.check_context(model, path, facts, messages)
        except ContextLengthExceeded:
            raise
        except InferenceError as exc:
            # No readable tokenizer (a broken or tokenizer-less GGUF): nothing to refuse here; loading the
            # model reports what is wrong with it, as it would without this check.
            log.info("context check skipped for %s: %s", model, exc)
            return None

    async def _token_counter(self, model: str) -> tuple[Callable[[list[dict]], Awaitable[int]], int]:
        path = self._local_path(model)
        if path is None:
            async def estimate(messages: list[dict]) -> int:
                return history.estimate_tokens(messages)

            return estimate, CLOUD_CONTEXT if model in self.cloud_models else REMOTE_CONTEXT
        facts = await self._facts(path)

        async def count(messages: list[dict]) -> int:
            return await self.engine.count_tokens(model, path, facts, messages)

        return count, self.engine.planned_context(model, path, facts)

    async def session_turns(self, session_id: str | None) -> list[tuple[str, str]]:
        if not session_id:
            return []
        return await asyncio.to_thread(self.runtime.conversations.recent_turns, session_id, HISTORY_TURNS)

    async def fit_history(self, model: str, messages: list[dict], turns: list[tuple[str, str]],
                          max_tokens: int) -> tuple[list[dict], dict]:
        """`messages` with as many of the session's newest turns as the model's context holds (see
        core/history.py), and {"turns": sent, "dropped": left out}."""
        if not turns:
            return messages, {"turns": 0, "dropped": 0}
        count, n_ctx = await self._token_counter(model)
        budget = n_ctx - history.answer_reserve(n_ctx, max_tokens)
        sizes = [await count(history.turn_messages(t)) for t in turns]
        kept = history.keep_newest(sizes, await count(messages), budget)
        out = history.with_history(messages, turns[len(turns) - kept:])
        while kept and await count(out) > budget:  # turns counted alone can miss how the template joins them
            kept -= 1
            out = history.with_history(messages, turns[len(turns) - kept:])
        return out, {"turns": kept, "dropped": len(turns) - kept}

    # -- plans for streaming and the OpenAI-compatible API ---------------------------------------------
    async def plan_stream(self, prompt: str, requested: list[str], *, model: str | None, max_tokens: int | None,
                          temperature: float | None = None, session_id: str | None = None,
                          owner: bool = True) -> dict:
        """plan_single with the session's earlier turns fitted in and the context checked (raises
        ContextLengthExceeded), so a refusal comes before the stream starts."""
        plan = self.plan_single(prompt, requested, model=model, max_tokens=max_tokens, owner=owner)
        if temperature is not None:
            plan["settings"]["temperature"] = temperature
        turns = await self.session_turns(session_id)
        plan["messages"], plan["history"] = await self.fit_history(plan["model"], plan["messages"], turns,
                                                                   plan["settings"]["max_tokens"])
        plan["context"] = await self.check_context(plan["model"], plan["messages"])
        return plan

    def plan_single(self, prompt: str, requested: list[str], *, model: str | None, max_tokens: int | None,
                    owner: bool = True) -> dict:
        routes = route(prompt, self.specialists)
        best = next(r for r in routes if r.name == requested[0]) if requested else routes[0]
        spec = self.specialists[best.name]
        routing = {"chosen": best.name, "score": best.score, "reasons": list(best.reasons)}
        if requested:
            routing["requested"] = True
        messages = [{"role": "system", "content": spec.system_prompt}, {"role": "user", "content": prompt}]
        chosen = self.choose_model(spec, model, owner=owner)
        return {"specialist": spec.name, "model": chosen, "remote": self.is_remote(chosen), "messages": messages,
                "settings": generation_settings(spec, max_tokens), "routing": routing}

    def plan_messages(self, model_field: str, messages: list[dict], *, max_tokens: int | None,
                      temperature: float | None, top_p: float | None, owner: bool = True) -> dict:
        """OpenAI requests: `pinkybrain` routes, `pinkybrain/<specialist>` names one, else a model name."""
        spec: Specialist | None = None
        model = None
        if model_field == "pinkybrain":
            last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
            spec = self.specialists[route(last_user, self.specialists)[0].name]
        elif model_field.startswith("pinkybrain/"):
            name = model_field.split("/", 1)[1]
            if name not in self.specialists:
                raise NoModel(f"no specialist {name!r}; valid: {', '.join(sorted(self.specialists))}")
            spec = self.specialists[name]
        else:
            model = self.choose_model(None, model_field, owner=owner)
        if spec is not None:
            model = self.choose_model(spec, owner=owner)
            if not any(m["role"] == "system" for m in messages):
                messages = [{"role": "system", "content": spec.system_prompt}, *messages]
        settings = generation_settings(spec, max_tokens) if spec else {"temperature": 0.7, "top_p": 0.95,
                                                                         "max_tokens": max_tokens or 512}
        if temperature is not None:
            settings["temperature"] = temperature
        if top_p is not None:
            settings["top_p"] = top_p
        return {"model": model, "specialist": spec.name if spec else "direct", "messages": messages,
                "settings": settings}

    async def record(self, session_id: str | None, prompt: str, answer: str, mode: str, specialists: list[str],
                     model: str | None) -> dict:
        return await asyncio.to_thread(self.runtime.conversations.record, session_id, prompt, answer, mode=mode,
                                       specialists=specialists, model=model, node_id=self.runtime.identity.node_id)

    # -- queries -----------------------------------------------------------------------------------
    def _answerer(self, model_override: str | None, state: dict | None = None, *,
                  turns: list[tuple[str, str]] | None = None,
                  on_answer: Callable[[Answer], Awaitable[None]] | None = None, owner: bool = True):
        """`state`, when given, learns whether an answer crossed the public mesh ("public"), which calls
        were refused for want of credit ("unpaid") and how much of the session each model was sent
        ("history"). `turns`: the session's earlier exchanges; `on_answer` hears of each answer as it ends;
        `owner`: whether the caller may use what this node does not share."""
        state = {"public": False, "unpaid": []} if state is None else state

        async def answer(specialist: Specialist, messages: list[dict]) -> Answer:
            settings = generation_settings(specialist)  # run_query already applied any overrides
            start = time.perf_counter()
            meta: dict = {}
            model = model_override or ""
            try:
                model = self.choose_model(specialist, model_override, owner=owner)
                if turns:
                    messages, sent = await self.fit_history(model, messages, turns, settings["max_tokens"])
                    state.setdefault("history", sent)
                text, usage, _ = await self.complete(model, messages, meta=meta, **settings)
            except (InferenceError, CloudError, NoModel, RemoteFailed, InsufficientCredit) as exc:
                # The answer of a failed call is an error the modes report and work around.
                if isinstance(exc, InsufficientCredit):
                    state["unpaid"].append(exc)
                result = Answer(specialist=specialist.name, text="", model=model,
                                node=self.runtime.identity.node_id,
                                elapsed_ms=round((time.perf_counter() - start) * 1000, 1), tokens=None,
                                error=str(exc))
            else:
                if meta.get("public"):
                    state["public"] = True
                result = Answer(specialist=specialist.name, text=text, model=meta.get("model", model),
                                node=meta.get("node", self.runtime.identity.node_id),
                                elapsed_ms=round((time.perf_counter() - start) * 1000, 1),
                                tokens=usage.get("completion_tokens"), finish_reason=meta.get("finish_reason"),
                                prompt_tokens=usage.get("prompt_tokens"))
            if on_answer is not None:
                await on_answer(result)
            return result

        return answer

    async def precheck(self, prompt: str, mode: str, requested: list[str], *, model: str | None,
                       max_tokens: int | None, owner: bool = True) -> None:
        """Refuse (ContextLengthExceeded) a query whose prompt cannot fit the first model asked,
        before any answer starts; later steps of a chain, which grow, report their own failures."""
        del mode  # every mode asks the prompt first of the specialist plan_single picks or one like it
        try:
            plan = self.plan_single(prompt, requested[:1], model=model, max_tokens=max_tokens, owner=owner)
        except NoModel:
            return  # each answer reports it (and the query ends 502 no_answer, as it always has)
        await self.check_context(plan["model"], plan["messages"])

    async def query(self, prompt: str, mode: str, requested: list[str], *, max_tokens: int | None = None,
                    model: str | None = None, session_id: str | None = None, temperature: float | None = None,
                    on_answer: Callable[[Answer], Awaitable[None]] | None = None, owner: bool = True) -> dict:
        state: dict = {"public": False, "unpaid": []}
        if model:
            try:
                self.choose_model(None, model, owner=owner)
            except ModelRefused:
                raise  # refused for the whole query (403), before any step runs
            except NoModel:
                pass  # each step reports it, as before
        turns = await self.session_turns(session_id)
        try:
            result = await run_query(prompt, mode, specialists=self.specialists, requested=requested,
                                     answer=self._answerer(model, state, turns=turns, on_answer=on_answer,
                                                           owner=owner),
                                     max_tokens=max_tokens, temperature=temperature)
        except NoAnswer as exc:
            if state["unpaid"] and len(state["unpaid"]) >= len(exc.errors):
                raise state["unpaid"][0] from None  # refused only for want of credit: say so plainly (402)
            raise
        result = _jsonable(result)
        result["history"] = state.get("history", {"turns": 0, "dropped": len(turns)})
        result["model"] = next((a["model"] for a in result.get("answers", [])
                                if a["specialist"] == result.get("specialist") and not a.get("error")), None)
        if state["public"]:
            # Zero query logging: nothing of an exchange that crossed the public mesh is stored.
            result.update(session_id=None, recorded=False, node=self.runtime.identity.node_id)
            return result
        used = sorted({a["model"] for a in result.get("answers", []) if a.get("model")})
        record = await self.record(session_id, prompt, result.get("answer", ""), mode,
                                   [a["specialist"] for a in result.get("answers", [])], ",".join(used) or None)
        result["session_id"] = record["session_id"]
        result["node"] = self.runtime.identity.node_id
        return result


def _jsonable(value):
    if hasattr(value, "__dataclass_fields__"):
        return {k: _jsonable(v) for k, v in asdict(value).items()}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
