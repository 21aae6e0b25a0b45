"""Local inference with llama-cpp-python on GGUF files.

Models load lazily (in a worker thread) and stay warm, up to `max_loaded` at once (least recently used
is evicted). One model answers one request at a time: further requests wait their turn on a per-model
FIFO lock instead of crashing or loading the model twice. A model that would not fit in the RAM this
machine has free is refused with a clear error before llama.cpp touches it.

Context: unless `inference.n_ctx` fixes it, a model gets its trained context, halved until its estimated
memory fits in 80% of the free RAM (never below MIN_AUTO_CTX). A prompt that does not fit in that context
is refused before generation starts (ContextLengthExceeded), counted with the model's own tokenizer (a
vocabulary-only load when the model is not loaded yet).

GPU: `n_gpu_layers` (None: every layer when llama.cpp was built with a GPU backend, else 0), `main_gpu`
and `tensor_split` go to llama.cpp as they are. `keep_alive_secs` unloads a model idle that long (0: never).
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


class ContextLengthExceeded(InferenceError):
    """The prompt does not fit in the model's context; raised before any generation starts."""

    code = "context_length_exceeded"

    def __init__(self, model: str, prompt_tokens: int, limit: int):
        self.model, self.prompt_tokens, self.limit = model, prompt_tokens, limit
        super().__init__(f"this model's maximum context length is {limit} tokens, but the messages take "
                         f"{prompt_tokens} tokens (model {model!r}); shorten the messages or the conversation")


# -- GPU offload ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GpuSettings:
    n_gpu_layers: int | None = None  # None: all layers when llama.cpp has a GPU backend, else 0; -1: all
    main_gpu: int = 0
    tensor_split: tuple[float, ...] | None = None


def gpu_offload_supported() -> bool:
    """Whether this llama.cpp build has a GPU backend (CUDA, Metal, Vulkan, ...) that found a device."""
    from pinkybrain.node.services.capabilities import llama_cpp_info

    info = llama_cpp_info()  # probed once per process
    if not info.get("available") or not info.get("gpu_offload"):
        return False
    devices = info.get("devices") or []
    # A GPU build on a machine without its GPU lists only the CPU device; older builds list nothing.
    return not devices or any(str(d.get("backend") or "").upper() != "CPU" for d in devices)


def gpu_load_kwargs(gpu: GpuSettings, supported: bool) -> dict:
    """The Llama() arguments for GPU offload; a CPU-only build gets 0 layers unless told otherwise."""
    layers = gpu.n_gpu_layers if gpu.n_gpu_layers is not None else (-1 if supported else 0)
    kwargs: dict = {"n_gpu_layers": layers, "main_gpu": gpu.main_gpu}
    if gpu.tensor_split:
        kwargs["tensor_split"] = list(gpu.tensor_split)
    return kwargs


def placement(n_gpu_layers: int, block_count: int | None, supported: bool, weights: int, kv: int) -> dict:
    """Where a loaded model lives: its layers on the GPU, and the bytes in RAM and VRAM (estimates).
    llama.cpp counts the output layer as one more layer, so `block_count + 1` layers offload all."""
    total = (block_count or 0) + 1
    on_gpu = 0 if not supported else (total if n_gpu_layers < 0 else min(n_gpu_layers, total))
    share = on_gpu / total
    vram = int(weights * share + (kv if on_gpu == total else kv * share))
    device = "cpu" if on_gpu == 0 else ("gpu" if on_gpu == total else "gpu+cpu")
    return {"device": device, "gpu_layers": on_gpu, "layers": total, "vram_bytes": vram,
            "ram_bytes": int(weights + kv) - vram}


# -- context sizing -------------------------------------------------------------------------------------
MIN_AUTO_CTX = 2048
FALLBACK_CTX = 4096  # a GGUF that does not state its trained context


def kv_bytes(facts: dict, n_ctx: int) -> int:
    layers = facts.get("block_count") or 32
    kv_heads = facts.get("head_count_kv") or 8
    k_len = facts.get("key_length") or 128
    v_len = facts.get("value_length") or k_len
    return layers * kv_heads * (k_len + v_len) * n_ctx * 2  # f16: 2 bytes per element


