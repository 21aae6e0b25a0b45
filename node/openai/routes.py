"""The OpenAI-compatible endpoints: `/v1/models` (and `/v1/models/{id}`), `/v1/chat/completions`,
`/v1/completions`, `/v1/embeddings`. Model `pinkybrain` routes to a specialist, `pinkybrain/<specialist>`
names one, any other name is a model (local, a peer's, or a cloud model).

Models this node runs get everything (stop, seed, penalties, JSON mode and schemas, tools); a model served
by a peer or a cloud provider answers plain chats only and any other field is refused with a 400 naming it.
Bodies are parsed here (not by FastAPI) so that every error, a malformed body too, is in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import struct

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from pinkybrain.node.api.auth import principal_of
from pinkybrain.node.api.query import guest_refusal
from pinkybrain.node.core.credits import InsufficientCredit
from pinkybrain.node.core.principals import Principal
from pinkybrain.node.openai import llama
from pinkybrain.node.openai.errors import STREAMED_200, ContextLengthExceeded, OpenAIError
from pinkybrain.node.openai.schema import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from pinkybrain.node.openai.translate import (
    ResponseHead,
    chat_message,
    completion_id,
    finish_reason,
    normalize_messages,
    output_schema,
    parse_body,
    parse_tool_output,
    refuse_logprobs,
    refuse_unsupported,
    requested_max_tokens,
    response_schema,
    sampling,
    sse,
    tool_plan,
    usage,
    uses_extended_features,
    vision_error,
    with_tool_prompt,
)
from pinkybrain.node.services.brain import ModelRefused, NoModel
from pinkybrain.node.services.inference import EngineUnavailable, InferenceError, ModelTooLarge

router = APIRouter()
SSE_HEADERS = {"cache-control": "no-cache"}
MAX_EMBEDDING_INPUTS = 2048


def _schema(model) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def _as_openai(exc: Exception) -> OpenAIError:
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, ModelRefused):  # a model only the owner may use (unshared, or a cloud model)
        return OpenAIError(403, str(exc), param="model", code="forbidden")
    if isinstance(exc, NoModel):
        return OpenAIError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, InsufficientCredit):
        return OpenAIError(402, str(exc), code="insufficient_credit")
    if isinstance(exc, (ModelTooLarge, EngineUnavailable)):
        return OpenAIError(503, str(exc), code="model_unavailable", type="server_error")
    return OpenAIError(502, f"the model failed: {exc}", code="model_error", type="server_error")


def openai_errors(fn):
    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except (OpenAIError, ModelRefused, NoModel, InsufficientCredit, InferenceError) as exc:
            return _as_openai(exc).response()
    return wrapper


def _head(request: Request, model: str, prefix: str) -> ResponseHead:
    return ResponseHead(completion_id(prefix), model, f"pinkybrain-{request.app.state.runtime.version}")


def _is_owner(request: Request) -> bool:
    return principal_of(request) is Principal.OWNER


def _admit(request: Request) -> bool:
    """Whether the caller is the owner; anyone else is refused while this node does not share (or its guard
    has paused sharing), as on /api/query. Who may call /v1 at all is the auth middleware's table."""
    principal = principal_of(request)
    refused = guest_refusal(request.app.state.runtime, principal)
    if refused:
        raise OpenAIError(503, refused, code="sharing_paused", type="server_error")
    return principal is Principal.OWNER


# -- models --------------------------------------------------------------------------------------------
def _model_ids(runtime, owner: bool) -> list[str]:
    """What this caller may use: everything for the owner; for others what the node shares."""
    brain = runtime.brain
    local, cloud = brain.usable(owner)
    ids = ["pinkybrain"] + [f"pinkybrain/{s}" for s in sorted(brain.specialists)]
    return ids + sorted(local) + sorted(cloud) + brain.remote_models()


def _model_object(runtime, model_id: str) -> dict:
    return {"id": model_id, "object": "model", "created": int(runtime.started_at), "owned_by": "pinkybrain"}


