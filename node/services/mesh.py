"""The private mesh: encrypted peer links over WebSockets (`/p2p` on the node's port), finding and keeping
peers (static, mDNS, Tailscale, peer exchange), and a request/response RPC layer others build on.

    mesh.register_handler("name", handler)              # async def h(ctx, payload) -> result
                                                       # or an async generator: yields chunks
    result = await mesh.request(node_id, "name", payload, timeout=30)
    async with mesh.stream(node_id, "name", payload, timeout=30) as chunks:
        async for chunk in chunks: ...

A mesh may be given a `gate` (the public mesh's PublicGate): it decides, per peer, which RPCs are served,
whether the peer is passed on and listened to in peer exchange, and how many bytes it may send. The
private mesh has none: every peer there holds the network secret.

Payloads are JSON values or bytes. Errors: PeerNotConnected / PeerGone (the link died mid-call: raised
within the heartbeat bound), RpcTimeout, RemoteError (code, message), MessageTooLarge.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from pinkybrain.node.core.admission import PendingSlots, address_bucket
from pinkybrain.node.core.channel import OVERHEAD, RateLimits
from pinkybrain.node.core.handshake import (
    MAX_HANDSHAKE_MESSAGE,
    Handshake,
    HandshakeError,
    HandshakeResult,
    derive_psk,
)
from pinkybrain.node.core.identity import Identity, IdentityError, validate_node_id
from pinkybrain.node.services.peer_link import (
    CLOSE_DUPLICATE,
    CLOSE_FULL,
    CLOSE_GOING_AWAY,
    CLOSE_HANDSHAKE,
    CLOSE_PROTOCOL,
    CLOSE_TRY_LATER,
    Link,
    LinkSettings,
    MeshError,
    MessageTooLarge,
    PeerGone,
    PeerNotConnected,
    RemoteError,
    RpcContext,
    RpcError,
    RpcStream,
    RpcTimeout,
    TransportClosed,
    WebsocketsTransport,
    make_url,
)

__all__ = [
    "DialError",
    "LinkRefused",
    "Mesh",
    "MeshError",
    "MeshSettings",
    "MessageTooLarge",
    "PeerGone",
    "PeerNotConnected",
    "RemoteError",
    "RpcContext",
    "RpcError",
    "RpcTimeout",
    "normalize_peer_url",
]

log = logging.getLogger("pinkybrain.mesh")
_rng = random.SystemRandom()

DEFAULT_PORT = 8080
MAX_TARGETS = 256
MAX_PEX_ENTRIES = 64
DISCOVERED_MAX_FAILURES = 4
FORGET_SECS = 600.0
FLAP_SECS = 10.0
WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")  # noqa: S104 - recognising a wildcard bind, not binding


class DialError(MeshError):
    """An outbound link could not be made (unreachable, not a PinkyBrain node, refused during handshake)."""


class LinkRefused(MeshError):
    """The handshake succeeded but the link was not kept (a duplicate, or over the peer limit)."""

    def __init__(self, message: str, peer_id: str, *, duplicate: bool):
        super().__init__(message)
        self.peer_id, self.duplicate = peer_id, duplicate


def normalize_peer_url(text: str, path: str = "/p2p") -> str:
    """`host`, `host:port`, `http(s)://host:port`, `ws(s)://host:port[/p2p]` -> `ws(s)://host:port/p2p`
    (`path` is the mesh's route: the public mesh listens on /p2p/public)."""
    text = (text or "").strip()
    if not text:
        raise ValueError("empty peer address")
    if "://" not in text:
        text = "ws://" + text
    parts = urlsplit(text)
    scheme = {"http": "ws", "ws": "ws", "https": "wss", "wss": "wss"}.get(parts.scheme.lower())
    if scheme is None:
        raise ValueError(f"peer address {text!r}: scheme must be http, https, ws or wss")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"peer address {text!r} has a bad port") from None
    host = parts.hostname
    if not host:
        raise ValueError(f"peer address {text!r} has no host")
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port or DEFAULT_PORT}{path}"


