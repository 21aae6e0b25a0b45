"""The dashboard's HTTP side: the login exchange, the page and its assets, and a live event stream.

The page calls the node's ordinary API (/api/...) with its session cookie and CSRF header, so what the
dashboard changes goes through the same routes and checks as the CLI (see `cookie_principal`). Dashboard
routes answer only loopback clients unless `dashboard.allow_remote` is set.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from importlib import resources
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse

from pinkybrain.node.dashboard.events import recent_events
from pinkybrain.node.dashboard.sessions import (
    COOKIE,
    DashboardSessions,
    LoginRefused,
    cookie_principal,
)

LIVE_INTERVAL_SECS = 2.0
# Assets the page may load: a fixed list, so no path from a request ever reaches the filesystem.
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "panels.js": "text/javascript; charset=utf-8",
    "graph.js": "text/javascript; charset=utf-8",
    "i18n.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "i18n/en.json": "application/json",
    "icon.svg": "image/svg+xml",
}
SECURITY_HEADERS = {
    # Nothing from elsewhere: every script, style and request stays on this node.
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",  # the login token in the URL never leaves in a Referer
    "cache-control": "no-store",
    "x-frame-options": "DENY",
}

router = APIRouter(include_in_schema=False)
api_router = APIRouter()


def sessions(request_or_app) -> DashboardSessions:
    app = getattr(request_or_app, "app", request_or_app)
    if not hasattr(app.state, "dashboard_sessions"):
        app.state.dashboard_sessions = DashboardSessions()
    return app.state.dashboard_sessions


def is_loopback(host: str | None) -> bool:
    try:
        return ipaddress.ip_address((host or "").split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def remote_allowed(request: Request) -> bool:
    runtime = getattr(request.app.state, "runtime", None)
    allow = bool(runtime and runtime.cfg["dashboard.allow_remote"])
    return allow or is_loopback(request.client.host if request.client else None)


def _page(status: int, title: str, text: str) -> HTMLResponse:
    body = (f"<!doctype html><html lang=en><meta charset=utf-8><meta name=viewport "
            f"content='width=device-width, initial-scale=1'><title>{title}</title>"
            f"<link rel=stylesheet href='/dashboard/static/style.css'><main class=notice><h1>{title}</h1>"
            f"<p>{text}</p></main></html>")
    return HTMLResponse(body, status_code=status, headers=SECURITY_HEADERS)


# -- owner API: a login link -------------------------------------------------------------------------
@api_router.post("/api/dashboard/login", summary="A one-time dashboard login link (owner only)")
async def login_link(request: Request):
    if not getattr(request.app.state, "dashboard_enabled", True):
        raise HTTPException(404, {"error": "dashboard_disabled", "detail": "the dashboard is turned off on this "
                                  "node (dashboard.enabled: false in its configuration)"})
    token = sessions(request).issue_login(time.time())
    return {"path": f"/dashboard/login?token={token}", "expires_in_secs": sessions(request).login_ttl}


@api_router.get("/api/events", summary="Recent operational events (owner only)")
async def events(after: Annotated[int, Query(ge=0, le=2**53)] = 0,
                 limit: Annotated[int, Query(ge=1, le=500)] = 200):
    items = recent_events().since(after, limit)
    return {"events": items, "count": len(items)}


# -- the page ----------------------------------------------------------------------------------------
@router.get("/dashboard/login")
async def login(request: Request, token: str = ""):
    if not remote_allowed(request):
        return _page(403, "Dashboard refused", "The dashboard answers only on this machine "
                                               "(set dashboard.allow_remote to change that).")
    try:
        session_id, _ = sessions(request).exchange(token, time.time())
    except LoginRefused as exc:
        return _page(403, "Login link refused", str(exc))
    response = RedirectResponse("/dashboard/", status_code=303, headers=SECURITY_HEADERS)
    response.set_cookie(COOKIE, session_id, httponly=True, samesite="strict", path="/",
                        secure=request.url.scheme == "https", max_age=int(sessions(request).idle_secs))
    return response


@router.post("/dashboard/logout")
async def logout(request: Request):
    headers = {k.lower(): v for k, v in request.headers.items()}
    if cookie_principal(request.app, headers):
        sessions(request).end(request.cookies.get(COOKIE))
    response = JSONResponse({"logged_out": True}, headers=SECURITY_HEADERS)
    response.delete_cookie(COOKIE, path="/")
    return response


@router.get("/dashboard")
async def dashboard_root():
    return RedirectResponse("/dashboard/", status_code=308)


@router.get("/dashboard/")
async def page(request: Request):
    if not remote_allowed(request):
        return _page(403, "Dashboard refused", "The dashboard answers only on this machine.")
    session = sessions(request).session(request.cookies.get(COOKIE), time.time())
    if session is None:
        return _page(401, "Log in first", "Run <code>pinkybrain dashboard</code> on the node's machine: it "
                                          "opens a one-time login link.")
    html = resources.files(__package__).joinpath("static/index.html").read_text("utf-8")
    return HTMLResponse(html.replace("{{CSRF}}", session.csrf), headers=SECURITY_HEADERS)


@router.get("/dashboard/static/{name:path}")
async def asset(name: str):
    media = ASSETS.get(name)
    if media is None:
        return Response("not found", status_code=404, media_type="text/plain")
    data = resources.files(__package__).joinpath("static", *name.split("/")).read_bytes()
    return Response(data, media_type=media, headers={**SECURITY_HEADERS, "cache-control": "no-cache"})


@router.get("/dashboard/live")
async def live(request: Request):
    """Server-sent events while a page is open: status and peers every few seconds, new log events.
    Nothing runs when no page is open."""
    if not remote_allowed(request) or sessions(request).session(request.cookies.get(COOKIE), time.time()) is None:
        return JSONResponse({"error": "unauthorized", "detail": "no dashboard session"}, status_code=401)
    runtime = request.app.state.runtime
    from pinkybrain.node.dashboard.snapshot import live_snapshot

    async def stream():
        seq = 0
        while not await request.is_disconnected():
            if sessions(request).session(request.cookies.get(COOKIE), time.time()) is None:
                yield _sse("logout", {})
                return
            snap = live_snapshot(runtime)
            fresh = recent_events().since(seq)
            if fresh:
                seq = fresh[-1]["seq"]
            snap["events"] = fresh
            yield _sse("snapshot", snap)
            await asyncio.sleep(LIVE_INTERVAL_SECS)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={**SECURITY_HEADERS, "x-accel-buffering": "no"})


def _sse(event: str, data) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n".encode()