@router.get("/v1/models", summary="OpenAI-compatible model list")
async def v1_models(request: Request):
    runtime = request.app.state.runtime
    return {"object": "list", "data": [_model_object(runtime, i) for i in _model_ids(runtime, _is_owner(request))]}


@router.get("/v1/models/{model_id:path}", summary="OpenAI-compatible model lookup")
@openai_errors
async def v1_model(request: Request, model_id: str):
    runtime = request.app.state.runtime
    if model_id not in _model_ids(runtime, _is_owner(request)):
        raise OpenAIError(404, f"The model {model_id!r} does not exist on this node (GET /v1/models lists them).",
                          param="model", code="model_not_found")
    return _model_object(runtime, model_id)


# -- chat ------------------------------------------------------------------------------------------
@router.post("/v1/chat/completions", responses=STREAMED_200, summary="OpenAI-compatible chat completion",
             openapi_extra=_schema(ChatCompletionRequest))
@openai_errors
async def v1_chat(request: Request):
    brain = request.app.state.runtime.brain
    body: ChatCompletionRequest = parse_body(await request.body(), ChatCompletionRequest)
    refuse_unsupported(body)
    owner = _admit(request)
    conv = normalize_messages(body.messages)
    try:
        plan = brain.plan_messages(body.model, conv.messages, max_tokens=requested_max_tokens(body),
                                   temperature=body.temperature, top_p=body.top_p, owner=owner)
    except ModelRefused:
        raise  # 403: a model only the owner may use (openai_errors)
    except NoModel as exc:
        raise OpenAIError(404, f"The model {body.model!r} does not exist: {exc}", param="model",
                          code="model_not_found") from None
    model = plan["model"]
    if conv.image_param:
        raise vision_error(model, conv.image_param)
    refuse_logprobs(body, model)
    head = _head(request, body.model, "chatcmpl")
    path = brain.local_models().get(model)
    if path is None:
        return await _chat_elsewhere(request, body, plan, conv, head)
    tools = tool_plan(body)
    grammar = await _grammar(tools, body)
    gen = llama.Generation(sampling=sampling(body, plan["settings"]), messages=with_tool_prompt(plan["messages"], tools),
                           grammar=grammar)
    facts = await asyncio.to_thread(brain.facts.get, path)

    async def record(text: str):
        await brain.record(None, conv.last_user, text, "openai", [plan["specialist"]], model)

    if not body.stream:
        result = await brain.engine.run_locked(model, path, facts, lambda loaded: llama.run(loaded, gen))
        content, calls = parse_tool_output(result["text"]) if tools else (result["text"].strip(), None)
        await record(content or "")
        return head.chat(chat_message(content, calls), finish_reason(result["finish_reason"], calls),
                         usage(result["prompt_tokens"], result["completion_tokens"]))

    items = brain.engine.iterate_locked(model, path, facts, lambda loaded: llama.stream(loaded, gen))
    await items.__anext__()  # rendered, counted and checked against the context: errors are still a status
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events():
        try:
            yield sse(head.chunk({"role": "assistant", "content": ""}))
            leading, result = True, {}
            async for kind, value in items:
                if kind == "end":
                    result = value
                elif not tools:  # tool output is one JSON object: parsed whole at the end
                    piece = value.lstrip() if leading else value
                    leading = leading and not piece
                    if piece:
                        yield sse(head.chunk({"content": piece}))
            content, calls = parse_tool_output(result["text"]) if tools else (result["text"].strip(), None)
            if calls:
                yield sse(head.chunk({"tool_calls": [{"index": 0, **calls[0]}]}))
            elif tools and content:
                yield sse(head.chunk({"content": content}))
            yield sse(head.chunk({}, finish_reason(result["finish_reason"], calls)))
            if include_usage:
                yield sse(head.chunk(None, used=usage(result["prompt_tokens"], result["completion_tokens"])))
            yield sse("[DONE]")
            await record(content or "")
        except Exception as exc:  # noqa: BLE001 - after the 200, an error can only travel in the stream
            yield sse(_as_openai(exc).body())
        finally:
            await items.aclose()

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


