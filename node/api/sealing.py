"""ASGI middleware inside the auth middleware: every answer to a signed request carries the node's proof
(node/core/skill_link.py), and a sealed request is opened here and its answer sealed frame by frame.

It reads what auth established (scope["pinkybrain.auth"]); a request without a nonce (a /v1 bearer
key) gets neither proof nor sealing, since its client has no credential to check a proof with.
"""

from __future__ import annotations

import json
import logging

from pinkybrain.node.api.auth import read_body, replay_body
from pinkybrain.node.core.principals import AUTH_SCOPE_KEY
from pinkybrain.node.core.skill_link import (
    CLIENT_KEY_HEADER,
    SEAL_HEADER,
    SEALED_HEADER,
    SealFault,
    SkillLink,
)

log = logging.getLogger("pinkybrain.sealing")
_SEAL = SEAL_HEADER.encode()
_CLIENT_KEY = CLIENT_KEY_HEADER.encode()


class SkillLinkMiddleware:
    def __init__(self, app, link: SkillLink):
        self.app = app
        self.link = link
        # The hot routes (api/hot_routes.py), when they are the next layer: their answer is sent from here
        # with the proof in its headers, without a send wrapper and another ASGI call per request.
        self._direct = getattr(app, "direct_answer", None)

    async def __call__(self, scope, receive, send):
        auth = scope.get(AUTH_SCOPE_KEY) if scope["type"] == "http" else None
        if auth is None or not auth.nonce:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])  # the last of a repeated header counts, as in the auth layer
        seal_header, client_key = headers.get(_SEAL), headers.get(_CLIENT_KEY)
        proof = self.link.proof_headers(auth.credential, auth.nonce, client_key)
        if seal_header is None:
            answer = self._direct(scope) if self._direct is not None else None
            if answer is None:
                await self.app(scope, receive, _with_headers(send, proof))
                return
            headers, body = answer
            await send({"type": "http.response.start", "status": 200, "headers": [*headers, *proof]})
            await send({"type": "http.response.body", "body": body})
            return
        body = await read_body(receive)  # already bounded by the auth middleware
        if body is None:
            return
        try:
            sealer, query, body = self.link.open_request(seal_header.decode("latin-1"), body)
        except SealFault as exc:
            log.warning("refused a sealed %s %s: %s", scope["method"], scope["path"], exc)
            payload = json.dumps({"error": "bad_seal", "detail": str(exc)}).encode()
            await _with_headers(send, proof)({"type": "http.response.start", "status": 400, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
            await send({"type": "http.response.body", "body": payload})
            return
        scope = {**scope, "query_string": query}
        await self.app(scope, replay_body(body, receive), _sealing(send, proof, sealer))


def _with_headers(send, extra: list[tuple[bytes, bytes]]):
    async def wrapped(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return wrapped


def _sealing(send, extra: list[tuple[bytes, bytes]], sealer):
    async def wrapped(message):
        if message["type"] == "http.response.start":
            # The sealed length differs from the plain one: the answer goes chunked.
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"content-length"]
            message = {**message, "headers": [*headers, *extra, (SEALED_HEADER.encode(), b"1")]}
        elif message["type"] == "http.response.body":
            more = message.get("more_body", False)
            data = message.get("body", b"")
            if data or not more:
                message = {**message, "body": sealer.frame(data, last=not more)}
        await send(message)

    return wrapped
