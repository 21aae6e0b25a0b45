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
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path

from pinkybrain.node.core.credits import InsufficientCredit
from pinkybrain.node.core.principals import Principal, may_use_cloud_model
from pinkybrain.node.core.router import Answer, NoAnswer, route, run_query
from pinkybrain.node.core.specialists import Specialist, generation_settings, load_specialists
from pinkybrain.node.services.cloud import CloudClient, CloudError, CloudModel, parse_cloud_models
from pinkybrain.node.services.gguf_facts import GgufFactsCache
from pinkybrain.node.services.inference import EmbeddingEngine, InferenceError, LocalEngine
from pinkybrain.node.services.models import ModelNotFound, ModelPathError, resolve_shared
from pinkybrain.node.services.remote import RemoteFailed

log = logging.getLogger("pinkybrain.brain")
EMBEDDED_DEFAULT = "gemma3-270m-q4-k-m"


class NoModel(RuntimeError):
    """No model can answer: nothing usable in shared_models/ and no cloud model named."""


class ModelRefused(NoModel):
    """The model exists but this caller may not use it: a cloud model or an unshared one, asked for by
    someone other than the node's owner (core.principals.may_use_cloud_model)."""


class Brain:
    def __init__(self, runtime):
        cfg = runtime.cfg
        self.runtime = runtime
        self.specialists: dict[str, Specialist] = load_specialists(cfg["specialists.profiles"])
        self.cloud_models: dict[str, CloudModel] = parse_cloud_models(cfg["cloud.models"])
        self.facts = GgufFactsCache(runtime.data_dir / "gguf-facts.json")
        self.engine = LocalEngine(n_ctx=cfg["inference.n_ctx"], n_threads=cfg["inference.n_threads"],
                                  max_loaded=cfg["inference.max_loaded_models"])
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
        facts = await asyncio.to_thread(self.facts.get, path)
        result = await self.engine.chat(model, path, facts, messages, max_tokens=max_tokens,
                                        temperature=temperature, top_p=top_p)
        usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens}
        return result.text, usage, result.elapsed_ms

    async def stream(self, model: str, messages: list[dict], *, max_tokens: int, temperature: float,
                     top_p: float, meta: dict | None = None) -> AsyncIterator[str]:
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
        facts = await asyncio.to_thread(self.facts.get, path)
        async for piece in self.engine.stream_chat(model, path, facts, messages, max_tokens=max_tokens,
                                                   temperature=temperature, top_p=top_p):
            yield piece

    # -- plans for streaming and the OpenAI-compatible API ---------------------------------------------
    def plan_single(self, prompt: str, requested: list[str], *, model: str | None, max_tokens: int | None,
                    owner: bool = True) -> dict:
        if requested:
            spec, routing = self.specialists[requested[0]], {"chosen": requested[0], "requested": True}
        else:
            best = route(prompt, self.specialists)[0]
            spec = self.specialists[best.name]
            routing = {"chosen": best.name, "score": best.score, "reasons": list(best.reasons)}
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
    def _answerer(self, model_override: str | None, state: dict | None = None, owner: bool = True):
        """`state`, when given, learns whether an answer crossed the public mesh ("public") and which
        calls were refused for want of credit ("unpaid")."""
        state = {"public": False, "unpaid": []} if state is None else state

        async def answer(specialist: Specialist, messages: list[dict]) -> Answer:
            settings = generation_settings(specialist)  # run_query already applied any max_tokens override
            start = time.perf_counter()
            meta: dict = {}
            model = model_override or ""
            try:
                model = self.choose_model(specialist, model_override, owner=owner)
                text, usage, _ = await self.complete(model, messages, meta=meta, **settings)
            except (InferenceError, CloudError, NoModel, RemoteFailed, InsufficientCredit) as exc:
                # The answer of a failed call is an error the modes report and work around.
                if isinstance(exc, InsufficientCredit):
                    state["unpaid"].append(exc)
                return Answer(specialist=specialist.name, text="", model=model,
                              node=self.runtime.identity.node_id,
                              elapsed_ms=round((time.perf_counter() - start) * 1000, 1), tokens=None, error=str(exc))
            if meta.get("public"):
                state["public"] = True
            return Answer(specialist=specialist.name, text=text, model=meta.get("model", model),
                          node=meta.get("node", self.runtime.identity.node_id),
                          elapsed_ms=round((time.perf_counter() - start) * 1000, 1),
                          tokens=usage.get("completion_tokens"))

        return answer

    async def query(self, prompt: str, mode: str, requested: list[str], *, max_tokens: int | None = None,
                    model: str | None = None, session_id: str | None = None, owner: bool = True) -> dict:
        state: dict = {"public": False, "unpaid": []}
        if model:
            try:
                self.choose_model(None, model, owner=owner)
            except ModelRefused:
                raise  # refused for the whole query (403), before any step runs
            except NoModel:
                pass  # each step reports it, as before
        try:
            result = await run_query(prompt, mode, specialists=self.specialists, requested=requested,
                                     answer=self._answerer(model, state, owner), max_tokens=max_tokens)
        except NoAnswer as exc:
            if state["unpaid"] and len(state["unpaid"]) >= len(exc.errors):
                raise state["unpaid"][0] from None  # refused only for want of credit: say so plainly (402)
            raise
        result = _jsonable(result)
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
