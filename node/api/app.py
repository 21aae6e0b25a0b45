"""The node's HTTP API: every endpoint of the seed's API reference, signed with PB1 HMAC.

Routes stay thin: they translate HTTP to runtime/service calls and errors to JSON with a clear detail.
"""

from __future__ import annotations

import asyncio
import inspect
import platform
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from pinkybrain import __version__
from pinkybrain.node.api.deps import PrincipalDep, RuntimeDep
from pinkybrain.node.api.errors import COMMON_ERRORS, api_error, errors
from pinkybrain.node.api.front import node_layers
from pinkybrain.node.api.hot_routes import ping_answer, status_answer
from pinkybrain.node.api.hot_writes import memory_refusal as refusal_of_memory
from pinkybrain.node.api.keys import router as keys_router
from pinkybrain.node.api.query import router as query_router
from pinkybrain.node.api.responses import FastJSONResponse
from pinkybrain.node.api.trust import router as trust_router
from pinkybrain.node.core.principals import Principal, visible_privacy
from pinkybrain.node.dashboard.events import recent_events
from pinkybrain.node.dashboard.routes import api_router as dashboard_api_router
from pinkybrain.node.dashboard.routes import router as dashboard_router
from pinkybrain.node.openai.errors import OPENAI_ERRORS
from pinkybrain.node.openai.routes import router as openai_router
from pinkybrain.node.services import updater
from pinkybrain.node.services.memory_writes import committer_for
from pinkybrain.node.services.models import CloudShareRefused, ModelNotFound, ModelPathError
from pinkybrain.node.services.runtime import NodeRuntime

PRIVACY_LEVELS = ("private", "peers-only", "public")


class MemorySetRequest(BaseModel):
    key: str
    value: Any
    network: Literal["private", "public"] = "private"


class PrivacyRequest(BaseModel):
    privacy: Literal["private", "peers-only", "public"]


error = api_error

router = APIRouter()




# -- node ---------------------------------------------------------------------------------------
# The hot routes: answered by node/api/hot_routes.py before FastAPI when the app is served; these routes
# document them (OpenAPI) and answer the same in an app without those layers.
@router.get("/api/ping", summary="Health check")
async def ping(runtime: RuntimeDep):
    return FastJSONResponse(ping_answer(runtime))


@router.get("/api/status", summary="Node status, resource guard, mesh state")
async def status(runtime: RuntimeDep):
    return FastJSONResponse(status_answer(runtime))


@router.get("/api/capabilities", summary="Hardware capabilities report")
async def capabilities(runtime: RuntimeDep, principal: PrincipalDep):
    from pinkybrain.node.services.capabilities import collect_capabilities

    report = await asyncio.to_thread(collect_capabilities, runtime.data_dir)
    if runtime.split is not None:
        split = report["split"] = await asyncio.to_thread(runtime.split.capabilities)
        if principal is not Principal.OWNER:  # which public peers borrow here is no private member's business
            split["public_lending"] = [{k: v for k, v in server.items() if k != "borrower"}
                                       for server in split["public_lending"]]
    return report


@router.get("/api/daemon", summary="Daemon process status")
async def daemon(runtime: RuntimeDep):
    proc = runtime._process
    with proc.oneshot():
        mem = proc.memory_info().rss
        threads = proc.num_threads()
    return {
        "pid": runtime.pid,
        "running": True,
        "start_mode": runtime.start_mode,
        "uptime_secs": runtime.uptime(),
        "started_at": runtime.started_at,
        "pid_file": str(runtime.home / "pinkybrain.pid"),
        "log_file": str(runtime.cfg.path("logging.file") if runtime.cfg["logging.file"] else runtime.home / "pinkybrain.log")
        if runtime.start_mode == "daemon" else None,
        "rss_bytes": mem,
        "threads": threads,
        "python": platform.python_version(),
        "version": runtime.version,
    }


