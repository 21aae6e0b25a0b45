"""Query endpoint: `/api/query` (the specialist router, with SSE token streaming). The OpenAI-compatible
`/v1/*` endpoints, served by the same brain, live in node/openai/."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from pinkybrain.node.api.auth import principal_of
from pinkybrain.node.api.errors import errors
from pinkybrain.node.core.credits import InsufficientCredit
from pinkybrain.node.core.principals import Principal, visible_privacy
from pinkybrain.node.core.router import NoAnswer, RouterError
from pinkybrain.node.services.brain import ModelRefused, NoModel
from pinkybrain.node.services.runtime import NodeRuntime

MODES = ("single", "vote", "chain", "fuse", "compare", "specialist")
router = APIRouter()


def get_runtime(request: Request) -> NodeRuntime:
    return request.app.state.runtime


RuntimeDep = Annotated[NodeRuntime, Depends(get_runtime)]



PrincipalDep = Annotated[Principal, Depends(principal_of)]


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
    session_id: str | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=32768)
    model: str | None = Field(default=None, description="force one model (local or cloud) for every step")
    stream: bool = Field(default=False, description="server-sent events of text pieces (single/specialist modes)")


def _error(status: int, code: str, detail: str, **extra) -> HTTPException:
    return HTTPException(status_code=status, detail={"error": code, "detail": detail, **extra})


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
    requested = _requested(body)
    unknown = [n for n in requested if n not in brain.specialists]
    if unknown:
        raise _error(400, "unknown_specialist",
                     f"unknown specialist {unknown[0]!r}; valid specialists: {', '.join(sorted(brain.specialists))}",
                     valid=sorted(brain.specialists))
    if body.stream:
        return await _stream_query(runtime, body, requested, owner)
    try:
        return await brain.query(body.prompt, body.mode, requested, max_tokens=body.max_tokens, model=body.model,
                                 session_id=body.session_id, owner=owner)
    except ModelRefused as exc:
        raise _error(403, "forbidden", str(exc)) from None
    except NoModel as exc:
        raise _error(503, "no_model", str(exc)) from None
    except InsufficientCredit as exc:  # a public peer would have answered, but this node cannot pay
        raise _error(402, "insufficient_credit", str(exc)) from None
    except NoAnswer as exc:
        raise _error(502, "no_answer", str(exc), errors=exc.errors) from None
    except RouterError as exc:
        raise _error(400, "invalid_query", str(exc)) from None
    except ValueError as exc:
        raise _error(400, "invalid_request", str(exc)) from None


async def _stream_query(runtime: NodeRuntime, body: QueryRequest, requested: list[str], owner: bool):
    brain = runtime.brain
    if body.mode not in ("single", "specialist") or len(requested) > 1:
        raise _error(400, "stream_unsupported",
                     "streaming is available for single mode and for one named specialist; "
                     "use stream=false for multi-specialist modes")
    try:
        plan = brain.plan_single(body.prompt, requested, model=body.model, max_tokens=body.max_tokens, owner=owner)
    except ModelRefused as exc:
        raise _error(403, "forbidden", str(exc)) from None
    except NoModel as exc:
        raise _error(503, "no_model", str(exc)) from None

    async def events():
        yield _sse("start", {k: v for k, v in plan.items() if k != "messages"})
        pieces: list[str] = []
        start = time.perf_counter()
        served: dict = {}  # filled by the brain: which node (this one or a peer) produced the answer
        try:
            async for piece in brain.stream(plan["model"], plan["messages"], meta=served, **plan["settings"]):
                pieces.append(piece)
                yield _sse("token", {"text": piece})
        except Exception as exc:  # noqa: BLE001 - reported to the client as an event, never a crash
            yield _sse("error", {"detail": str(exc)})
            return
        answer = "".join(pieces).strip()
        # Zero query logging: an answer from the public mesh is not stored.
        record = {"session_id": None} if served.get("public") else await brain.record(
            body.session_id, body.prompt, answer, body.mode, [plan["specialist"]], plan["model"])
        yield _sse("end", {"answer": answer, "session_id": record["session_id"],
                           "model": served.get("model", plan["model"]), "specialist": plan["specialist"],
                           "node": served.get("node", runtime.identity.node_id),
                           "elapsed_ms": round((time.perf_counter() - start) * 1000, 1)})

    return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})
