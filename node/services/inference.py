"""Local inference with llama-cpp-python on GGUF files.

Models load lazily (in a worker thread) and stay warm, up to `max_loaded` at once (least recently used
is evicted). One model answers one request at a time: further requests wait their turn on a per-model
FIFO lock instead of crashing or loading the model twice. A model that would not fit in the RAM this
machine has free is refused with a clear error before llama.cpp touches it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

log = logging.getLogger("pinkybrain.inference")

# A GGUF without a chat template is treated as a base (completion) model: instruction-tuned releases
# ship their template, and forcing a guessed one on a base model makes it echo the prompt. Such models
# get a plain question/answer transcript, stopped before they invent the next question.
TRANSCRIPT_STOPS = ["\nQuestion:", "Question:", "\n\n\n"]


def transcript_prompt(messages: list[dict]) -> str:
    parts = [m["content"].strip() for m in messages if m["role"] == "system"]
    text = "\n\n".join(parts) + ("\n\n" if parts else "")
    for m in messages:
        if m["role"] == "user":
            text += f"Question: {m['content'].strip()}\nAnswer:"
        elif m["role"] == "assistant":
            text += f" {m['content'].strip()}\n\n"
    return text


class InferenceError(RuntimeError):
    pass


class ModelTooLarge(InferenceError):
    pass


class EngineUnavailable(InferenceError):
    pass


@dataclass
class ChatResult:
    text: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    elapsed_ms: float
    finish_reason: str | None


@dataclass
class _Loaded:
    llm: object
    path: Path
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_used: float = field(default_factory=time.monotonic)
    bytes_estimate: int = 0
    chat: bool = True  # the GGUF has a chat template; else it is prompted as a completion model


def estimate_bytes(file_size: int, facts: dict, n_ctx: int) -> int:
    """Weights (the file, mmapped) + KV cache (f16) + ~10% and 64 MiB of compute buffers."""
    layers = facts.get("block_count") or 32
    kv_heads = facts.get("head_count_kv") or 8
    k_len = facts.get("key_length") or 128
    v_len = facts.get("value_length") or k_len
    kv = 2 * layers * kv_heads * (k_len + v_len) * n_ctx // 2  # 2 bytes per f16 element, k and v summed
    return int(file_size * 1.1 + kv + 64 * 2**20)


class LocalEngine:
    def __init__(self, *, n_ctx: int = 4096, n_threads: int = 0, max_loaded: int = 2):
        self.n_ctx = n_ctx
        self.n_threads = n_threads or psutil.cpu_count(logical=True) or 1
        self.max_loaded = max_loaded
        self._models: OrderedDict[str, _Loaded] = OrderedDict()
        self._loading: dict[str, asyncio.Future] = {}
        self._guard = asyncio.Lock()
        self.backend_error: str | None = None

    @staticmethod
    def available() -> tuple[bool, str | None]:
        try:
            import llama_cpp  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - any import failure means no local inference
            return False, f"llama-cpp-python is not usable: {exc}"
        return True, None

    def loaded(self) -> list[dict]:
        return [{"model": name, "path": str(m.path), "bytes_estimate": m.bytes_estimate,
                 "busy": m.lock.locked()} for name, m in self._models.items()]

    async def _get(self, name: str, path: Path, facts: dict) -> _Loaded:
        async with self._guard:
            if name in self._models:
                self._models.move_to_end(name)
                return self._models[name]
            pending = self._loading.get(name)
            if pending is None:
                pending = asyncio.get_running_loop().create_future()
                self._loading[name] = pending
                owner = True
            else:
                owner = False
        if not owner:
            return await asyncio.shield(pending)
        try:
            loaded = await self._load(name, path, facts)
            pending.set_result(loaded)
            return loaded
        except BaseException as exc:
            pending.set_exception(exc)
            pending.exception()  # mark retrieved: waiters (if any) re-raise it themselves
            raise
        finally:
            async with self._guard:
                self._loading.pop(name, None)

    async def _load(self, name: str, path: Path, facts: dict) -> _Loaded:
        ok, why = self.available()
        if not ok:
            raise EngineUnavailable(why)
        n_ctx = min(self.n_ctx, int(facts.get("context_length") or self.n_ctx))
        need = estimate_bytes(path.stat().st_size, facts, n_ctx)
        async with self._guard:
            while len(self._models) >= self.max_loaded:
                evicted = await self._evict_locked()
                if not evicted:
                    break
        free = psutil.virtual_memory().available
        if need > free:
            raise ModelTooLarge(
                f"model {name!r} needs about {need / 2**30:.1f} GiB of RAM with a {n_ctx}-token context, "
                f"but only {free / 2**30:.1f} GiB is free; free memory or lower inference.n_ctx"
            )
        log.info("loading model %s (%s, ~%.0f MiB)", name, path.name, need / 2**20)

        def load():
            from llama_cpp import Llama

            return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=self.n_threads, verbose=False)

        try:
            llm = await asyncio.to_thread(load)
        except (ValueError, RuntimeError, OSError) as exc:
            raise InferenceError(f"could not load model {name!r}: {exc}") from None
        loaded = _Loaded(llm=llm, path=path, bytes_estimate=need, chat=bool(facts.get("has_chat_template")))
        async with self._guard:
            self._models[name] = loaded
        return loaded

    async def _evict_locked(self) -> bool:
        for name, m in self._models.items():
            if not m.lock.locked():
                del self._models[name]
                close = getattr(m.llm, "close", None)
                if close:
                    await asyncio.to_thread(close)
                log.info("unloaded model %s", name)
                return True
        return False

    async def chat(self, name: str, path: Path, facts: dict, messages: list[dict], *, max_tokens: int,
                   temperature: float = 0.7, top_p: float = 0.95, stop: list[str] | None = None) -> ChatResult:
        model = await self._get(name, path, facts)
        async with model.lock:
            model.last_used = time.monotonic()
            start = time.perf_counter()
            out = await asyncio.to_thread(self._run, model, messages, max_tokens, temperature, top_p, stop, False)
            elapsed = (time.perf_counter() - start) * 1000
        choice = out["choices"][0]
        usage = out.get("usage") or {}
        text = choice["message"].get("content") if "message" in choice else choice.get("text")
        return ChatResult(text=(text or "").strip(), model=name,
                          prompt_tokens=usage.get("prompt_tokens", 0),
                          completion_tokens=usage.get("completion_tokens", 0),
                          elapsed_ms=round(elapsed, 1), finish_reason=choice.get("finish_reason"))

    async def stream_chat(self, name: str, path: Path, facts: dict, messages: list[dict], *, max_tokens: int,
                          temperature: float = 0.7, top_p: float = 0.95,
                          stop: list[str] | None = None) -> AsyncIterator[str]:
        """Yield text pieces as the model produces them (the model stays locked until the end)."""
        model = await self._get(name, path, facts)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        done = object()

        def produce():
            try:
                for chunk in self._run(model, messages, max_tokens, temperature, top_p, stop, True):
                    if cancelled.is_set():
                        break
                    choice = chunk["choices"][0]
                    piece = choice["delta"].get("content") if "delta" in choice else choice.get("text")
                    if piece:
                        loop.call_soon_threadsafe(queue.put_nowait, piece)
            except Exception as exc:  # noqa: BLE001 - handed to the consumer
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, done)

        async with model.lock:
            model.last_used = time.monotonic()
            worker = loop.run_in_executor(None, produce)
            try:
                while True:
                    item = await queue.get()
                    if item is done:
                        break
                    if isinstance(item, Exception):
                        raise InferenceError(f"model {name!r} failed while streaming: {item}")
                    yield item
            finally:
                cancelled.set()
                await worker

    # -- direct access for callers that drive llama.cpp themselves (the OpenAI-compatible layer) ----------
    async def run_locked(self, name: str, path: Path, facts: dict, work):
        """`work(loaded)` in a worker thread, with the model loaded and locked; returns its result."""
        model = await self._get(name, path, facts)
        async with model.lock:
            model.last_used = time.monotonic()
            return await asyncio.to_thread(work, model)

    async def iterate_locked(self, name: str, path: Path, facts: dict, work) -> AsyncIterator:
        """The items of the iterator `work(loaded)` returns, produced in a worker thread with the model
        loaded and locked until the iteration ends (or the consumer stops: generation stops too)."""
        model = await self._get(name, path, facts)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        done = object()

        def produce():
            try:
                for item in work(model):
                    if cancelled.is_set():
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, (item, None))
            except Exception as exc:  # noqa: BLE001 - re-raised in the consumer
                loop.call_soon_threadsafe(queue.put_nowait, (None, exc))
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, (done, None))

        async with model.lock:
            model.last_used = time.monotonic()
            worker = loop.run_in_executor(None, produce)
            try:
                while True:
                    item, exc = await queue.get()
                    if exc is not None:
                        raise exc
                    if item is done:
                        break
                    yield item
            finally:
                cancelled.set()
                await worker

    @staticmethod
    def _run(model: _Loaded, messages, max_tokens, temperature, top_p, stop, stream):
        if model.chat:
            return model.llm.create_chat_completion(messages=messages, max_tokens=max_tokens,
                                                    temperature=temperature, top_p=top_p, stop=stop, stream=stream)
        return model.llm.create_completion(transcript_prompt(messages), max_tokens=max_tokens,
                                           temperature=temperature, top_p=top_p, repeat_penalty=1.15,
                                           stop=(stop or []) + TRANSCRIPT_STOPS, stream=stream)

    async def close(self) -> None:
        async with self._guard:
            while self._models:
                _, m = self._models.popitem()
                close = getattr(m.llm, "close", None)
                if close:
                    await asyncio.to_thread(close)


# -- embeddings ------------------------------------------------------------------------------------------
@dataclass
class EmbeddingResult:
    vectors: list[list[float]]
    prompt_tokens: int
    model: str


class EmbeddingEngine:
    """Models loaded in embedding mode: a `Llama(embedding=True)` of their own (a llama.cpp context either
    generates or embeds), mean-pooled over the tokens and L2-normalised, so any GGUF (the default model
    too) gives one vector per text. One model at a time; it stays warm until another is asked for."""

    def __init__(self, *, n_ctx: int = 4096, n_threads: int = 0):
        self.n_ctx = n_ctx
        self.n_threads = n_threads or psutil.cpu_count(logical=True) or 1
        self._name: str | None = None
        self._llm = None
        self._lock = asyncio.Lock()

    def _load(self, name: str, path: Path, facts: dict):
        import llama_cpp

        n_ctx = min(self.n_ctx, int(facts.get("context_length") or self.n_ctx))
        need = estimate_bytes(path.stat().st_size, facts, n_ctx)
        free = psutil.virtual_memory().available
        if need > free:
            raise ModelTooLarge(f"model {name!r} needs about {need / 2**30:.1f} GiB of RAM to embed with a "
                                f"{n_ctx}-token context, but only {free / 2**30:.1f} GiB is free")
        log.info("loading model %s for embeddings (%s)", name, path.name)
        try:
            # The whole text must fit one micro-batch for pooling: n_batch = n_ubatch = n_ctx.
            return llama_cpp.Llama(model_path=str(path), embedding=True, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                   n_threads=self.n_threads, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                                   verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise InferenceError(f"could not load model {name!r} for embeddings: {exc}") from None

    def _ensure(self, name: str, path: Path, facts: dict):
        if self._name != name:
            if self._llm is not None:
                self._llm.close()
                self._llm, self._name = None, None
            self._llm = self._load(name, path, facts)
            self._name = name
        return self._llm

    def _tokens(self, llm, texts: list[str]) -> list[int]:
        return [len(llm.tokenize(t.encode("utf-8"), add_bos=True, special=False)) for t in texts]

    async def count_and_embed(self, name: str, path: Path, facts: dict, texts: list[str], check=None) -> EmbeddingResult:
        """Embed `texts`; `check(token_counts, n_ctx)`, when given, runs first and may refuse them."""
        ok, why = LocalEngine.available()
        if not ok:
            raise EngineUnavailable(why)

        def work():
            llm = self._ensure(name, path, facts)
            counts = self._tokens(llm, texts)
            if check is not None:
                check(counts, llm.n_ctx())
            vectors = llm.embed(texts, normalize=True)
            return EmbeddingResult(vectors=vectors, prompt_tokens=sum(counts), model=name)

        async with self._lock:
            return await asyncio.to_thread(work)

    async def close(self) -> None:
        async with self._lock:
            if self._llm is not None:
                await asyncio.to_thread(self._llm.close)
                self._llm, self._name = None, None