@router.get("/api/update", summary="Check for available updates", responses=errors(409, 502))
async def update(
    runtime: RuntimeDep,
    fetch: Annotated[bool, Query(description="false: only the last attempt and its progress")] = True,
):
    try:
        return await asyncio.to_thread(
            updater.check, runtime.cfg, runtime.version, home=runtime.home, fetch=fetch
        )
    except updater.UpdateError as exc:
        raise error(exc.status, exc.code, exc.detail) from None


# -- queries ------------------------------------------------------------------------------------
@router.get("/api/peers", summary="Connected peers")
async def peers(runtime: RuntimeDep):
    items = runtime.mesh.peers() if runtime.mesh is not None else []
    # Public peers apart: stealth ones are only counted (public_mesh.PublicMesh.peers).
    public = runtime.public.peers() if runtime.public is not None else {"peers": [], "stealth_peers": 0}
    return {"peers": items, "count": len(items), "public": public["peers"],
            "public_stealth_peers": public["stealth_peers"]}


@router.get("/api/discover", summary="Auto-discovered nodes (mDNS, Tailscale)")
async def discover(runtime: RuntimeDep):
    from pinkybrain.node.services.discovery import tailscale_peers

    mdns = list(runtime.mdns.found.values()) if runtime.mdns else []
    tailscale = await asyncio.to_thread(tailscale_peers)
    mesh = runtime.mesh
    linked_ips = {p["address"].rsplit(":", 1)[0] for p in mesh.peers() if p["address"]} if mesh else set()
    mdns = [{**n, "connected": bool(mesh and n.get("node_id") and mesh.connected(n["node_id"]))} for n in mdns]
    for peer in tailscale["peers"]:
        peer["connected"] = any(ip in linked_ips for ip in peer.get("addresses") or [])
    return {
        "mdns": {"available": runtime.mdns is not None, "nodes": mdns},
        "tailscale": tailscale,
        "count": len(mdns) + len(tailscale["peers"]),
    }


@router.post("/api/network/mesh/join", summary="Join the public mesh", responses=errors(400))
async def mesh_join(runtime: RuntimeDep):
    from pinkybrain.node.services.tracker_client import TrackerError

    if runtime.public is None:
        raise error(503, "not_ready", "the node is still starting")
    try:
        state = await runtime.public.join()
    except TrackerError as exc:
        raise error(503, "tracker_unavailable",
                    f"cannot join the public mesh via {runtime.cfg['p2p.tracker']}: {exc.message}") from None
    except ValueError as exc:  # p2p.tracker is not a tracker URL
        raise error(400, "bad_tracker_url", f"cannot join the public mesh: {exc}") from None
    shown = state["addresses"] if isinstance(state["addresses"], str) else ", ".join(state["addresses"])
    return {**state, "detail": f"joined the public mesh via {state['tracker']} "
                               f"as {shown or 'a relay-only node (no public address)'}"}


@router.post(
    "/api/update/apply", summary="Apply an available update", status_code=202, responses=errors(409, 502)
)
async def update_apply(
    runtime: RuntimeDep,
    allow_downgrade: Annotated[bool, Body(embed=True, description="install an older version")] = False,
):
    # Everything is verified (signature, version policy, size, SHA-256) before the worker changes anything.
    try:
        return await asyncio.to_thread(updater.start_apply, runtime, allow_downgrade)
    except updater.UpdateError as exc:
        raise error(exc.status, exc.code, exc.detail) from None


@router.post("/api/network/mesh/leave", summary="Leave the public mesh")
async def mesh_leave(runtime: RuntimeDep):
    left = runtime.public is not None and await runtime.public.leave()
    return {"joined": False, "left": left,
            "detail": "left the public mesh" if left else "this node is not on the public mesh"}


# -- memory -------------------------------------------------------------------------------------
def memory_refusal(exc: Exception, key: str | None) -> HTTPException | None:
    """The HTTP error for a refused memory read or write, or None for an unexpected failure (the mapping is
    hot_writes.memory_refusal, which the fast write path answers with too)."""
    refused = refusal_of_memory(exc, key)
    if refused is None:
        return None
    status, body = refused
    return error(status, body["error"], body["detail"])