@dataclass
class MeshSettings:
    heartbeat_secs: float = 10.0
    dead_after_secs: float = 30.0
    max_frame_bytes: int = 1024 * 1024
    rate_frames_per_sec: float = 2000.0
    rate_bytes_per_sec: float = 64 * 1024 * 1024
    max_peers: int = 32
    handshake_timeout: float = 10.0
    # Inbound handshakes in progress: strangers can open them, so the budget is shared out per address
    # and the first Noise message (sent at once by a real peer) has a short deadline.
    max_pending_handshakes: int = 256
    max_pending_per_address: int = 8
    first_message_secs: float = 2.0
    pex_secs: float = 60.0
    discovery_secs: float = 5.0
    tailscale_secs: float = 60.0
    reconnect_base_secs: float = 1.0
    reconnect_max_secs: float = 60.0
    peer_exchange: bool = True  # off: neither tell peers about other peers nor dial what they tell us

    @classmethod
    def from_config(cls, cfg) -> MeshSettings:
        heartbeat = cfg["p2p.heartbeat_secs"]
        return cls(
            peer_exchange=cfg["p2p.peer_exchange"],
            heartbeat_secs=heartbeat,
            # A peer must miss at least two heartbeats before it is called dead.
            dead_after_secs=max(cfg["p2p.dead_after_secs"], 2 * heartbeat),
            max_frame_bytes=cfg["p2p.max_frame_bytes"],
            rate_frames_per_sec=cfg["p2p.rate_limit_frames"],
            rate_bytes_per_sec=cfg["p2p.rate_limit_bytes"],
            max_peers=cfg["p2p.max_peers"],
            max_pending_handshakes=cfg["p2p.max_pending_handshakes"],
            max_pending_per_address=cfg["p2p.max_pending_handshakes_per_address"],
            first_message_secs=cfg["p2p.handshake_first_message_secs"],
        )

    def link_settings(self) -> LinkSettings:
        return LinkSettings(
            heartbeat_secs=self.heartbeat_secs,
            dead_after_secs=self.dead_after_secs,
            max_frame=self.max_frame_bytes,
            rate_limits=RateLimits(
                frames_per_sec=self.rate_frames_per_sec, bytes_per_sec=self.rate_bytes_per_sec
            ),
            status_every_secs=max(5.0, self.heartbeat_secs),
        )


class PeerGate(Protocol):
    """Per-peer admission for a mesh whose peers are not all trusted (see services/public_gate.py)."""

    def trusted(self, peer_id: str) -> bool: ...

    def refuse_request(self, peer_id: str, method: str) -> str | None: ...

    def admit_bytes(self, peer_id: str, size: int) -> bool: ...


@dataclass
class DialTarget:
    url: str
    source: str  # static | pex | mdns | tailscale
    persistent: bool
    node_id: str | None = None
    failures: int = 0
    next_at: float = 0.0
    last_error: str | None = None
    task: asyncio.Task | None = None


_REJECTED_SHOWN = ("auth", "replay", "malformed", "oversize", "rate_limited")