def context_size(configured: int, facts: dict, file_size: int, free_bytes: int) -> int:
    """`configured` (> 0) capped by the trained context; 0: the trained context, halved while the model's
    estimated memory exceeds 80% of `free_bytes` (not below MIN_AUTO_CTX)."""
    trained = int(facts.get("context_length") or FALLBACK_CTX)
    if configured > 0:
        return max(min(configured, trained), 256 if trained >= 256 else trained)
    n_ctx = trained
    floor = min(MIN_AUTO_CTX, trained)
    while n_ctx > floor and estimate_bytes(file_size, facts, n_ctx) > free_bytes * 0.8:
        n_ctx = max(n_ctx // 2, floor)
    return n_ctx


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
    n_ctx: int = 0
    n_gpu_layers: int = 0
    facts: dict = field(default_factory=dict)
    loaded_at: float = field(default_factory=time.time)


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def estimate_bytes(file_size: int, facts: dict, n_ctx: int) -> int:
    """Weights (the file, mmapped) + KV cache (f16) + ~10% and 64 MiB of compute buffers."""
    return int(file_size * 1.1 + kv_bytes(facts, n_ctx) + 64 * 2**20)


class LocalEngine:
    def __init__(self, *, n_ctx: int = 0, n_threads: int = 0, max_loaded: int = 2, gpu: GpuSettings | None = None,
                 keep_alive_secs: float = 0, memory_limit: int = 0):
        self.n_ctx = n_ctx  # 0: sized per model (context_size)
        self.memory_limit = memory_limit  # bytes the loaded models may take together; 0: no limit
        self.n_threads = n_threads or psutil.cpu_count(logical=True) or 1
        self.max_loaded = max_loaded
        self.gpu = gpu or GpuSettings()
        self.keep_alive_secs = keep_alive_secs
        self._models: OrderedDict[str, _Loaded] = OrderedDict()
        self._loading: dict[str, asyncio.Future] = {}
        self._loading_since: dict[str, float] = {}
        self._loading_size: dict[str, int] = {}
        self._planned_ctx: dict[str, int] = {}
        self._vocab: dict[str, object] = {}  # vocabulary-only loads, to count tokens of a model not loaded
        self._guard = asyncio.Lock()
        self._reaper: asyncio.Task | None = None
        self.backend_error: str | None = None

    def free_bytes(self) -> int:
        """Memory a model may take now: the free RAM, within the limit less what loaded models hold."""
        free = psutil.virtual_memory().available
        if self.memory_limit:
            used = sum(m.bytes_estimate for m in self._models.values())
            free = min(free, max(0, self.memory_limit - used))
        return free

    @staticmethod
    def available() -> tuple[bool, str | None]:
        try:
            import llama_cpp  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - any import failure means no local inference
            return False, f"llama-cpp-python is not usable: {exc}"
        return True, None

    def loaded(self, gpu_offload: bool | None = None) -> list[dict]:
        """The loaded models (`pinkybrain models ps`): memory, where they live, idle time, when unloaded.
        `gpu_offload`: gpu_offload_supported(), when the caller has it (its first call probes llama.cpp)."""
        now = time.monotonic()
        supported = gpu_offload_supported() if gpu_offload is None else gpu_offload
        out = []
        for name, m in self._models.items():
            weights = m.path.stat().st_size if m.path.exists() else m.bytes_estimate
            where = placement(m.n_gpu_layers, m.facts.get("block_count"), supported, weights,
                              kv_bytes(m.facts, m.n_ctx))
            idle = 0.0 if m.lock.locked() else now - m.last_used
            out.append({"model": name, "path": str(m.path), "bytes_estimate": m.bytes_estimate, "busy": m.lock.locked(),
                        "n_ctx": m.n_ctx, **where, "idle_secs": round(idle, 1),
                        "unloads_in_secs": (round(max(self.keep_alive_secs - idle, 0), 1)
                                            if self.keep_alive_secs > 0 else None),
                        "loaded_at": m.loaded_at})
        return out

    def is_loaded(self, name: str) -> bool:
        return name in self._models

    def loading_now(self) -> list[dict]:
        """The models loading at this moment: name, file size, seconds so far."""
        now = time.monotonic()
        return [{"model": name, "size_bytes": self._loading_size.get(name), "elapsed_secs": round(now - since, 1)}
                for name, since in list(self._loading_since.items())]

    def loading_secs(self, name: str) -> float | None:
        """Seconds since this model started loading, or None when it is not loading."""
        since = self._loading_since.get(name)
        return None if since is None else time.monotonic() - since

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
        self._loading_since[name] = time.monotonic()
        self._loading_size[name] = path.stat().st_size
        try:
            loaded = await self._load(name, path, facts)
            pending.set_result(loaded)
            return loaded
        except BaseException as exc:
            pending.set_exception(exc)
            pending.exception()  # mark retrieved: waiters (if any) re-raise it themselves
            raise
        finally:
            self._loading_since.pop(name, None)
            self._loading_size.pop(name, None)
            async with self._guard:
                self._loading.pop(name, None)

    async def _load(self, name: str, path: Path, facts: dict) -> _Loaded:
        ok, why = self.available()
        if not ok:
            raise EngineUnavailable(why)
        n_ctx = self.planned_context(name, path, facts)
        need = estimate_bytes(path.stat().st_size, facts, n_ctx)
        async with self._guard:
            while len(self._models) >= self.max_loaded:
                evicted = await self._evict_locked()
                if not evicted:
                    break
        free = self.free_bytes()
        if need > free:
            limited = self.memory_limit and free < psutil.virtual_memory().available
            raise ModelTooLarge(
                f"model {name!r} needs about {_size(need)} of RAM with a {n_ctx}-token context, "
                f"but only {_size(free)} is free"
                + (f" within inference.memory_limit_mb ({self.memory_limit // 2**20})" if limited else "")
                + "; free memory, lower inference.n_ctx, or let a private-mesh peer lend (sharing.split)"
            )
        log.info("loading model %s (%s, ~%.0f MiB)", name, path.name, need / 2**20)

        gpu: dict = {}

        def load():
            gpu.update(gpu_load_kwargs(self.gpu, gpu_offload_supported()))
            # Flash attention, llama.cpp's own default: on CPU an agent's long prompt (OpenClaw's is ~7k tokens)
            # evaluates faster than with the unfused attention llama-cpp-python asks for (bench/tool_calls.py).
            from pinkybrain.node.services.grammar_sampling import grammar_llama_class  # numpy: with llama.cpp

            return grammar_llama_class()(model_path=str(path), n_ctx=n_ctx, n_threads=self.n_threads,
                                         flash_attn=True, verbose=False, **gpu)

        try:
            llm = await asyncio.to_thread(load)
        except (ValueError, RuntimeError, OSError) as exc:
            raise InferenceError(f"could not load model {name!r}: {exc}") from None
        loaded = _Loaded(llm=llm, path=path, bytes_estimate=need, chat=bool(facts.get("has_chat_template")),
                         n_ctx=n_ctx, n_gpu_layers=gpu["n_gpu_layers"], facts=dict(facts))
        async with self._guard:
            self._models[name] = loaded
        self._vocab.pop(name, None)  # the loaded model tokenizes from now on
        self._start_reaper()
        return loaded

    # -- context -------------------------------------------------------------------------------------
    def planned_context(self, name: str, path: Path, facts: dict) -> int:
        """The context this model has (loaded) or will be loaded with; fixed at the first ask, so a
        prompt checked against it is checked against the context it runs in."""
        loaded = self._models.get(name)
        if loaded is not None:
            return loaded.n_ctx
        if name not in self._planned_ctx:
            self._planned_ctx[name] = context_size(self.n_ctx, facts, path.stat().st_size, self.free_bytes())
        return self._planned_ctx[name]

    def _tokenizer(self, name: str, path: Path):
        loaded = self._models.get(name)
        if loaded is not None:
            return loaded.llm
        vocab = self._vocab.get(name)
        if vocab is None:
            from llama_cpp import Llama

            # Vocabulary only: a second or so, no weights, so a prompt is checked before a cold load.
            vocab = Llama(model_path=str(path), vocab_only=True, n_ctx=256, n_threads=1, verbose=False)
            self._vocab[name] = vocab
        return vocab

    def _count(self, name: str, path: Path, facts: dict, messages: list[dict]) -> int:
        llm = self._tokenizer(name, path)
        if not facts.get("has_chat_template"):
            return len(llm.tokenize(transcript_prompt(messages).encode(), add_bos=True, special=False))
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        def token_text(token: int) -> str:
            return llm.detokenize([token], special=True).decode("utf-8", "replace") if token >= 0 else ""

        template = llm.metadata.get("tokenizer.chat_template") or ""
        text = Jinja2ChatFormatter(template=template, eos_token=token_text(llm.token_eos()),
                                   bos_token=token_text(llm.token_bos()))(messages=messages)
        return len(llm.tokenize(text.prompt.encode(), add_bos=not text.added_special, special=True))

    async def count_tokens(self, name: str, path: Path, facts: dict, messages: list[dict]) -> int:
        """Tokens of the prompt these messages make, with the model's own tokenizer and prompt format."""
        ok, why = self.available()
        if not ok:
            raise EngineUnavailable(why)
        try:
            if name in self._models:  # warm: a short prompt costs well under a millisecond
                return self._count(name, path, facts, messages)
            return await asyncio.to_thread(self._count, name, path, facts, messages)
        except Exception as exc:  # noqa: BLE001 - a broken vocabulary or chat template: one clear error
            raise InferenceError(f"could not read the tokenizer of model {name!r}: {exc}") from None

    async def check_context(self, name: str, path: Path, facts: dict, messages: list[dict]) -> dict:
        """{"prompt_tokens", "n_ctx"}; raises ContextLengthExceeded when the prompt leaves no room to answer
        (llama.cpp would refuse it only after the stream had started)."""
        n_ctx = self.planned_context(name, path, facts)
        tokens = await self.count_tokens(name, path, facts, messages)
        if tokens >= n_ctx:
            raise ContextLengthExceeded(name, tokens, n_ctx)
        return {"prompt_tokens": tokens, "n_ctx": n_ctx}

    # -- keep-alive ----------------------------------------------------------------------------------
    def _start_reaper(self) -> None:
        if self.keep_alive_secs > 0 and (self._reaper is None or self._reaper.done()):
            self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())

    async def _reap_forever(self) -> None:
        period = min(max(self.keep_alive_secs / 4, 0.25), 30.0)
        while self._models:
            await asyncio.sleep(period)
            await self.unload_idle()

    async def unload_idle(self, now: float | None = None) -> list[str]:
        """Unload the models idle for keep_alive_secs or longer (none when keep_alive_secs is 0)."""
        if self.keep_alive_secs <= 0:
            return []
        now = time.monotonic() if now is None else now
        gone = []
        async with self._guard:
            for name, m in list(self._models.items()):
                if not m.lock.locked() and now - m.last_used >= self.keep_alive_secs:
                    del self._models[name]
                    gone.append((name, m))
        for name, m in gone:
            close = getattr(m.llm, "close", None)
            if close:
                await asyncio.to_thread(close)
            log.info("unloaded model %s after %.0f s idle", name, now - m.last_used)
        return [name for name, _ in gone]

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
            try:
                out = await asyncio.to_thread(self._run, model, messages, max_tokens, temperature, top_p, stop, False)
            except ValueError as exc:  # llama.cpp's "Requested tokens exceed context window", ...
                raise InferenceError(f"model {name!r} refused the prompt: {exc}") from None
            finally:
                model.last_used = time.monotonic()
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
                          stop: list[str] | None = None, meta: dict | None = None) -> AsyncIterator[str]:
        """Yield text pieces as the model produces them (the model stays locked until the end); `meta`,
        when given, gets the `finish_reason` (stop, length) and `completion_tokens` at the end."""
        meta = {} if meta is None else meta
        model = await self._get(name, path, facts)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        done = object()
        pieces = [0]  # llama.cpp streams one token per chunk (multi-byte characters may join a few)

        def produce():
            try:
                for chunk in self._run(model, messages, max_tokens, temperature, top_p, stop, True):
                    if cancelled.is_set():
                        break
                    choice = chunk["choices"][0]
                    piece = choice["delta"].get("content") if "delta" in choice else choice.get("text")
                    if choice.get("finish_reason"):
                        meta["finish_reason"] = choice["finish_reason"]
                    if piece:
                        pieces[0] += 1
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
                model.last_used = time.monotonic()
                meta["completion_tokens"] = pieces[0]

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
        if self._reaper is not None:
            self._reaper.cancel()
        self._vocab.clear()
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
