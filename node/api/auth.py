"""ASGI middleware: authenticate every HTTP request, enforce the route -> principal table, and only
then read the body.

Order, so a stranger costs the node almost nothing: (1) the signature headers' presence, shape and
timestamp (or, on /v1 only, a bearer API key) and the route's principal, (2) the declared
Content-Length against the route's body limit, (3) the body, read up to that limit (chunked bodies
too), (4) the signature over it and the nonce. The result is stored as scope["pinkybrain.auth"]
(core.principals.AuthContext) for the routes' object-level rules and the response-proof layer.
Pure ASGI (not BaseHTTPMiddleware) so the body is read once, verified, and replayed to the app.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pinkybrain.node.core.auth import (
    CREDENTIAL_HEADER,
    NONCE_HEADER,
    PEER_HEADER,
    SIG_HEADER,
    TS_HEADER,
    AuthError,
    RequestVerifier,
)
from pinkybrain.node.core.principals import AUTH_SCOPE_KEY, AuthContext, Principal, RouteTable, refusal
from pinkybrain.node.dashboard.sessions import cookie_principal, is_dashboard_page

if TYPE_CHECKING:
    from starlette.requests import Request  # starlette loads with FastAPI, after the first ping

log = logging.getLogger("pinkybrain.auth")
BEARER_PRINCIPAL = {"owner": Principal.OWNER, "query": Principal.MEMBER}
_SIG, _TS, _NONCE, _CREDENTIAL, _PEER = (h.encode() for h in (SIG_HEADER, TS_HEADER, NONCE_HEADER, CREDENTIAL_HEADER,
                                                             PEER_HEADER))


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def _texts(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in raw.items()}


async def _send_json(send, status: int, payload: dict, *, challenge: bool = True) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if challenge:
        headers.append((b"www-authenticate", b'PB1-HMAC-SHA256 realm="pinkybrain"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _openai_error(message: str, code: str) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error", "code": code}}


@dataclass
class Authenticator:
    """What the middleware checks requests against: one per node (a test may swap it)."""

    verifier: RequestVerifier
    api_keys: object | None = None  # services.credentials.ApiKeyStore: lookup(key) -> (name, scope) | None
    table: RouteTable | None = None

    def __post_init__(self) -> None:
        self.table = self.table or RouteTable()

    def bearer(self, authorization: str | None) -> AuthContext | None:
        if self.api_keys is None or not authorization or not authorization[:7].lower() == "bearer ":
            return None
        found = self.api_keys.lookup(authorization[7:].strip())
        if found is None:
            return None
        name, scope = found
        return AuthContext(principal=BEARER_PRINCIPAL[scope], credential=b"", nonce=None, key_name=name)


def principal_of(request: Request) -> Principal:
    """Who the middleware found a request comes from (a route's dependency); the least privilege if it
    did not run."""
    context = request.scope.get(AUTH_SCOPE_KEY)
    return context.principal if context is not None else Principal.PUBLIC


class BodyTooLarge(Exception):
    pass


class SignedRequestMiddleware:
    def __init__(self, app, authenticator_factory):
        self.app = app
        # A factory, so a test can swap the authenticator without rebuilding the app.
        self.authenticator_factory = authenticator_factory

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or is_dashboard_page(scope["path"]):
            # WebSockets authenticate in their handshake; the dashboard's page routes check their cookie.
            await self.app(scope, receive, send)
            return
        auth: Authenticator = self.authenticator_factory()
        method, path = scope["method"], scope["path"]
        rule = auth.table.rule(method, path)
        # Names stay bytes (the server gives them lower-cased, ASGI); the last of a repeated header counts.
        # Only the values a check reads are decoded.
        raw = dict(scope["headers"])
        sig = raw.get(_SIG)
        openai = path.startswith("/v1/")
        claim = context = None
        if openai and sig is None:
            # OpenAI clients cannot sign: /v1 also takes an API key the owner issued (`pinkybrain keys`).
            context = auth.bearer(_text(raw.get(b"authorization")))
            if context is None:
                await _send_json(send, 401, _openai_error(
                    "invalid or missing API key (the owner issues them: `pinkybrain openai-key` or "
                    "`pinkybrain keys create NAME`)", "invalid_api_key"))
                return
            principal = context.principal
        elif sig is None and cookie_principal(scope.get("app"), _texts(raw)):
            # The owner's dashboard page: its session cookie plus the session's CSRF token.
            context = AuthContext(principal=Principal.OWNER, credential=b"", nonce=None, key_name="dashboard")
            principal = Principal.OWNER
        else:
            try:
                claim = auth.verifier.check_values(
                    _text(sig), _text(raw.get(_TS)), _text(raw.get(_NONCE)), _text(raw.get(_CREDENTIAL)),
                    _text(raw.get(_PEER)), now := time.time())
            except AuthError as exc:
                await self._refuse(scope, send, exc)
                return
            principal = claim.principal
        if principal < rule.principal:
            detail = refusal(rule, principal)
            payload = _openai_error(detail, "forbidden") if openai else {"error": "forbidden", "detail": detail}
            await _send_json(send, 403, payload, challenge=False)
            return

        declared = raw.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > rule.body_limit):
            status, detail = (413, f"request body over {rule.body_limit} bytes for {rule.method} {rule.path}") \
                if declared.isdigit() else (400, "Content-Length is not a number")
            await _send_json(send, status, {"error": "body_too_large" if status == 413 else "bad_request",
                                            "detail": detail}, challenge=False)
            return
        if declared in (None, b"0") and b"transfer-encoding" not in raw:
            # HTTP/1.1 framing: no length and no chunking means no body (RFC 9112 §6.3); the app reads
            # the same empty body from the server. Most calls (GETs) skip the read-and-replay.
            body = b""
        else:
            try:
                body = await read_body(receive, rule.body_limit)
            except BodyTooLarge:
                await _send_json(send, 413, {"error": "body_too_large",
                                             "detail": f"request body over {rule.body_limit} bytes for "
                                                       f"{rule.method} {rule.path}"}, challenge=False)
                return
            if body is None:  # the client went away
                return
            receive = replay_body(body, receive)
        if claim is not None:
            try:
                context = auth.verifier.verify_claim(
                    claim, method, path, scope.get("query_string", b"").decode("latin-1"), body, now)
            except AuthError as exc:
                await self._refuse(scope, send, exc)
                return
        scope[AUTH_SCOPE_KEY] = context
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope, send, exc: AuthError) -> None:
        client = scope.get("client") or ("?", 0)
        # Operational line only: who and why, never the request content.
        log.warning("refused %s %s from %s: %s", scope["method"], scope["path"], client[0], exc.code)
        status = 503 if exc.code == "busy" else 401
        await _send_json(send, status, {"error": exc.code, "detail": exc.message})


async def read_body(receive, limit: int | None = None) -> bytes | None:
    """The whole body (None if the client went away), refused as soon as it passes `limit` (a chunked
    body declares no length)."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if limit is not None and size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


def replay_body(body: bytes, receive):
    """A receive() that hands the app the body we already read, then defers to the real one."""
    replayed = False

    async def replay_receive():
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay_receive
