"""Runs OpenAI requests on llama.cpp (called in a worker thread with the model loaded and locked).

The prompt is rendered and tokenized here, with the model's own chat template (or the node's plain
question/answer transcript for a GGUF without one), so its length is known before anything is generated:
a prompt that leaves no room in the context is refused with `context_length_exceeded`, never a 200 and then
an error in the stream.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

from pinkybrain.node.openai.errors import ContextLengthExceeded, OpenAIError
from pinkybrain.node.services.inference import TRANSCRIPT_STOPS, transcript_prompt


def compile_grammar(schema: dict | None, param: str):
    """A llama.cpp grammar (llama_cpp.LlamaGrammar) that only admits JSON matching `schema`."""
    if schema is None:
        return None
    from llama_cpp import LlamaGrammar

    try:
        return LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
    except Exception as exc:  # noqa: BLE001 - the converter raises anything from KeyError to ValueError
        raise OpenAIError(400, f"The JSON schema in {param} cannot be turned into a grammar: {exc!r}.",
                          param=param, code="invalid_schema") from None


@dataclass
class Generation:
    sampling: dict
    messages: list[dict] | None = None  # a chat, or
    prompt: str | None = None  # a raw completion prompt
    grammar: object | None = None
    param: str = "messages"


@dataclass
class Prepared:
    tokens: list[int]
    stop: list[str]
    stopping_criteria: object | None
    repeat_penalty: float


def _chat_prompt(llm, messages: list[dict]) -> tuple[str, list[str], object | None]:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    eos, bos = llm.token_eos(), llm.token_bos()
    text = lambda t: llm.detokenize([t], special=True).decode("utf-8", "replace") if t >= 0 else ""  # noqa: E731
    formatter = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], eos_token=text(eos),
                                    bos_token=text(bos), stop_token_ids=[eos])
    try:
        result = formatter(messages=messages)
    except Exception as exc:  # noqa: BLE001 - a template's raise_exception() or a Jinja error
        raise OpenAIError(400, f"The model's chat template refused these messages: {exc}", param="messages",
                          code="invalid_messages") from None
    stop = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
    return result.prompt, [s for s in stop if s], result.stopping_criteria


def prepare(loaded, gen: Generation) -> Prepared:
    llm = loaded.llm
    if gen.prompt is not None:
        tokens = llm.tokenize(gen.prompt.encode("utf-8"), add_bos=True, special=False)
        prepared = Prepared(tokens, [], None, 1.0)
    elif loaded.chat and "tokenizer.chat_template" in llm.metadata:
        prompt, stop, criteria = _chat_prompt(llm, gen.messages)
        tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        prepared = Prepared(tokens, stop, criteria, 1.1)
    else:
        tokens = llm.tokenize(transcript_prompt(gen.messages).encode("utf-8"), add_bos=True, special=False)
        # Grammar-bound output is one JSON value: the transcript's stops could cut it inside a string.
        prepared = Prepared(tokens, [] if gen.grammar is not None else list(TRANSCRIPT_STOPS), None, 1.15)
    if len(tokens) >= llm.n_ctx():
        raise ContextLengthExceeded(llm.n_ctx(), len(tokens), param=gen.param,
                                    what="prompt" if gen.prompt is not None else "messages")
    return prepared


def _create(llm, prepared: Prepared, gen: Generation, stream: bool):
    s = gen.sampling
    if s["seed"] is not None:
        # Reusing the cached prompt prefix evaluates the prompt's tail in other batches, which moves the
        # logits enough to change what a seeded sampler draws: a seed must give the same answer every time.
        llm.reset()
    return llm.create_completion(
        prompt=prepared.tokens, max_tokens=s["max_tokens"], temperature=s["temperature"], top_p=s["top_p"],
        stop=prepared.stop + s["stop"], seed=s["seed"] if s["seed"] is not None else secrets.randbits(31),
        presence_penalty=s["presence_penalty"], frequency_penalty=s["frequency_penalty"],
        repeat_penalty=prepared.repeat_penalty, stopping_criteria=prepared.stopping_criteria,
        grammar=gen.grammar, stream=stream)


def _count(llm, text: str) -> int:
    return len(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)) if text else 0


def run(loaded, gen: Generation) -> dict:
    prepared = prepare(loaded, gen)
    out = _create(loaded.llm, prepared, gen, stream=False)
    choice = out["choices"][0]
    used = out.get("usage") or {}
    return {"text": choice.get("text") or "", "finish_reason": choice.get("finish_reason"),
            "prompt_tokens": used.get("prompt_tokens", len(prepared.tokens)),
            "completion_tokens": used.get("completion_tokens", 0)}


def stream(loaded, gen: Generation) -> Iterator[tuple]:
    """("prepared", prompt_tokens) before generating, then ("text", piece)..., then ("end", result)."""
    prepared = prepare(loaded, gen)
    yield ("prepared", len(prepared.tokens))
    pieces, finish = [], None
    for chunk in _create(loaded.llm, prepared, gen, stream=True):
        choice = chunk["choices"][0]
        if choice.get("text"):
            pieces.append(choice["text"])
            yield ("text", choice["text"])
        finish = choice.get("finish_reason") or finish
    text = "".join(pieces)
    yield ("end", {"text": text, "finish_reason": finish, "prompt_tokens": len(prepared.tokens),
                   "completion_tokens": _count(loaded.llm, text)})