async def _grammar(tools, body: ChatCompletionRequest):
    answer = response_schema(body.response_format)
    if tools is None:
        return await asyncio.to_thread(llama.compile_grammar, answer, "response_format.json_schema.schema")

    def compile_all():
        usable = set()
        for tool in tools.tools:  # a parameter schema the converter cannot take: any JSON object instead
            try:
                llama.compile_grammar(tool["parameters"], "tools")
                usable.add(tool["name"])
            except OpenAIError:
                pass
        return llama.compile_grammar(output_schema(tools, answer, usable), "tools")

    return await asyncio.to_thread(compile_all)


async def _chat_elsewhere(request: Request, body: ChatCompletionRequest, plan: dict, conv, head: ResponseHead):
    """A peer's or a cloud model: plain chats only, through the brain (which fails over between peers)."""
    brain = request.app.state.runtime.brain
    model = plan["model"]
    features = uses_extended_features(body)
    if features:
        where = "a cloud provider" if model in brain.cloud_models else "a peer"
        raise OpenAIError(400, f"Model {model!r} runs on {where}, which takes plain chats only: "
                               f"{', '.join(repr(f) for f in features)} need a model this node runs itself.",
                          param=features[0], code="unsupported_parameter")
    settings = plan["settings"]
    served: dict = {}
    if not body.stream:
        text, used, _ = await brain.complete(model, plan["messages"], meta=served, **settings)
        if not served.get("public"):  # zero query logging for the public mesh
            await brain.record(None, conv.last_user, text, "openai", [plan["specialist"]], model)
        got = used.get("completion_tokens", 0)
        return head.chat(chat_message(text, None), "length" if got >= settings["max_tokens"] else "stop",
                         usage(used.get("prompt_tokens", 0), got))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events():
        pieces = []
        try:
            yield sse(head.chunk({"role": "assistant", "content": ""}))
            async for piece in brain.stream(model, plan["messages"], meta=served, **settings):
                pieces.append(piece)
                yield sse(head.chunk({"content": piece}))
        except Exception as exc:  # noqa: BLE001 - after the 200, an error can only travel in the stream
            yield sse(_as_openai(exc).body())
            return
        # A peer streams text pieces, not tokens: one piece is counted as one token.
        yield sse(head.chunk({}, "length" if len(pieces) >= settings["max_tokens"] else "stop"))
        if include_usage:
            yield sse(head.chunk(None, used=usage(0, len(pieces))))
        yield sse("[DONE]")
        if not served.get("public"):
            await brain.record(None, conv.last_user, "".join(pieces).strip(), "openai", [plan["specialist"]], model)

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


# -- completions -----------------------------------------------------------------------------------
def _local_model(brain, name: str, what: str, owner: bool) -> tuple[str, object]:
    """A model this node runs itself: `pinkybrain` (or `pinkybrain/<specialist>`) picks its usual one. Only
    the owner may use a model the node does not share."""
    if name == "pinkybrain" or name.startswith("pinkybrain/"):
        spec = brain.specialists.get(name.split("/", 1)[1]) if "/" in name else None
        model = brain.choose_model(spec, owner=owner)
    else:
        model = name
    local, _ = brain.usable(owner)
    path = local.get(model)
    if path is None and model in brain.local_models():
        raise ModelRefused(f"{model!r} is not shared by this node: only its owner may use it")
    if path is None:
        if model in brain.cloud_models or model in brain.remote_models():
            raise OpenAIError(400, f"{what} need a GGUF model on this node; {model!r} runs elsewhere.",
                              param="model", code="unsupported_model")
        raise OpenAIError(404, f"The model {name!r} does not exist on this node.", param="model",
                          code="model_not_found")
    return model, path


@router.post("/v1/completions", responses=STREAMED_200, summary="OpenAI-compatible text completion",
             openapi_extra=_schema(CompletionRequest))
