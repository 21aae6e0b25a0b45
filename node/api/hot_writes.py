"""`POST /api/memory/set` on the private memory, answered straight from ASGI like the hot reads.

An agent's memory writes come in bursts, and each is durable before it is answered (group commit,
services/memory_writes.py). Profiled under 16 concurrent writers (bench/memory_writes.py), FastAPI's
layers around the write (routing over every route, dependency solving, body validation, its exception
and telemetry middlewares) were half of the node's CPU per write, and the node's one core, not the disk,
set the rate.

This layer sits inside the auth, skill-link and hot-route layers, so a write here is authenticated,
checked against the principal table, unsealed, given its proof and drops the status snapshot exactly as
before. It takes only the plain case: a JSON object with a string `key`, a `value` and no `network` but
the private one. Anything else (another network, a body that is not such an object, JSON the fast parser
refuses) goes on to the FastAPI route with the body replayed, so every refusal of a malformed request
keeps the one answer FastAPI gives. A value or key the store refuses gets the same status and body as
from the FastAPI route (`memory_refusal`, shared by both).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from pinkybrain.node.api.auth import read_body, replay_body
from pinkybrain.node.api.hot_routes import json_answer
from pinkybrain.node.api.responses import dumps

if TYPE_CHECKING:
    from pinkybrain.node.services.runtime import NodeRuntime

PATH = "/api/memory/set"
_FIELDS = frozenset(("key", "value", "network"))


def memory_refusal(exc: Exception, key: str | None) -> tuple[int, dict] | None:
    """(status, error body) for a refused memory read or write, or None for an unexpected failure."""
    from pinkybrain.node.core.memory_doc import MemoryLimitError
    from pinkybrain.node.core.memory_values import MemoryValueError

    if isinstance(exc, MemoryLimitError):
        return 413, {"error": "too_large", "detail": str(exc)}
    if isinstance(exc, MemoryValueError):  # not storable JSON (or, read back, a value an older version let in)
        return 400, {"error": "bad_value", "detail": str(exc)}
    if isinstance(exc, KeyError):
        return 404, {"error": "not_found", "detail": f"no memory key {key!r}" if key is not None else str(exc)}
    if isinstance(exc, ValueError):
        return 400, {"error": "bad_key", "detail": str(exc)}
    return None


def plain_private_write(headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[str, Any] | None:
    """(key, value) of a JSON body that MemorySetRequest reads as a write to the private memory; None for
    anything the FastAPI route should answer itself."""
    if not any(name == b"content-type" and value.split(b";")[0].strip().lower() == b"application/json"
               for name, value in headers):
        return None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or "value" not in data or not isinstance(data.get("key"), str):
        return None
    if data.get("network", "private") != "private" or not _FIELDS.issuperset(data):
        return None
    return data["key"], data["value"]


class HotMemoryWrites:
    """ASGI: answers the plain private `POST /api/memory/set` itself, passes everything else to `app`."""

    def __init__(self, app, runtime: NodeRuntime):
        self.app = app
        self.runtime = runtime

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != PATH or scope["query_string"]:
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)  # the auth layer read it already and bounded it: this is the replay
        if body is None:
            return  # the client went away
        write = plain_private_write(scope["headers"], body)
        store = self.runtime.memory
        if write is None or store is None:
            await self.app(scope, replay_body(body, receive), send)
            return
        from pinkybrain.node.services.memory_writes import committer_for

        key, value = write
        try:
            await committer_for(store).set(key, value)
        except Exception as exc:
            refused = memory_refusal(exc, key)
            if refused is None:
                raise
            status, answer = refused
        else:
            status, answer = 200, {"key": key, "stored": True, "network": "private"}
        headers, payload = json_answer(dumps(answer))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
