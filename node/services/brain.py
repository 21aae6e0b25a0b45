"""The brain: answers queries through the specialist router with local, cloud (and later remote) models,
and records every exchange in the conversation store.

Model choice for a specialist: its preferred model patterns in order, then `inference.default_model`,
then the embedded default model, then any usable local model. Cloud models are candidates only when a
specialist or the caller names them (they cost money) and only for this node's own user.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path

from pinkybrain.node.core.router import Answer, route, run_query
from pinkybrain.node.core.specialists import Specialist, generation_settings, load_specialists
from pinkybrain.node.services.cloud import CloudClient, CloudError, CloudModel, parse_cloud_models
from pinkybrain.node.services.gguf_facts import GgufFactsCache
from pinkybrain.node.services.inference import InferenceError, LocalEngine
from pinkybrain.node.services.models import ModelNotFound, ModelPathError, resolve_shared

log = logging.getLogger("pinkybrain.brain")
EMBEDDED_DEFAULT = "gemma3-270m-q4-k-m"


class NoModel(RuntimeError):
    """No model can answer: nothing usable in shared_models/ and no cloud model named."""


class Brain:
    def __init__(self, runtime):
        cfg = runtime.cfg
        self.runtime = runtime
        self.specialists: dict[str, Specialist] = load_specialists(cfg["specialists.profiles"])
        self.cloud_models: dict[str, CloudModel] = parse_cloud_models(cfg["cloud.models"])
        self.facts = GgufFactsCache(runtime.data_dir / "gguf-facts.json")
        self.engine = LocalEngine(n_ctx=cfg["inference.n_ctx"], n_threads=cfg["inference.n_threads"],
                                  max_loaded=cfg["inference.max_loaded_models"])
        self.cloud = CloudClient()
        self.default_model = cfg["inference.default_model"]

    async def close(self) -> None:
        await self.engine.close()
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

    def choose_model(self, specialist: Specialist | None, explicit: str | None = None) -> str:
        local = self.local_models()
        if explicit:
            if explicit in local or explicit in self.cloud_models:
                return explicit
            raise NoModel(f"no model {explicit!r}; available: {', '.join(sorted(local) + sorted(self.cloud_models))}")
        candidates = list(local) + [n for n, cm in self.cloud_models.items() if cm.key_present]
        for pattern in (specialist.preferred_models if specialist else ()):
            for name in candidates:
                if fnmatch.fnmatch(name, pattern):
                    return name
        for name in (self.default_model, EMBEDDED_DEFAULT):
            if name and name in local:
                return name
        if local:
            return sorted(local)[0]
        raise NoModel(f"no usable model: put a GGUF file in {self.runtime.models.models_dir} "
                      "(install.sh places the embedded default there)")

    async def complete(self, model: str, messages: list[dict], *, max_tokens: int, temperature: float,
                       top_p: float) -> tuple[str, dict, float]:
        if model in self.cloud_models:
            return await self.cloud.chat(self.cloud_models[model], messages, max_tokens=max_tokens,
                                         temperature=temperature, top_p=top_p)
        path = self.local_models()[model]
        facts = await asyncio.to_thread(self.facts.get, path)
        result = await self.engine.chat(model, path, facts, messages, max_tokens=max_tokens,
                                        temperature=temperature, top_p=top_p)
        usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens}
        return result.text, usage, result.elapsed_ms

    async def stream(self, model: str, messages: list[dict], *, max_tokens: int, temperature: float,
                     top_p: float) -> AsyncIterator[str]:
        if model in self.cloud_models:
            async for piece in self.cloud.stream(self.cloud_models[model], messages, max_tokens=max_tokens,
                                                 temperature=temperature, top_p=top_p):
                yield piece
            return
        path = self.local_models()[model]
        facts = await asyncio.to_thread(self.facts.get, path)
        async for piece in self.engine.stream_chat(model, path, facts, messages, max_tokens=max_tokens,
                                                   temperature=temperature, top_p=top_p):
            yield piece

    # -- plans for streaming and the OpenAI-compatible API ---------------------------------------------
    def plan_single(self, prompt: str, requested: list[str], *, model: str | None, max_tokens: int | None) -> dict:
        if requested:
            spec, routing = self.specialists[requested[0]], {"chosen": requested[0], "requested": True}
        else:
            best = route(prompt, self.specialists)[0]
            spec = self.specialists[best.name]
            routing = {"chosen": best.name, "score": best.score, "reasons": list(best.reasons)}
        messages = [{"role": "system", "content": spec.system_prompt}, {"role": "user", "content": prompt}]
        return {"specialist": spec.name, "model": self.choose_model(spec, model), "messages": messages,
                "settings": generation_settings(spec, max_tokens), "routing": routing}

    def plan_messages(self, model_field: str, messages: list[dict], *, max_tokens: int | None,
                      temperature: float | None, top_p: float | None) -> dict:
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
            model = self.choose_model(None, model_field)
        if spec is not None:
            model = self.choose_model(spec)
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
    def _answerer(self, model_override: str | None):
        async def answer(specialist: Specialist, messages: list[dict]) -> Answer:
            settings = generation_settings(specialist)  # run_query already applied any max_tokens override
            start = time.perf_counter()
            try:
                model = self.choose_model(specialist, model_override)
                text, usage, _ = await self.complete(model, messages, **settings)
            except (InferenceError, CloudError, NoModel) as exc:
                return Answer(specialist=specialist.name, text="", model=model_override or "",
                              node=self.runtime.identity.node_id, elapsed_ms=(time.perf_counter() - start) * 1000,
                              tokens=None, error=str(exc))
            return Answer(specialist=specialist.name, text=text, model=model, node=self.runtime.identity.node_id,
                          elapsed_ms=round((time.perf_counter() - start) * 1000, 1),
                          tokens=usage.get("completion_tokens"))

        return answer

    async def query(self, prompt: str, mode: str, requested: list[str], *, max_tokens: int | None = None,
                    model: str | None = None, session_id: str | None = None) -> dict:
        result = await run_query(prompt, mode, specialists=self.specialists, requested=requested,
                                 answer=self._answerer(model), max_tokens=max_tokens)
        result = _jsonable(result)
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