class Mesh:
    def __init__(
        self,
        identity: Identity,
        secret: str,
        *,
        name: str,
        version: str,
        listen_host: str,
        listen_port: int,
        stealth: bool = False,
        settings: MeshSettings | None = None,
        static_peers: Iterable[str] = (),
        status_provider: Callable[[], dict] | None = None,
        discovery_provider: Callable[[], Iterable[dict]] | None = None,
        tailscale: bool = False,
        url_path: str = "/p2p",
        gate: PeerGate | None = None,
    ):
        self.identity = identity
        self.gate = gate
        self.url_path = url_path  # the WebSocket route peers dial; /p2p/public for the public mesh
        self.node_id = identity.node_id
        self._psk = derive_psk(secret)
        self.name, self.version = name, version
        self.listen_host, self.listen_port = listen_host, listen_port
        self.stealth = stealth
        self.settings = settings or MeshSettings()
        self._link_settings = self.settings.link_settings()
        self.status_provider = status_provider
        self.discovery_provider = discovery_provider
        self.tailscale = tailscale
        # Every counter state() shows starts at 0: a missing Counter key costs a Python call per read.
        self.stats: Counter = Counter(dict.fromkeys(("bytes_in", "bytes_out", "frames_in", "frames_out", "links_opened",
                                                     "links_closed", "handshakes_failed"), 0))
        self.rejected: Counter = Counter(dict.fromkeys(_REJECTED_SHOWN, 0))
        self.handshake_failures: Counter = Counter()
        self._links: dict[str, Link] = {}
        self._targets: dict[str, DialTarget] = {}
        self._forgotten: dict[str, float] = {}
        self._self_urls: set[str] = set()
        self._handlers: dict[str, Callable] = {}
        self._tunnel_handlers: dict[str, Callable] = {}
        self._tunnel_framings: dict[str, Callable] = {}
        self._tasks: list[asyncio.Task] = []
        self._link_tasks: set[asyncio.Task] = set()
        self._all_links: set[Link] = set()
        self._pex_task: asyncio.Task | None = None
        self._pending = PendingSlots(self.settings.max_pending_handshakes, self.settings.max_pending_per_address)
        self._started = False
        self._stopping = False
        self._hs_log_budget = _LogBudget()
        self._banned: dict[str, float] = {}  # node id -> monotonic time its ban ends
        self._link_up_hooks: list[Callable[[str], None]] = []
        self._link_down_hooks: list[Callable[[str], None]] = []
        self.static_peers: list[str] = []
        for url in static_peers:
            try:
                self.add_peer(url)
            except ValueError as exc:
                log.warning("ignoring static peer: %s", exc)
        self.register_handler("mesh.echo", _echo)
        self.register_handler("mesh.info", self._info)

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        self._started = True
        self._tasks = [asyncio.create_task(self._dial_loop(), name="mesh-dial")]
        self._tasks.append(asyncio.create_task(self._pex_loop(), name="mesh-pex"))
        if self.discovery_provider is not None or self.tailscale:
            self._tasks.append(asyncio.create_task(self._discovery_loop(), name="mesh-discovery"))
        log.info(
            "mesh up: node %s, %d static peer(s)%s",
            self.node_id[:7],
            len(self.static_peers),
            ", stealth" if self.stealth else "",
        )

    async def stop(self) -> None:
        """Close every link with a goodbye (bounded), then stop dialling."""
        self._stopping = True
        tasks = [*self._tasks, *(t.task for t in self._targets.values() if t.task is not None)]
        if self._pex_task is not None:
            tasks.append(self._pex_task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for link in list(self._all_links):
            link.close("node shutting down", CLOSE_GOING_AWAY)
        pending = [asyncio.ensure_future(link.finished.wait()) for link in self._all_links]
        if pending:
            await asyncio.wait(pending, timeout=self._link_settings.bye_timeout + 3)
            for waiter in pending:
                waiter.cancel()
        for task in list(self._link_tasks):
            task.cancel()
        await asyncio.gather(*self._link_tasks, return_exceptions=True)

    # -- public API --------------------------------------------------------------------------------
    def register_handler(self, name: str, handler: Callable) -> None:
        """`async def handler(ctx: RpcContext, payload) -> result`, or an async generator yielding chunks.
        Raise RpcError(code, message) to answer with an error."""
        if not name or len(name) > 128:
            raise ValueError("handler names are 1-128 characters")
        self._handlers[name] = handler

    def unregister_handler(self, name: str) -> None:
        self._handlers.pop(name, None)

    def register_tunnel(self, kind: str, handler: Callable, *, framing: Callable | None = None) -> None:
        """`async def handler(ctx, payload) -> (reader, writer)`: the local end a peer's tunnel of this kind
        is joined to (services/tunnels.py). Raise RpcError(code, message) to refuse. `framing()`: a new
        tunnels.Framing for each tunnel, the message boundaries of what the local end sends."""
        if not kind or len(kind) > 128:
            raise ValueError("tunnel kinds are 1-128 characters")
        self._tunnel_handlers[kind] = handler
        if framing is not None:
            self._tunnel_framings[kind] = framing

    async def open_tunnel(self, node_id: str, kind: str, payload: Any = None, *, timeout: float = 60.0):
        """A byte stream (services.tunnels.Tunnel) to the peer's handler for `kind`."""
        return await self._link(node_id).open_tunnel(kind, payload, timeout)

    async def request(self, node_id: str, name: str, payload: Any = None, *, timeout: float = 30.0) -> Any:
        """Call `name` on a connected peer; its result (a streaming handler's chunks come back as a list)."""
        return await self._link(node_id).request(name, payload, timeout)

    def stream(
        self, node_id: str, name: str, payload: Any = None, *, timeout: float = 30.0, window: int = 64
    ) -> RpcStream:
        """Chunks from a streaming handler as they come; `timeout` bounds each wait for the next chunk."""
        return RpcStream(self._link(node_id), name, payload, timeout, max(1, min(window, 1024)))

    def connected(self, node_id: str) -> bool:
        link = self._links.get(node_id)
        return link is not None and not link.closing

    def peer_ids(self) -> list[str]:
        return [pid for pid, link in self._links.items() if not link.closing]

    def on_link_up(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call `callback(node_id)` each time a link is kept (also when one replaces a duplicate); returns
        a function that removes it. It runs in the event loop and must not block."""
        return _subscribe(self._link_up_hooks, callback)

    def on_link_down(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call `callback(node_id)` each time a kept link is gone; returns a function that removes it."""
        return _subscribe(self._link_down_hooks, callback)

    def disconnect(self, node_id: str, reason: str, *, ban_secs: float = 0.0) -> bool:
        """Close the link to `node_id` (True if there was one); with `ban_secs`, refuse its links and do not
        dial it for that long."""
        if ban_secs > 0:
            self._banned[node_id] = time.monotonic() + ban_secs
            log.warning("banning node %s for %.0fs: %s", node_id[:7], ban_secs, reason)
        link = self._links.get(node_id)
        if link is None or link.closing:
            return False
        link.close(reason, CLOSE_PROTOCOL)
        return True

    def banned(self, node_id: str) -> bool:
        until = self._banned.get(node_id)
        if until is not None and until <= time.monotonic():
            del self._banned[node_id]
            return False
        return until is not None

    def _notify_link(self, hooks: list[Callable[[str], None]], node_id: str) -> None:
        for callback in list(hooks):
            try:
                callback(node_id)
            except Exception:  # noqa: BLE001 - a subscriber's bug must not break link bookkeeping
                log.exception("link hook %r failed", callback)

    def peer(self, node_id: str) -> dict | None:
        """A connected peer's view, with its full signed model entries."""
        link = self._links.get(node_id)
        if link is None:
            return None
        return {**link.describe(), "models": list(link.status.get("models", []))}

    def add_peer(self, url: str, source: str = "static") -> str:
        """Keep a link to this address (redialled with backoff while it is down); returns its ws URL."""
        normalized = normalize_peer_url(url, self.url_path)
        target = self._targets.get(normalized)
        if target is None:
            self._targets[normalized] = DialTarget(normalized, source, persistent=True)
        else:
            target.persistent, target.source = True, source
        if source == "static" and normalized not in self.static_peers:
            self.static_peers.append(normalized)
        return normalized

    def _link(self, node_id: str) -> Link:
        link = self._links.get(node_id)
        if link is None or link.closing:
            raise PeerNotConnected(f"no link to node {node_id[:7]}")
        return link

    # -- views -------------------------------------------------------------------------------------
    def peers(self) -> list[dict]:
        return [link.describe() for link in self._links.values() if not link.closing]

    def state(self) -> dict:
        up = [link for link in self._links.values() if not link.closing]
        down = [
            t
            for t in self._targets.values()
            if not (t.node_id and t.node_id in self._links) and t.url not in self._self_urls
        ]
        now = time.monotonic()
        return {
            "peers": len(up),
            "links_up": len(up),
            "links_down": len(down),
            "bytes_in": self.stats["bytes_in"],
            "bytes_out": self.stats["bytes_out"],
            "frames_in": self.stats["frames_in"],
            "frames_out": self.stats["frames_out"],
            # what tunnels (split inference's RPC) carried, within the bytes above
            "tunnel_bytes_in": self.stats["tunnel_bytes_in"],
            "tunnel_bytes_out": self.stats["tunnel_bytes_out"],
            "frames_rejected": {
                k: self.rejected[k] for k in _REJECTED_SHOWN
            },
            "links_opened": self.stats["links_opened"],
            "links_closed": self.stats["links_closed"],
            "handshakes_failed": self.stats["handshakes_failed"],
            "handshakes_pending": len(self._pending),
            "handshake_failures": dict(self.handshake_failures),
            "banned": [
                {"node_id": node_id, "secs_left": round(until - now, 1)}
                for node_id, until in self._banned.items()
                if until > now
            ],
            "dialling": [
                {
                    "url": t.url,
                    "source": t.source,
                    "node_id": t.node_id,
                    "failures": t.failures,
                    "next_attempt_in_secs": round(max(0.0, t.next_at - now), 1),
                    "last_error": t.last_error,
                }
                for t in down
            ],
        }

    # -- inbound -----------------------------------------------------------------------------------
    def accepting(self, host: str | None = None) -> bool:
        """Whether a new inbound link (from `host`, if known) would get a handshake slot now."""
        if not self._started or self._stopping:
            return False
        return host is None or self._pending.would_admit(address_bucket(host))

    async def accept(self, transport) -> None:
        """Serve one inbound link (an accepted WebSocket) until it closes."""
        where = _where(transport.remote)
        # Relay circuits (public mesh) have no address: they share one bucket.
        host = address_bucket(transport.remote[0] if transport.remote else None)
        if not self.accepting():
            await transport.close(CLOSE_TRY_LATER, "not accepting links now")
            return
        handshake: list[asyncio.Task] = []
        slot = self._pending.admit(host, lambda: handshake[0].cancel() if handshake else None)
        if slot is None:
            self._handshake_failed(f"refused inbound link from {where}: too many handshakes in progress", "busy")
            await transport.close(CLOSE_TRY_LATER, "too many handshakes in progress")
            return
        handshake.append(asyncio.ensure_future(self._respond(transport)))
        try:
            result = await asyncio.wait_for(handshake[0], self.settings.handshake_timeout)
        except HandshakeError as exc:
            self._handshake_failed(f"refused inbound link from {where}: {exc}", exc.code)
            await transport.close(CLOSE_HANDSHAKE, f"handshake failed: {exc.code}")
            return
        except TransportClosed as exc:
            # The dialler gave up: it found our proof wrong, or that it had dialled itself.
            level = logging.DEBUG if "self" in exc.reason else logging.INFO
            log.log(level, "inbound link from %s closed during the handshake (%s)", where, exc.code)
            return
        except TimeoutError:
            self._handshake_failed(f"refused inbound link from {where}: handshake timed out", "timeout")
            await transport.close(CLOSE_HANDSHAKE, "handshake timed out")
            return
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not slot.evicted or (current is not None and current.cancelling()):
                raise
            # Its slot went to a newcomer from an address holding fewer (see PendingSlots).
            self._handshake_failed(f"dropped inbound handshake from {where}: slot given to another address",
                                   "evicted")
            await transport.close(CLOSE_TRY_LATER, "too many handshakes in progress")
            return
        finally:
            self._pending.release(slot)
        link = Link(self, transport, result, direction="inbound", settings=self._link_settings)
        refusal = self._register(link)
        if refusal is not None:
            await link.refuse(refusal, CLOSE_FULL if "too many" in refusal else CLOSE_DUPLICATE)
            return
        await link.run()

    async def _respond(self, transport) -> HandshakeResult:
        handshake = Handshake(self.identity, self._psk, initiator=False, hello=self._hello())
        # A real dialler sends message 1 as soon as the link opens; a silent one loses its slot early.
        first = await asyncio.wait_for(transport.recv(), self.settings.first_message_secs)
        reply = handshake.receive(first)
        await transport.send(reply)
        handshake.receive(await transport.recv())
        return handshake.result

    # -- outbound ----------------------------------------------------------------------------------
    async def connect(self, url: str) -> Link:
        """Dial one address now and keep the link (raises DialError, HandshakeError or LinkRefused)."""
        import websockets
        from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

        url = normalize_peer_url(url, self.url_path)
        try:
            ws = await websockets.connect(
                url,
                open_timeout=self.settings.handshake_timeout,
                max_size=max(self.settings.max_frame_bytes + OVERHEAD, MAX_HANDSHAKE_MESSAGE),
                compression=None,  # ciphertext does not compress
                ping_interval=None,  # our own encrypted heartbeats detect dead peers
                close_timeout=2,
                proxy=None,
            )
        except (TimeoutError, OSError, InvalidHandshake, InvalidURI, ConnectionClosed) as exc:
            # ConnectionClosed: the peer closed while the opening handshake was under way (it restarts)
            raise DialError(f"cannot connect: {_describe(exc)}") from None
        return await self.connect_transport(WebsocketsTransport(ws, self.stats), dialed_url=url)

    async def connect_transport(self, transport, *, dialed_url: str | None = None) -> Link:
        """Run the initiator's handshake on an open transport (a WebSocket, a tracker relay circuit) and
        keep the link; raises like connect(). `dialed_url` is where the transport leads, if anywhere."""
        try:
            result = await asyncio.wait_for(self._initiate(transport), self.settings.handshake_timeout)
        except HandshakeError as exc:
            if exc.code != "self":
                self._handshake_failed(None, exc.code)  # the dialler logs it, with its backoff
            await transport.close(CLOSE_HANDSHAKE, f"handshake failed: {exc.code}")
            raise
        except TransportClosed as exc:
            await transport.close()
            if exc.code == CLOSE_HANDSHAKE:
                raise DialError(
                    f"the peer refused the handshake ({exc.reason or 'no reason given'}): "
                    "does this node have the same network secret as the peer?"
                ) from None
            raise DialError(f"the peer closed the link during the handshake ({exc.code})") from None
        except TimeoutError:
            await transport.close(CLOSE_HANDSHAKE, "handshake timed out")
            raise DialError("the handshake timed out") from None
        link = Link(
            self, transport, result, direction="outbound", settings=self._link_settings, dialed_url=dialed_url
        )
        refusal = self._register(link)
        if refusal is not None:
            duplicate = "duplicate" in refusal
            await link.refuse(refusal, CLOSE_DUPLICATE if duplicate else CLOSE_FULL)
            raise LinkRefused(refusal, link.peer_id, duplicate=duplicate)
        task = asyncio.create_task(link.run(), name=f"link-{link.short}")
        self._link_tasks.add(task)
        task.add_done_callback(self._link_tasks.discard)
        return link

    async def _initiate(self, transport) -> HandshakeResult:
        handshake = Handshake(self.identity, self._psk, initiator=True, hello=self._hello())
        await transport.send(handshake.start())
        await transport.send(handshake.receive(await transport.recv()))
        return handshake.result

    def _handshake_failed(self, line: str | None, code: str) -> None:
        self.stats["handshakes_failed"] += 1
        self.handshake_failures[code] += 1
        if line is None:
            return
        # A scanner hammering /p2p must not flood the log.
        suppressed = self._hs_log_budget.spend()
        if suppressed is not None:
            log.warning("%s%s", line, f" ({suppressed} similar lines suppressed)" if suppressed else "")

    # -- links -------------------------------------------------------------------------------------
    def _register(self, link: Link) -> str | None:
        """Keep a freshly handshaken link, or say why not. Two links to one node (both dialled at once)
        resolve the same way on both ends: the link dialled by the lower node id stays."""
        if self._stopping:
            return "node shutting down"
        if self.banned(link.peer_id):
            return "banned for misbehaving; try again later"
        existing = self._links.get(link.peer_id)
        if existing is not None and not existing.closing:
            if self._preferred(existing, link) is existing:
                return "duplicate link (the other one is kept)"
            existing.close("duplicate link (replaced)", CLOSE_DUPLICATE, quiet=True)
        elif len([x for x in self._links.values() if not x.closing]) >= self.settings.max_peers:
            return f"too many peers ({self.settings.max_peers})"
        self._links[link.peer_id] = link
        self._all_links.add(link)
        self.stats["links_opened"] += 1
        for target in self._targets.values():
            if target.url == link.url and target.node_id is None:
                target.node_id = link.peer_id
        log.info(
            "link up: %s (%s) %s %s",
            link.short,
            link.name or "?",
            link.direction,
            "stealth peer" if link.stealth else (link.url or _where(link.transport.remote)),
        )
        self._schedule_pex()
        self._notify_link(self._link_up_hooks, link.peer_id)
        return None

    def _preferred(self, old: Link, new: Link) -> Link:
        if time.monotonic() - old.last_rx > 2 * self.settings.heartbeat_secs:
            return new  # the old one is probably dead and not yet noticed
        if old.initiator_id != new.initiator_id:
            return old if old.initiator_id < new.initiator_id else new
        return new

    def _link_closed(self, link: Link) -> None:
        self._all_links.discard(link)
        if self._links.get(link.peer_id) is not link:
            return  # a replaced duplicate
        del self._links[link.peer_id]
        self.stats["links_closed"] += 1
        level = logging.DEBUG if link._quiet else logging.INFO
        log.log(level, "link down: %s (%s): %s", link.short, link.name or "?", link.close_reason)
        now = time.monotonic()
        flapping = time.time() - link.connected_since < FLAP_SECS
        for target in self._targets.values():
            if target.node_id == link.peer_id:
                # A link that keeps dropping right after it opens (a full peer, a flaky path) backs off
                # like a failed dial; one that lived a while is redialled promptly.
                target.failures = target.failures + 1 if flapping else 0
                target.next_at = max(target.next_at, now + self._backoff(max(1, target.failures)))
        if not self._stopping:
            self._schedule_pex()
        self._notify_link(self._link_down_hooks, link.peer_id)

    # -- dialling ----------------------------------------------------------------------------------
    def _backoff(self, failures: int) -> float:
        """Exponential, capped, with equal jitter: half fixed, half random, so peers don't redial in step."""
        base, cap = self.settings.reconnect_base_secs, self.settings.reconnect_max_secs
        delay = min(cap, base * 2 ** min(max(failures - 1, 0), 30))
        return delay / 2 + _rng.uniform(0, delay / 2)

    def _add_target(self, url: str, source: str, node_id: str | None = None) -> None:
        try:
            url = normalize_peer_url(url, self.url_path)
        except ValueError:
            return
        if url in self._self_urls or self._is_own_address(url):
            return
        target = self._targets.get(url)
        if target is not None:
            if node_id and target.node_id is None:
                target.node_id = node_id
            return
        forgotten = self._forgotten.get(url)
        if forgotten is not None and time.monotonic() - forgotten < FORGET_SECS:
            return
        if len(self._targets) >= MAX_TARGETS:
            return
        self._targets[url] = DialTarget(url, source, persistent=False, node_id=node_id)

    def _is_own_address(self, url: str) -> bool:
        parts = urlsplit(url)
        if parts.port != self.listen_port:
            return False
        host = parts.hostname or ""
        return host == self.listen_host or (
            self.listen_host in WILDCARD_HOSTS and host in ("localhost", "127.0.0.1", "::1")
        )

    async def _dial_loop(self) -> None:
        tick = min(1.0, max(0.05, self.settings.heartbeat_secs / 2))
        while True:
            now = time.monotonic()
            live = len([x for x in self._links.values() if not x.closing])
            for target in list(self._targets.values()):
                if target.task is not None or now < target.next_at:
                    continue
                if target.node_id and (
                    target.node_id in self._links
                    or target.node_id == self.node_id
                    or self.banned(target.node_id)
                ):
                    continue
                if not target.persistent and live >= self.settings.max_peers:
                    continue
                target.task = asyncio.create_task(self._dial_target(target), name="mesh-dial-target")
            await asyncio.sleep(tick)

    async def _dial_target(self, target: DialTarget) -> None:
        try:
            link = await self.connect(target.url)
        except LinkRefused as exc:
            target.node_id = exc.peer_id
            if exc.duplicate:  # already linked to it some other way: that is success
                target.failures, target.last_error = 0, None
            else:
                self._dial_failed(target, str(exc))
        except HandshakeError as exc:
            if exc.code == "self":
                log.info("%s is this node itself; not dialling it again", target.url)
                self._self_urls.add(target.url)
                self._targets.pop(target.url, None)
            else:
                self._dial_failed(target, str(exc))
        except (MeshError, ValueError) as exc:
            self._dial_failed(target, str(exc))
        else:
            target.node_id = link.peer_id
            target.failures, target.last_error = 0, None
        finally:
            target.task = None

    def _dial_failed(self, target: DialTarget, reason: str) -> None:
        # The first failure since the last success, then every tenth: at warning for peers we were told
        # to keep, at info for discovered ones.
        loud = target.last_error is None or target.failures % 10 == 9
        target.failures += 1
        target.last_error = reason
        delay = self._backoff(target.failures)
        target.next_at = time.monotonic() + delay
        level = logging.WARNING if target.persistent and loud else logging.INFO if loud else logging.DEBUG
        log.log(
            level,
            "cannot link to %s (%s, attempt %d, next in %.1fs): %s",
            target.url,
            target.source,
            target.failures,
            delay,
            reason,
        )
        if not target.persistent and target.failures >= DISCOVERED_MAX_FAILURES:
            self._targets.pop(target.url, None)
            self._forgotten[target.url] = time.monotonic()

    # -- peer exchange and discovery ---------------------------------------------------------------
    def _schedule_pex(self) -> None:
        if self._stopping or not self._started:
            return
        if self._pex_task is None or self._pex_task.done():
            self._pex_task = asyncio.create_task(self._pex_soon(), name="mesh-pex-soon")

    async def _pex_soon(self) -> None:
        await asyncio.sleep(0.2)  # a burst of link changes makes one round of messages
        self._broadcast_pex()

    async def _pex_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.pex_secs)
            self._broadcast_pex()
            cutoff = time.monotonic() - FORGET_SECS
            self._forgotten = {u: t for u, t in self._forgotten.items() if t > cutoff}

    def _broadcast_pex(self) -> None:
        if not self.settings.peer_exchange:
            return
        for link in list(self._links.values()):
            if not link.closing:
                link.send_nowait({"t": "peers", "peers": self._pex_entries(exclude=link.peer_id)})

    def _pex_entries(self, *, exclude: str) -> list[dict]:
        # Stealth peers are never passed on, whatever address we know them by; behind a gate, neither are
        # peers it does not trust.
        gate = self.gate
        return [
            {"id": link.peer_id, "url": link.url}
            for link in self._links.values()
            if link.peer_id != exclude and link.url and not link.stealth and not link.closing
            and (gate is None or gate.trusted(link.peer_id))
        ][:MAX_PEX_ENTRIES]

    def _on_peers(self, link: Link, msg: dict) -> None:
        entries = msg.get("peers")
        if not self.settings.peer_exchange or not isinstance(entries, list):
            return
        if self.gate is not None and not self.gate.trusted(link.peer_id):
            self.rejected["peers_from_untrusted"] += 1  # nobody it names is dialled on its word
            return
        for entry in entries[:MAX_PEX_ENTRIES]:
            if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
                continue
            try:
                node_id = validate_node_id(str(entry.get("id")))
            except IdentityError:
                continue
            if node_id == self.node_id or node_id in self._links:
                continue
            self._add_target(entry["url"], "pex", node_id)

    async def _discovery_loop(self) -> None:
        from pinkybrain.node.services.discovery import tailscale_peers

        next_tailscale = 0.0
        while True:
            if self.discovery_provider is not None:
                for item in self.discovery_provider():
                    if item.get("node_id") != self.node_id:
                        self._add_target(item["url"], item.get("source", "mdns"), item.get("node_id"))
            if self.tailscale and time.monotonic() >= next_tailscale:
                next_tailscale = time.monotonic() + self.settings.tailscale_secs
                found = await asyncio.to_thread(tailscale_peers)
                for peer in found.get("peers", []):
                    if peer.get("online"):
                        for address in peer.get("addresses", [])[:2]:
                            self._add_target(make_url(address, self.listen_port), "tailscale")
            await asyncio.sleep(self.settings.discovery_secs)

    # -- what we tell peers ------------------------------------------------------------------------
    def _hello(self) -> dict:
        hello: dict = {"name": self.name[:64], "version": self.version, "stealth": self.stealth,
                       "features": ["batch"]}
        if not self.stealth:
            hello["port"] = self.listen_port
            if self.listen_host not in WILDCARD_HOSTS:
                hello["host"] = self.listen_host
        status = self._local_status()
        if status:
            hello["models"] = [m["name"] for m in status.get("models", []) if isinstance(m.get("name"), str)][
                :64
            ]
        return hello

    def _local_status(self) -> dict | None:
        if self.status_provider is None:
            return None
        status = self.status_provider()
        models = status.get("models") or []
        return {**status, "models": models[:256]}

    async def _info(self, ctx: RpcContext, payload: Any) -> dict:
        return {
            "node_id": self.node_id,
            "name": self.name,
            "version": self.version,
            "status": self._local_status(),
        }


async def _echo(ctx: RpcContext, payload: Any) -> Any:
    return payload


def _subscribe(hooks: list, callback: Callable) -> Callable[[], None]:
    hooks.append(callback)

    def remove() -> None:
        if callback in hooks:
            hooks.remove(callback)

    return remove


class _LogBudget:
    """At most `burst` lines, refilled at `rate` per second; counts what it swallowed meanwhile."""

    def __init__(self, rate: float = 0.5, burst: float = 20):
        from pinkybrain.node.core.channel import TokenBucket

        self.bucket = TokenBucket(rate, burst)
        self.swallowed = 0

    def spend(self) -> int | None:
        if self.bucket.take():
            swallowed, self.swallowed = self.swallowed, 0
            return swallowed
        self.swallowed += 1
        return None


def _where(remote) -> str:
    return f"{remote[0]}:{remote[1]}" if remote else "?"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]