@openai_errors
async def v1_completions(request: Request):
    brain = request.app.state.runtime.brain
    body: CompletionRequest = parse_body(await request.body(), CompletionRequest)
    refuse_unsupported(body)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise OpenAIError(400, "Send one prompt per request: several prompts would be several choices.",
                          param="prompt", code="unsupported_value")
    if body.suffix:
        raise OpenAIError(400, "'suffix' (fill-in-the-middle) is not supported.", param="suffix",
                          code="unsupported_parameter")
    model, path = _local_model(brain, body.model, "Text completions", _admit(request))
    if body.logprobs:
        refuse_logprobs(body, model)
    prompt = prompts[0]
    gen = llama.Generation(sampling=sampling(body, {"max_tokens": 16, "temperature": 1.0, "top_p": 1.0}),
                           prompt=prompt, param="prompt")
    facts = await asyncio.to_thread(brain.facts.get, path)
    head = _head(request, body.model, "cmpl")
    echo = prompt if body.echo else ""
    if not body.stream:
        result = await brain.engine.run_locked(model, path, facts, lambda loaded: llama.run(loaded, gen))
        return head.text(echo + result["text"], finish_reason(result["finish_reason"], None),
                         usage(result["prompt_tokens"], result["completion_tokens"]))
    items = brain.engine.iterate_locked(model, path, facts, lambda loaded: llama.stream(loaded, gen))
    await items.__anext__()
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events():
        try:
            if echo:
                yield sse(head.text(echo, None))
            result = {}
            async for kind, value in items:
                if kind == "end":
                    result = value
                else:
                    yield sse(head.text(value, None))
            yield sse(head.text("", finish_reason(result["finish_reason"], None)))
            if include_usage:
                yield sse(head.text(None, None, used=usage(result["prompt_tokens"], result["completion_tokens"])))
            yield sse("[DONE]")
        except Exception as exc:  # noqa: BLE001 - after the 200, an error can only travel in the stream
            yield sse(_as_openai(exc).body())
        finally:
            await items.aclose()

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


# -- embeddings ------------------------------------------------------------------------------------
@router.post("/v1/embeddings", summary="OpenAI-compatible embeddings (a local GGUF in embedding mode)",
             openapi_extra=_schema(EmbeddingRequest))
@openai_errors
async def v1_embeddings(request: Request):
    brain = request.app.state.runtime.brain
    body: EmbeddingRequest = parse_body(await request.body(), EmbeddingRequest)
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts or not all(isinstance(t, str) for t in texts):
        raise OpenAIError(400, "'input' must be a string or a list of strings: token arrays belong to another "
                               "model's tokenizer (LangChain: check_embedding_ctx_length=False).",
                          param="input", code="invalid_value")
    if len(texts) > MAX_EMBEDDING_INPUTS or any(not t for t in texts):
        raise OpenAIError(400, f"'input' must hold 1 to {MAX_EMBEDDING_INPUTS} non-empty strings.",
                          param="input", code="invalid_value")
    model, path = _local_model(brain, body.model, "Embeddings", _admit(request))
    facts = await asyncio.to_thread(brain.facts.get, path)

    def check(counts: list[int], n_ctx: int):
        if max(counts) > n_ctx:
            raise ContextLengthExceeded(n_ctx, max(counts), param="input", what="input")

    result = await brain.embeddings.count_and_embed(model, path, facts, texts, check)
    width = len(result.vectors[0])
    if body.dimensions is not None and body.dimensions != width:
        raise OpenAIError(400, f"Model {model!r} gives {width}-dimensional embeddings; 'dimensions' must be "
                               f"{width} or left out.", param="dimensions", code="invalid_value")
    data = []
    for i, vector in enumerate(result.vectors):
        value = (base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
                 if body.encoding_format == "base64" else vector)
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {"object": "list", "data": data, "model": body.model,
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}}


# -- anything else under /v1 -----------------------------------------------------------------------
@router.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
async def v1_unknown(request: Request, rest: str):
    return OpenAIError(404, f"Unknown request URL: {request.method} {request.url.path}. This node serves "
                            "/v1/models, /v1/chat/completions, /v1/completions and /v1/embeddings.",
                       code="unknown_url").response()
