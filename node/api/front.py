"""The node's ASGI front: the layers every request passes, answering before FastAPI is even loaded.

Importing FastAPI, pydantic and the route modules is most of a node's start (about 1.4 s and 35 MiB on
the 2-core development VM; bench/README.md, cold start). The front holds what every request goes
through anyway (auth, the skill link's proof and sealing, the hot routes ping and status) and builds the
FastAPI app the first time a request needs it (any other route, or a peer's WebSocket), once, in a
worker thread so the event loop keeps answering meanwhile. A node thus answers its first pings
(discovery, readiness checks) without loading what an idle node may never need; the first other request
waits for the build once.

The server binds its port once the runtime's front part has started (owner key, API keys) and opens the
stores and starts the mesh after that (NodeRuntime.start_services). `StartGate` lets a ping through at
once (fully authenticated as ever: it needs only the secret or the owner key, and the node's identity);
every other request, and a ping signed by a public peer (whose standing is in the trust store), waits
until the services have started, or gets a 503 saying the node is starting (or failed to: the reason
goes to the node's log and its exit message, never to a caller not yet authenticated).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

from pinkybrain.node.api.auth import Authenticator, SignedRequestMiddleware
from pinkybrain.node.api.hot_routes import HotRoutes
from pinkybrain.node.api.hot_writes import HotMemoryWrites
from pinkybrain.node.api.sealing import SkillLinkMiddleware
from pinkybrain.node.core.auth import CREDENTIAL_HEADER, NonceCache, RequestVerifier
from pinkybrain.node.core.skill_link import SkillLink

log = logging.getLogger("pinkybrain.node")
STARTING_WAIT_SECS = 30.0  # how long a request waits for the services before a 503 "starting"
_CREDENTIAL = CREDENTIAL_HEADER.encode()


def authenticator_for(runtime):
    """Built at the first request: the owner key and the stores exist once the runtime has started."""
    built: list[Authenticator] = []

    def factory() -> Authenticator:
        if not built:
            owner = runtime.owner_key
            verifier = RequestVerifier(
                secret=runtime.cfg["p2p.secret"], nonces=NonceCache(), owner_key=owner.key if owner else "",
                peer_valid=lambda node_id: runtime.trust is not None and runtime.trust.is_valid(node_id).valid,
            )
            built.append(Authenticator(verifier, runtime.api_keys))
        return built[0]

    return factory


def node_layers(runtime) -> tuple[Callable, ...]:
    """The node's own ASGI layers, outermost first, each a function of the app it wraps: auth, then the
    skill link's proof and sealing, then the hot routes, then the hot memory write."""
    return (
        lambda inner: SignedRequestMiddleware(inner, authenticator_factory=authenticator_for(runtime)),
        lambda inner: SkillLinkMiddleware(inner, link=SkillLink(runtime.identity)),
        lambda inner: HotRoutes(inner, runtime),
        lambda inner: HotMemoryWrites(inner, runtime),
    )


class LazyApp:
    """ASGI: builds the app with `build()` on the first request that reaches it, then hands every request
    to it. Lifespan events it answers itself (the node's runtime is started and stopped by the server)."""

    def __init__(self, build: Callable):
        self._build = build
        self.app = None
        self._building: asyncio.Future | None = None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        app = self.app or await self._ready()
        await app(scope, receive, send)

    async def _ready(self):
        if self._building is None:
            self._building = asyncio.ensure_future(asyncio.to_thread(self._build))
        app = await asyncio.shield(self._building)
        if self.app is None:
            self.app = app
            log.debug("API app built on first use")
        return app


def _needs_only_the_front(scope) -> bool:
    """A ping signed with the secret or the owner key: answerable before the stores are open."""
    if scope["type"] != "http" or scope["method"] != "GET" or scope["path"] != "/api/ping":
        return False
    credential = b""
    for name, value in scope["headers"]:
        if name.lower() == _CREDENTIAL:
            credential = value  # the last one, as the auth layer reads them
    return credential.strip().lower() != b"peer"


class StartGate:
    """ASGI, outermost: holds every request but a ping until the runtime's services have started."""

    def __init__(self, app, runtime, wait_secs: float | None = None):
        self.app = app
        self.runtime = runtime
        self.wait_secs = STARTING_WAIT_SECS if wait_secs is None else wait_secs

    async def __call__(self, scope, receive, send):
        if self.runtime.services_started or scope["type"] == "lifespan" or _needs_only_the_front(scope):
            await self.app(scope, receive, send)
            return
        try:
            await asyncio.wait_for(self.runtime.wait_started(), self.wait_secs)
        except TimeoutError:
            await _unavailable(scope, send, "starting", "the node is still starting; retry in a few seconds")
            return
        except Exception:  # noqa: BLE001 - the server prints why and stops
            # Not why: this answer comes before authentication, and the reason names files on this machine.
            await _unavailable(scope, send, "start_failed",
                               "the node could not start and is stopping; its log says why")
            return
        await self.app(scope, receive, send)


async def _unavailable(scope, send, code: str, detail: str) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1013})  # "try again later"
        return
    body = json.dumps({"error": code, "detail": detail}).encode()
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"retry-after", b"2")]})
    await send({"type": "http.response.body", "body": body})


class NodeFront:
    """The app the server runs: a StartGate and `node_layers` around a LazyApp of the full API."""

    def __init__(self, runtime, build: Callable):
        self.runtime = runtime
        self.lazy = LazyApp(build)
        app = self.lazy
        for layer in reversed(node_layers(runtime)):
            app = layer(app)
        self._layers = app
        self._gate = StartGate(app, runtime)
        # Set once the services have started: the gate has nothing left to hold (a server starts them once).
        self._open = False

    async def __call__(self, scope, receive, send):
        if self.lazy.app is not None and scope["type"] != "lifespan":
            scope["app"] = self.lazy.app  # what the auth layer's dashboard-cookie check reads
        if not self._open:
            self._open = self.runtime.services_started
            if not self._open:
                await self._gate(scope, receive, send)
                return
        await self._layers(scope, receive, send)


async def _lifespan(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
