"""ASGI middleware: every HTTP request must carry a valid PB1 HMAC signature.

Pure ASGI (not BaseHTTPMiddleware) so the body is read once, verified, and replayed to the app.
"""

from __future__ import annotations

import json
import logging

from pinkybrain.node.core.auth import NONCE_HEADER, SIG_HEADER, AuthError, RequestVerifier, bearer_ok
from pinkybrain.node.core.principals import SCOPE_KEY, AuthContext, Principal

log = logging.getLogger("pinkybrain.auth")
MAX_BODY_BYTES = 4 * 1024 * 1024


async def _send_json(send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b'PB1-HMAC-SHA256 realm="pinkybrain"'),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class SignedRequestMiddleware:
    def __init__(self, app, verifier_factory):
        self.app = app
        # A factory, so a secret change (restart) or test can swap the verifier without rebuilding the app.
        self.verifier_factory = verifier_factory

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            await _send_json(
                send, 413, {"error": "body_too_large", "detail": f"request body over {MAX_BODY_BYTES} bytes"}
            )
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                await _send_json(
                    send,
                    413,
                    {"error": "body_too_large", "detail": f"request body over {MAX_BODY_BYTES} bytes"},
                )
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        verifier: RequestVerifier = self.verifier_factory()
        if scope["path"].startswith("/v1/") and SIG_HEADER not in headers:
            # OpenAI clients cannot sign: the /v1 endpoints also take a bearer key derived from the secret.
            if bearer_ok(verifier.secret, headers.get("authorization")):
                scope = {**scope, SCOPE_KEY: AuthContext(Principal.MEMBER, b"", None)}
                await self.app(scope, _replay(body, receive), send)
                return
            await _send_json(send, 401, {"error": {"message": "invalid or missing API key (pinkybrain openai-key "
                                                              "prints it)", "type": "invalid_request_error",
                                                   "code": "invalid_api_key"}})
            return
        try:
            verifier.verify(
                scope["method"],
                scope["path"],
                scope.get("query_string", b"").decode("latin-1"),
                headers,
                body,
            )
        except AuthError as exc:
            client = scope.get("client") or ("?", 0)
            # Operational line only: who and why, never the request content.
            log.warning("refused %s %s from %s: %s", scope["method"], scope["path"], client[0], exc.code)
            status = 503 if exc.code == "busy" else 401
            await _send_json(send, status, {"error": exc.code, "detail": exc.message})
            return
        scope = {**scope, SCOPE_KEY: AuthContext(Principal.MEMBER, verifier.secret.encode(), headers[NONCE_HEADER])}
        await self.app(scope, _replay(body, receive), send)


def _replay(body: bytes, receive):
    """A receive() that hands the app the body we already read, then defers to the real one."""
    replayed = False

    async def replay_receive():
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay_receive
