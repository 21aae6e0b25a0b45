"""The two hot routes, `GET /api/ping` and `GET /api/status`, answered straight from ASGI.

Every skill call starts with a ping (discovery), and dashboards and monitors poll status, so these two
answers are on the hot path. Profiles (bench/README.md) showed FastAPI's layers around them (its
exception and telemetry middlewares, routing, dependency solving, the response encoder) costing three
times the answer itself. `HotRoutes` sits inside the auth and skill-link middlewares, so a hot route is
authenticated, checked against the principal table and given its proof exactly as before; only the
FastAPI machinery after that is skipped. The FastAPI routes stay (OpenAPI, and any app built without
these layers) and answer with the same functions, so both paths say the same thing.

The answer is built from values the node keeps up to date in memory (no disk or SQLite read). Under
load (many monitors polling, a dashboard per user) the status answer is built at most once per
`STATUS_SNAPSHOT_SECS` and the same bytes go to every caller in that window: building it touches every
service and is most of a status call's cost. Any request that may change state (every method but GET
and HEAD) drops the snapshot when it starts, as each part of its answer is sent and when it ends, so a
caller never reads the past of its own change; what changes inside the node by itself (a peer's link, the resource guard) shows at most that much late,
well within one network round trip of a remote caller."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from pinkybrain.node.api.responses import dumps

if TYPE_CHECKING:
    from pinkybrain.node.services.runtime import NodeRuntime


def ping_answer(runtime: NodeRuntime) -> dict:
    return {"pong": True, "node_id": runtime.identity.node_id, "name": runtime.cfg.node_name,
            "version": runtime.version}


class _ConfigFacts:
    """What status shows of the configuration, worked out once per configuration (a reload makes a new one)."""

    __slots__ = ("cfg", "shared_models_dir", "sharing_enabled", "cloud_models", "earn_per_query")

    def __init__(self, cfg):
        self.cfg = cfg
        self.shared_models_dir = str(cfg.path("sharing.shared_models_dir"))
        self.sharing_enabled = cfg["sharing.enabled"]
        self.cloud_models = cfg["sharing.cloud_models"]
        self.earn_per_query = cfg["credit.earn_per_query"]


_facts: list[_ConfigFacts] = []


def _config_facts(cfg) -> _ConfigFacts:
    if not _facts or _facts[0].cfg is not cfg:
        _facts[:] = [_ConfigFacts(cfg)]
    return _facts[0]


def status_answer(runtime: NodeRuntime) -> dict:
    facts = _config_facts(runtime.cfg)
    return {
        "node_id": runtime.identity.node_id,
        "name": runtime.cfg.node_name,
        "version": runtime.version,
        "uptime_secs": runtime.uptime(),
        "started_at": runtime.started_at,
        "listen": f"{runtime.bind_host}:{runtime.port}",
        "start_mode": runtime.start_mode,
        "mesh": runtime.mesh_state(),
        "resource_guard": runtime.guard_state(),
        "sharing": {
            "enabled": facts.sharing_enabled,
            "active": runtime.sharing_active,
            "models_shared": runtime.models.shared_count(),
            "shared_models_dir": facts.shared_models_dir,
            "cloud_models": facts.cloud_models,
            "withdrawn": runtime.models.problems[-10:],  # shares whose file changed or went away
        },
        "credit": {**runtime.ledger.summary(), "earn_per_query": facts.earn_per_query},
        "memory": {"commits": runtime.memory.commits if runtime.memory is not None else 0},
    }


STATUS_SNAPSHOT_SECS = 0.05
PING_SNAPSHOT_SECS = 1.0  # an unnamed node is called by its host name, which may change (macOS renames on DHCP)
_READS = frozenset(("GET", "HEAD"))
Answer = tuple[list[tuple[bytes, bytes]], bytes]  # the answer's headers and its body


def json_answer(body: bytes) -> Answer:
    """The headers a JSON body goes with, and the body."""
    return [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())], body


class HotRoutes:
    """ASGI: answers GET on the hot routes itself, passes everything else to `app` (FastAPI)."""

    def __init__(self, app, runtime: NodeRuntime, snapshot_secs: float = STATUS_SNAPSHOT_SECS):
        self.app = app
        self.runtime = runtime
        self.snapshot_secs = snapshot_secs
        self._status: Answer | None = None
        self._status_until = 0.0
        self._ping: Answer | None = None
        self._ping_cfg = None  # the configuration _ping was built from (a reload may rename the node)
        self._ping_until = 0.0
        self._answers = {"/api/ping": self._ping_answer, "/api/status": self._status_answer}  # GET path -> answer

    def direct_answer(self, scope) -> Answer | None:
        """The answer to an HTTP request if it is one of ours (a GET of a hot route), else None. A layer
        around this one may send it itself, adding its own headers, rather than call through ASGI."""
        if scope["method"] == "GET":
            answer = self._answers.get(scope["path"])
            if answer is not None:
                return answer()
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        if method == "GET":
            answer = self._answers.get(scope["path"])
            if answer is not None:
                headers, body = answer()
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        elif method not in _READS:
            async def send_fresh(message) -> None:
                # Dropped as each part of the answer leaves: a snapshot built while the request ran (before
                # its change) is gone before its caller can ask again.
                self._status = None
                await send(message)

            self._status = None
            try:
                await self.app(scope, receive, send_fresh)
            finally:
                self._status = None
            return
        await self.app(scope, receive, send)

    def _ping_answer(self) -> Answer:
        # Node id, name and version: the same bytes for every ping until the configuration is reloaded, or
        # at most PING_SNAPSHOT_SECS (the host name).
        cfg, now = self.runtime.cfg, time.monotonic()
        if self._ping is None or self._ping_cfg is not cfg or now >= self._ping_until:
            self._ping, self._ping_cfg = json_answer(dumps(ping_answer(self.runtime))), cfg
            self._ping_until = now + PING_SNAPSHOT_SECS
        return self._ping

    def _status_answer(self) -> Answer:
        now = time.monotonic()
        if self._status is None or now >= self._status_until:
            self._status = json_answer(dumps(status_answer(self.runtime)))
            self._status_until = now + self.snapshot_secs
        return self._status
