"""Query endpoint: `/api/query` (the specialist router, with SSE token streaming). The OpenAI-compatible
`/v1/*` endpoints, served by the same brain, live in node/openai/."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from pinkybrain.node.api.deps import PrincipalDep, RuntimeDep
from pinkybrain.node.api.errors import errors
from pinkybrain.node.core.credits import InsufficientCredit
from pinkybrain.node.core.principals import Principal, visible_privacy
from pinkybrain.node.core.router import NoAnswer, RouterError
from pinkybrain.node.services.brain import ModelRefused, NoModel, split_requested
from pinkybrain.node.services.inference import ContextLengthExceeded, InferenceError, gpu_offload_supported
from pinkybrain.node.services.runtime import NodeRuntime

MODES = ("single", "vote", "chain", "fuse", "compare", "specialist")
router = APIRouter()





def guest_refusal(runtime: NodeRuntime, principal: Principal, session_id: str | None = None) -> str | None:
    """Why a query from someone other than the owner cannot run now (None: it may). Guests use what the
    node shares, under the resource guard, and continue only conversations they may read."""
    if principal is Principal.OWNER:
        return None
    if not runtime.cfg["sharing.enabled"]:
        return "this node does not share (sharing.enabled is false): only its owner may query it"
    if runtime.guard.paused:
        return f"sharing is paused by this node's resource guard ({runtime.guard.reason or 'busy'}): try later"
    if session_id:
        try:
            level = runtime.conversations.get_session(session_id)["privacy"]
        except (KeyError, ValueError):
            return None  # an unknown id starts a new conversation, as for the owner
        if level not in visible_privacy(principal):
            return f"conversation {session_id} is {level}: only this node's owner may continue it"
    return None


class QueryRequest(BaseModel):
    prompt: str = Field(min_length=1, max_length=200_000)
    mode: str = "single"
    specialists: list[str] = Field(default_factory=list)
    specialist: str | None = None
    session_id: str | None = Field(default=None, description="continue this conversation: the model is sent its "
                                   "earlier turns, newest first within the model's context")
    max_tokens: int | None = Field(default=None, ge=1, le=32768)
    temperature: float | None = Field(default=None, ge=0, le=2)
    model: str | None = Field(default=None, description="force one model (local or cloud) for every step")
    split: bool = Field(default=False, description="owner only: run the model split over this node and the "
                        "private mesh's lending peers (llama.cpp RPC inside the peer links), every node taking "
                        "a share; a model too big for this node's free memory is split without asking")
    stream: bool = Field(default=False, description="server-sent events: `loading` while a model loads, then "
                         "`token` pieces (single and specialist modes with one specialist) or one `answer` per "
                         "specialist as it finishes (the other modes), then `end`")


LOAD_TICK_SECS = 1.0  # how often a `loading` event reports the time a cold model has been loading


def _error(status: int, code: str, detail: str, **extra) -> HTTPException:
    return HTTPException(status_code=status, detail={"error": code, "detail": detail, **extra})


def _context_error(exc: ContextLengthExceeded) -> HTTPException:
    return _error(400, exc.code, str(exc), limit=exc.limit, prompt_tokens=exc.prompt_tokens, model=exc.model)


def _requested(body: QueryRequest) -> list[str]:
    names = ([body.specialist] if body.specialist else []) + list(body.specialists)
    return list(dict.fromkeys(n.strip() for n in names if n and n.strip()))


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


@router.post(
    "/api/query",
    summary="Submit an AI query",
    responses={
        200: {"content": {"application/json": {}, "text/event-stream": {"schema": {"type": "string"}}},
              "description": "The answer, or with `stream: true` server-sent events (token, done, error)"},
        **errors(400, 402, 502, 503),
    },
)
async def query(runtime: RuntimeDep, principal: PrincipalDep, body: QueryRequest):
    brain = runtime.brain
    owner = principal is Principal.OWNER
    refused = guest_refusal(runtime, principal, body.session_id)
    if refused:
        raise _error(403 if "conversation" in refused else 503, "forbidden" if "conversation" in refused
                     else "sharing_paused", refused)
    if body.mode not in MODES:
        raise _error(400, "unknown_mode", f"unknown mode {body.mode!r}; valid modes: {', '.join(MODES)}",
                     valid=list(MODES))
    if body.split and not owner:
        raise _error(403, "forbidden", "only this node's owner may ask for a split (it borrows peers' memory)")
    split_requested.set(body.split)
    requested = _requested(body)
    unknown = [n for n in requested if n not in brain.specialists]
    if unknown:
        raise _error(400, "unknown_specialist",
                     f"unknown specialist {unknown[0]!r}; valid specialists: {', '.join(sorted(brain.specialists))}",
                     valid=sorted(brain.specialists))
    try:
        if body.stream and body.mode in ("single", "specialist") and len(requested) <= 1:
            return await _stream_tokens(runtime, body, requested, owner)
        await brain.precheck(body.prompt, body.mode, requested, model=body.model, max_tokens=body.max_tokens,
                             owner=owner)
        if body.stream:
            return _stream_answers(runtime, body, requested, owner)
        return await brain.query(body.prompt, body.mode, requested, max_tokens=body.max_tokens, model=body.model,
                                 session_id=body.session_id, temperature=body.temperature, owner=owner)
    except ModelRefused as exc:
        raise _error(403, "forbidden", str(exc)) from None
    except NoModel as exc:
        raise _error(503, "no_model", str(exc)) from None
    except ContextLengthExceeded as exc:
        raise _context_error(exc) from None
    except InsufficientCredit as exc:  # a public peer would have answered, but this node cannot pay
        raise _error(402, "insufficient_credit", str(exc)) from None
    except NoAnswer as exc:
        raise _error(502, "no_answer", str(exc), errors=exc.errors) from None
    except RouterError as exc:
        raise _error(400, "invalid_query", str(exc)) from None
    except InferenceError as exc:  # e.g. the tokenizer of a broken GGUF while checking the context
        raise _error(503, "model_error", str(exc)) from None
    except ValueError as exc:
        raise _error(400, "invalid_request", str(exc)) from None


def _loading(brain, cold: dict) -> dict:
    secs = brain.loading_secs(cold["model"])
    return {**cold, "elapsed_secs": round(secs or 0.0, 1)}


async def _stream_tokens(runtime: NodeRuntime, body: QueryRequest, requested: list[str], owner: bool):
    """One answer, token by token. Everything that can refuse the query (no model, a prompt over the
    context) is checked before the 200 and its first byte."""
    brain = runtime.brain
    plan = await brain.plan_stream(body.prompt, requested, model=body.model, max_tokens=body.max_tokens,
                                   temperature=body.temperature, session_id=body.session_id, owner=owner)
    cold = brain.cold_model(plan["model"])

    async def events():
        yield _sse("start", {k: v for k, v in plan.items() if k != "messages"})
        pieces: list[str] = []
        start = time.perf_counter()
        served: dict = {}  # filled by the brain: which node produced the answer, finish_reason, tokens
        stream = brain.stream(plan["model"], plan["messages"], meta=served, split=body.split, **plan["settings"])
        first = None
        try:
            if cold is not None:
                # A cold model: report the load (name, size, time so far) until its first piece comes.
                yield _sse("loading", _loading(brain, cold))
                first = asyncio.ensure_future(anext(stream, None))
                while not (await asyncio.wait({first}, timeout=LOAD_TICK_SECS))[0]:
                    yield _sse("loading", _loading(brain, cold))
                piece = first.result()
                if piece is not None:
                    pieces.append(piece)
                    yield _sse("token", {"text": piece})
            async for piece in stream:
                pieces.append(piece)
                yield _sse("token", {"text": piece})
        except Exception as exc:  # noqa: BLE001 - reported to the client as an event, never a crash
            yield _sse("error", {"detail": str(exc)})
            return
        finally:
            if first is not None and not first.done():
                first.cancel()  # the client left while the model loaded: stop waiting, then close
                await asyncio.wait({first})
            await stream.aclose()
        answer = "".join(pieces).strip()
        # Zero query logging: an answer from the public mesh is not stored.
        record = {"session_id": None} if served.get("public") else await brain.record(
            body.session_id, body.prompt, answer, body.mode, [plan["specialist"]], plan["model"])
        yield _sse("end", {"answer": answer, "session_id": record["session_id"],
                           "model": served.get("model", plan["model"]), "specialist": plan["specialist"],
                           "node": served.get("node", runtime.identity.node_id),
                           "finish_reason": served.get("finish_reason"),
                           "completion_tokens": served.get("completion_tokens"),
                           "prompt_tokens": (plan.get("context") or {}).get("prompt_tokens"),
                           "max_tokens": plan["settings"]["max_tokens"], "history": plan.get("history"),
                           **({"split": served["split"], "engine_timings": served.get("timings")}
                              if served.get("split") else {}),
                           "elapsed_ms": round((time.perf_counter() - start) * 1000, 1)})

    return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})


def _stream_answers(runtime: NodeRuntime, body: QueryRequest, requested: list[str], owner: bool):
    """Multi-specialist modes: an `answer` event as each specialist finishes, `loading` while a model
    loads, then `end` with the whole result (as the non-streaming answer)."""
    brain = runtime.brain

    async def events():
        yield _sse("start", {"mode": body.mode, "specialists": requested})
        finished: asyncio.Queue = asyncio.Queue()

        async def on_answer(answer) -> None:
            finished.put_nowait(answer.to_dict())

        task = asyncio.ensure_future(brain.query(
            body.prompt, body.mode, requested, max_tokens=body.max_tokens, model=body.model,
            session_id=body.session_id, temperature=body.temperature, on_answer=on_answer, owner=owner))
        try:
            while not task.done() or not finished.empty():
                while not finished.empty():
                    yield _sse("answer", finished.get_nowait())
                if task.done():
                    break
                await asyncio.wait({task}, timeout=LOAD_TICK_SECS / 4)
                for state in brain.engine.loading_now():
                    yield _sse("loading", state)
            result = task.result()
        except (NoAnswer, RouterError, NoModel, InsufficientCredit, InferenceError, ValueError) as exc:
            yield _sse("error", {"detail": str(exc), **({"errors": exc.errors} if isinstance(exc, NoAnswer) else {})})
            return
        finally:
            if not task.done():
                task.cancel()
        yield _sse("end", result)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})


@router.get("/api/specialists", summary="The specialist profiles")
async def specialists(runtime: RuntimeDep):
    """Each profile: what it is for, the routing hints that pick it, the models it prefers."""
    return {"specialists": [
        {"name": s.name, "description": s.description,
         "hints": [k for k, _ in s.keywords] + [f"/{pattern}/" for pattern, _ in s.patterns],
         "preferred_models": list(s.preferred_models), "roles": list(s.roles), "temperature": s.temperature,
         "max_tokens": s.max_tokens}
        for s in sorted(runtime.brain.specialists.values(), key=lambda s: s.name)]}


@router.get("/api/models/ps", summary="Loaded models: memory, device, idle time")
async def models_ps(runtime: RuntimeDep):
    engine = runtime.brain.engine
    on_gpu = await asyncio.to_thread(gpu_offload_supported)  # the first call probes llama.cpp: not on the loop
    split = runtime.split.loaded() if runtime.split is not None else []
    return {"models": engine.loaded(on_gpu) + split, "keep_alive_secs": engine.keep_alive_secs,
            "gpu_offload": on_gpu}