def memory_call(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:
        refusal = memory_refusal(exc, args[0] if args else None)
        if refusal is None:
            raise
        raise refusal from None


async def memory_write(write, key: str):
    """Await a group-committed write (services.memory_writes); refusals map as memory_call's do."""
    try:
        return await write
    except Exception as exc:
        refusal = memory_refusal(exc, key)
        if refusal is None:
            raise
        raise refusal from None


Network = Literal["private", "public"]


def memory_store(runtime: NodeRuntime, network: str):
    """The private network's document, or the public mesh's (only while joined): never the same store."""
    if network == "private":
        return runtime.memory
    store = runtime.public.memory if runtime.public is not None else None
    if store is None:
        raise error(409, "not_joined", "the public memory exists only on the public mesh: run `pinkybrain mesh join`")
    return store


@router.get("/api/memory", summary="List memory keys", responses=errors(400, 409))
async def memory_list(runtime: RuntimeDep, prefix: str = "", network: Network = "private"):
    keys = await asyncio.to_thread(memory_call, memory_store(runtime, network).list, prefix)
    return {"keys": keys, "count": len(keys), "prefix": prefix, "network": network}


@router.get("/api/memory/{key:path}", summary="Read a CRDT memory value", responses=errors(400, 404, 409))
async def memory_get(runtime: RuntimeDep, key: str, network: Network = "private"):
    value = await asyncio.to_thread(memory_call, memory_store(runtime, network).get, key)
    return {"key": key, "value": value, "network": network}


@router.post("/api/memory/set", summary="Write a CRDT memory value", responses=errors(400, 409))
async def memory_set(runtime: RuntimeDep, body: MemorySetRequest):
    await memory_write(committer_for(memory_store(runtime, body.network)).set(body.key, body.value), body.key)
    return {"key": body.key, "stored": True, "network": body.network}


@router.delete("/api/memory/{key:path}", summary="Delete a CRDT memory key", responses=errors(400, 404, 409))
async def memory_delete(runtime: RuntimeDep, key: str, network: Network = "private"):
    await memory_write(committer_for(memory_store(runtime, network)).delete(key), key)
    return {"key": key, "deleted": True, "network": network}


# -- models -------------------------------------------------------------------------------------
@router.get("/api/models", summary="List available models")
async def models(runtime: RuntimeDep, principal: PrincipalDep):
    items = await asyncio.to_thread(runtime.models.list)
    if principal is not Principal.OWNER:  # a cloud model the owner has not shared is not a member's business
        items = [m for m in items if m.get("kind") != "cloud" or m.get("shared")]
    return {
        "models": items,
        "count": len(items),
        "shared_models_dir": str(runtime.cfg.path("sharing.shared_models_dir")),
        "problems": runtime.models.problems,
    }


def model_call(fn, name):
    try:
        return fn(name)
    except ModelPathError as exc:
        raise error(400, "refused_path", str(exc)) from None
    except ModelNotFound as exc:
        raise error(404, "not_found", str(exc)) from None
    except CloudShareRefused:
        raise  # an OSError too (PermissionError): the share route answers it with 403 and the cost warning
    except OSError as exc:  # a name the filesystem cannot hold (too long, NUL): the caller's input
        raise error(400, "bad_name", f"cannot use model name {name[:80]!r}: {exc.strerror or exc}") from None


@router.post("/api/models/{name}/share", summary="Share a model to the mesh", responses=errors(400, 403, 404))
async def model_share(runtime: RuntimeDep, name: str, force: bool = False):
    try:
        entry = await asyncio.to_thread(model_call, lambda n: runtime.models.share(n, force=force), name)
    except CloudShareRefused as exc:
        raise error(403, "cloud_model_refused", str(exc)) from None
    return {"shared": True, "entry": entry, **({"cost_warning": entry["cost_warning"]} if "cost_warning" in entry else {})}


@router.post("/api/models/{name}/unshare", summary="Stop sharing a model", responses=errors(400, 404))
async def model_unshare(runtime: RuntimeDep, name: str):
    entry = await asyncio.to_thread(model_call, runtime.models.unshare, name)
    return {"shared": False, "name": entry["name"]}


# -- conversations ------------------------------------------------------------------------------
def conversation_call(fn, *args):
    try:
        return fn(*args)
    except KeyError as exc:
        raise error(404, "not_found", str(exc.args[0]) if exc.args else "no such conversation") from None
    except ValueError as exc:
        raise error(400, "invalid_request", str(exc)) from None


# Privacy levels (core.principals.visible_privacy): the owner sees every conversation, a mesh member
# peers-only and public ones, a public peer public ones. Read at each request: a change applies at once.
@router.get("/api/conversations", summary="List conversations", responses=errors(400))
async def conversations_list(
    runtime: RuntimeDep, principal: PrincipalDep,
    limit: int = Query(50, ge=1, le=1000), offset: int = Query(0, ge=0, le=1_000_000_000),
):
    items = await asyncio.to_thread(conversation_call, lambda: runtime.conversations.list_sessions(
        limit, offset, privacy=None if principal is Principal.OWNER else visible_privacy(principal)))
    return {"conversations": items, "count": len(items)}


@router.post("/api/conversations/search", summary="Search conversation history", responses=errors(400))
async def conversations_search(
    runtime: RuntimeDep, principal: PrincipalDep,
    q: str = Query(min_length=1, max_length=1000), limit: int = Query(20, ge=1, le=200),
):
    hits = await asyncio.to_thread(conversation_call, lambda: runtime.conversations.search(
        q, limit, privacy=None if principal is Principal.OWNER else visible_privacy(principal)))
    return {"query": q, "results": hits, "count": len(hits)}


def require_visible(runtime: NodeRuntime, principal: Principal, session_id: str) -> None:
    """403 with one line when a conversation's privacy level hides it from this principal."""
    if principal is Principal.OWNER:
        return
    level = conversation_call(runtime.conversations.get_session, session_id)["privacy"]
    if level not in visible_privacy(principal):
        raise error(403, "forbidden", f"conversation {session_id} is {level}: only this node's owner "
                                      f"{'and mesh members ' if level == 'peers-only' else ''}may read it")


@router.post(
    "/api/conversations/{session_id}/export",
    summary="Export a conversation",
    responses={
        200: {"content": {"application/json": {}, "text/markdown": {"schema": {"type": "string"}}},
              "description": "The conversation as JSON or Markdown"},
        **errors(400, 404),
    },
)
async def conversations_export(
    runtime: RuntimeDep, principal: PrincipalDep, session_id: str, format: Literal["json", "markdown"] = "json"
):
    def export() -> str:
        require_visible(runtime, principal, session_id)  # in the same thread call as the export it guards
        return conversation_call(runtime.conversations.export, session_id, format)

    text = await asyncio.to_thread(export)
    media = "application/json" if format == "json" else "text/markdown; charset=utf-8"
    return PlainTextResponse(text, media_type=media)


@router.post(
    "/api/conversations/{session_id}/privacy", summary="Set a conversation's privacy level", responses=errors(400, 404)
)
async def conversations_privacy(runtime: RuntimeDep, session_id: str, body: PrivacyRequest):
    await asyncio.to_thread(conversation_call, runtime.conversations.set_privacy, session_id, body.privacy)
    return {"session_id": session_id, "privacy": body.privacy}


def create_app(runtime: NodeRuntime, *, manage_lifecycle: bool = True, layers: bool = True) -> FastAPI:
    """The node's API. `layers`: with the node's own ASGI layers outermost (node/api/front.py); the server
    runs them in its front instead, and builds this app without them on first use."""
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_lifecycle:
            await runtime.start()
        try:
            yield
        finally:
            if manage_lifecycle:
                await runtime.stop()

    # The node's own ASGI layers run first, outside FastAPI's stack: auth, then the skill link's proof and
    # sealing, then the hot routes; everything else goes on to FastAPI.
    app = _new_app(lifespan, outer_layers=node_layers(runtime) if layers else (),
                   dashboard=runtime.cfg["dashboard.enabled"])
    app.state.runtime = runtime
    app.state.dashboard_enabled = runtime.cfg["dashboard.enabled"]
    recent_events()  # the events panel's memory of operational lines (a bounded deque)
    from pinkybrain.node.api.p2p import router as p2p_router

    app.include_router(p2p_router)  # peer links (WebSocket /p2p): not part of the signed HTTP API
    return app


# The node exports no OpenTelemetry data; FastAPI would otherwise ask the tracer and meter providers on
# every request whether to trace it (a few % of a signed ping). Older FastAPI has no such option.
_NO_TELEMETRY = ({"telemetry": {"tracing": False, "metrics": False, "logs": False}}
                 if "telemetry" in inspect.signature(FastAPI.__init__).parameters else {})


class NodeAPI(FastAPI):
    """FastAPI with the node's own ASGI layers outermost (first in `outer_layers` runs first): they run on
    every request before FastAPI's exception, body-limit and telemetry middlewares and its router."""

    def __init__(self, *args, outer_layers=(), **kwargs):
        self.outer_layers = tuple(outer_layers)
        super().__init__(*args, **kwargs)

    def build_middleware_stack(self):
        app = super().build_middleware_stack()
        for layer in reversed(self.outer_layers):
            app = layer(app)
        return app


def _new_app(lifespan=None, outer_layers=(), dashboard: bool = True) -> FastAPI:
    app = NodeAPI(
        outer_layers=outer_layers,
        **_NO_TELEMETRY,
        title="PinkyBrain node API",
        version=__version__,
        description=(
            "Every request carries an HMAC-SHA256 signature (scheme PB1-HMAC-SHA256) over method, path, raw "
            "query, timestamp, nonce and the body's SHA-256, in X-PinkyBrain-Sig with X-PinkyBrain-Timestamp "
            "(Unix seconds, ±60 s) and X-PinkyBrain-Nonce (single use), keyed by the network secret (a mesh "
            "member) or, with X-PinkyBrain-Credential: owner, by the node's owner key. A public peer valid in "
            "the node's Web of Trust signs with Ed25519 (X-PinkyBrain-Credential: peer, X-PinkyBrain-Peer: its "
            "node id, scheme PB1-ED25519). /v1 also takes a bearer API key the owner issued. Authentication "
            "failures are 401, a route above the caller's principal is 403, both with {error, detail}."
        ),
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url="/api/openapi.json",
        default_response_class=FastJSONResponse,
    )
    app.include_router(router, responses=COMMON_ERRORS)
    app.include_router(query_router, responses=COMMON_ERRORS)
    app.include_router(trust_router, responses=COMMON_ERRORS)
    app.include_router(keys_router, responses=COMMON_ERRORS)
    app.include_router(dashboard_api_router, responses=COMMON_ERRORS)
    if dashboard:  # the pages; off, /dashboard/... answers 404
        app.include_router(dashboard_router)
    app.include_router(openai_router, responses=OPENAI_ERRORS)  # last: its /v1 catch-all answers unknown paths

    # Starlette's class: FastAPI's own 400s (unparseable body), 404s and 405s get the same error shape.
    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException):
        body = (
            exc.detail if isinstance(exc.detail, dict) else {"error": "http_error", "detail": str(exc.detail)}
        )
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError):
        problems = [f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in exc.errors()]
        return JSONResponse({"error": "invalid_request", "detail": "; ".join(problems)}, status_code=422)

    return app


def describe_api() -> dict:
    """The OpenAPI description, without a running node (for docs/openapi.json)."""
    return _new_app().openapi()
