"""One authenticated, encrypted link to one peer: WebSocket transports, the message layer, heartbeats, status
and the RPC plumbing (requests, streamed replies with credit-based flow control, cancellation).

Messages ride in channel frames: a 4-byte length, a small JSON header ({"t": type, ...}), then optional raw
bytes (binary RPC payloads travel unencoded). A queued message keeps its header and body apart until the
writer seals it: they are joined once, right before encryption, and a received body is a view of the
decrypted frame, not a copy (the RPC layer makes it bytes once, in unpack_payload). One writer task seals and sends frames in queue order, so
counters reach the wire in order; the reader task never waits on a send (replies are queued), so two
busy peers cannot deadlock on each other's full socket buffers.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ipaddress
import json
import logging
import math
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from pinkybrain.node.core.channel import (
    Channel,
    ChannelError,
    FrameRejected,
    RateLimiter,
    RateLimitExceeded,
    RateLimits,
    TokenBucket,
)
from pinkybrain.node.core.handshake import HandshakeResult
from pinkybrain.node.services.tunnels import (
    MAX_TUNNELS,
    OPEN_TIMEOUT,
    TUNNEL_WINDOW,
    Tunnel,
    TunnelClosed,
    pump,
)

if TYPE_CHECKING:
    from pinkybrain.node.services.mesh import Mesh

log = logging.getLogger("pinkybrain.mesh")

# WebSocket close codes; 4000-4999 are free for applications.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_TRY_LATER = 1013
CLOSE_HANDSHAKE = 4001
CLOSE_DUPLICATE = 4002
CLOSE_FULL = 4003
CLOSE_PROTOCOL = 4004
CLOSE_RATE = 4005
CLOSE_DEAD = 4006

_LEN = struct.Struct(">I")
MAX_NAME = 64
MAX_METHOD = 128
MAX_MODELS = 256
# Messages waiting for the wire. Producers that await send() are few; a backlog this deep means the peer
# has stopped reading while it keeps sending (each ping queues a pong): close rather than grow without end.
MAX_QUEUED = 4096


# -- errors -----------------------------------------------------------------------------------------
class MeshError(Exception):
    """Base of the mesh's errors; str() is one line fit for a log or an API error."""


class PeerGone(MeshError):
    """The peer's link closed (or died) before the call finished."""


class PeerNotConnected(PeerGone):
    """No link to that node right now."""


class RpcTimeout(MeshError, TimeoutError):
    """The call ran past its timeout; the remote handler was told to stop."""


class RpcError(MeshError):
    """Raised by a handler to answer with an error code; reaches the caller as RemoteError."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


class RemoteError(RpcError):
    """The remote handler answered with an error (unknown_method, busy, internal, or its own code)."""


class MessageTooLarge(MeshError):
    """A message over the link's frame limit; nothing was sent. Stream large data in chunks."""


class TransportClosed(Exception):
    def __init__(self, code: int | None = None, reason: str = ""):
        super().__init__(f"closed ({code}{': ' + reason if reason else ''})")
        self.code, self.reason = code, reason


# -- transports -------------------------------------------------------------------------------------
class Transport(Protocol):
    remote: tuple[str, int] | None

    async def send(self, data: bytes) -> None: ...

    async def recv(self) -> bytes: ...

    async def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None: ...


class WebsocketsTransport:
    """A connection from the `websockets` library (our outbound dials; also in-process servers)."""

    def __init__(self, ws, stats: Counter):
        from websockets.exceptions import ConnectionClosed

        self._closed_exc = ConnectionClosed
        self.ws, self.stats = ws, stats
        addr = getattr(ws, "remote_address", None)
        self.remote = (str(addr[0]), int(addr[1])) if addr else None

    def _closed(self, exc) -> TransportClosed:
        rcvd = getattr(exc, "rcvd", None)
        return TransportClosed(rcvd.code if rcvd else 1006, rcvd.reason if rcvd else "")

    async def send(self, data: bytes) -> None:
        try:
            await self.ws.send(data)
        except self._closed_exc as exc:
            raise self._closed(exc) from None
        self.stats["bytes_out"] += len(data)

    async def recv(self) -> bytes:
        try:
            data = await self.ws.recv()
        except self._closed_exc as exc:
            raise self._closed(exc) from None
        if isinstance(data, str):
            raise TransportClosed(CLOSE_PROTOCOL, "text message on a peer link")
        self.stats["bytes_in"] += len(data)
        return data

    async def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        async def drain() -> None:
            # With unread messages queued, the library stops reading and would never see the peer's
            # closing frame; reading (and discarding) lets the close handshake finish at once.
            with contextlib.suppress(self._closed_exc, RuntimeError):
                while True:
                    await self.ws.recv()

        drainer = asyncio.create_task(drain())
        try:
            with contextlib.suppress(self._closed_exc, OSError, RuntimeError, asyncio.TimeoutError):
                await asyncio.wait_for(self.ws.close(code, reason[:120]), 3)
        finally:
            drainer.cancel()
            await asyncio.gather(drainer, return_exceptions=True)


class StarletteTransport:
    """An accepted Starlette WebSocket (inbound links on the node's own port)."""

    def __init__(self, websocket, stats: Counter):
        from starlette.websockets import WebSocketDisconnect

        self._disconnect = WebSocketDisconnect
        self.ws, self.stats = websocket, stats
        client = websocket.client
        self.remote = (str(client[0]), int(client[1])) if client else None

    async def send(self, data: bytes) -> None:
        # `data` may be a bytearray (Channel.seal_parts): uvicorn's WebSocket protocols send any bytes-like.
        try:
            await self.ws.send_bytes(data)
        except (self._disconnect, RuntimeError, OSError) as exc:
            raise TransportClosed(getattr(exc, "code", 1006), "") from None
        self.stats["bytes_out"] += len(data)

    async def recv(self) -> bytes:
        try:
            message = await self.ws.receive()
        except (self._disconnect, RuntimeError, OSError):
            raise TransportClosed(1006, "") from None
        if message["type"] == "websocket.disconnect":
            raise TransportClosed(message.get("code", 1006), message.get("reason") or "")
        data = message.get("bytes")
        if data is None:
            raise TransportClosed(CLOSE_PROTOCOL, "text message on a peer link")
        self.stats["bytes_in"] += len(data)
        return data

    async def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        with contextlib.suppress(self._disconnect, RuntimeError, OSError, asyncio.TimeoutError):
            await asyncio.wait_for(self.ws.close(code, reason[:120]), 3)


# -- message codec ----------------------------------------------------------------------------------
# One encoder for every message: json.dumps with options would build a new one per call.
_JSON = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_JSON_DECODER = json.JSONDecoder()


def encode_head(msg: dict) -> bytes:
    """A message's length prefix and JSON header: what goes before its body."""
    head = _JSON.encode(msg).encode()
    return _LEN.pack(len(head)) + head


def encode_message(msg: dict, body: bytes = b"") -> bytes:
    return encode_head(msg) + body


def decode_message(data) -> tuple[dict, memoryview]:
    """(header, body) of one message; the body is a view of `data`, not a copy."""
    if len(data) < _LEN.size:
        raise ValueError("message shorter than its length prefix")
    (n,) = _LEN.unpack_from(data)
    if n > len(data) - _LEN.size:
        raise ValueError("message header runs past the frame")
    try:
        msg = _JSON_DECODER.decode(str(data[_LEN.size : _LEN.size + n], "utf-8"))
    except UnicodeDecodeError:
        raise ValueError("message header is not UTF-8") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
        raise ValueError("message header is not an object with a type")
    return msg, memoryview(data)[_LEN.size + n :]


_BATCH_HEAD = encode_message({"t": "batch"})
BATCH_MAX_MESSAGES = 128
# Only small messages are packed together: a large one already fills its frame, and copying it into a
# batch costs more than the frame it would save.
BATCH_MAX_MESSAGE_BYTES = 8 * 1024
# Room kept in a batch frame for its own header and the channel's (counter, tag).
_BATCH_SLACK = 64


def encode_batch(messages: list[bytes]) -> bytes:
    """Several encoded messages in one frame: `batch`'s body is each message behind its length."""
    parts = [_BATCH_HEAD]
    for data in messages:
        parts += (_LEN.pack(len(data)), data)
    return b"".join(parts)


def split_batch(body: bytes) -> list[bytes]:
    """The messages of a batch body; ValueError when a length runs past the end."""
    out, view, at = [], memoryview(body), 0
    while at < len(view):
        if len(view) - at < _LEN.size:
            raise ValueError("batch entry shorter than its length prefix")
        (n,) = _LEN.unpack_from(view, at)
        at += _LEN.size
        if n > len(view) - at:
            raise ValueError("batch entry runs past the frame")
        out.append(view[at : at + n])
        at += n
    return out


def pack_payload(msg: dict, payload: Any) -> bytes:
    """Bytes travel raw after the header; anything else as JSON inside it."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        msg["b"] = 1
        return bytes(payload)
    msg["p"] = payload
    return b""


def unpack_payload(msg: dict, body) -> Any:
    return bytes(body) if msg.get("b") else msg.get("p")


def _number(value) -> float | None:
    """A finite number from a peer, else None (nan or inf as a timeout would never fire)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int past float range
        return None
    return number if math.isfinite(number) else None


def _int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _text(value, limit: int) -> str | None:
    return value[:limit] if isinstance(value, str) else None


def _valid_host(host) -> str | None:
    if not isinstance(host, str) or not host or len(host) > 253:
        return None
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        ok = all(part.replace("-", "").isalnum() for part in host.split("."))
        return host if ok else None
    return None if ip.is_unspecified or ip.is_multicast else str(ip)


def make_url(host: str, port: int, path: str = "/p2p") -> str:
    if ":" in host:  # IPv6 literal
        host = f"[{host.strip('[]')}]"
    return f"ws://{host}:{port}{path}"


# -- RPC bookkeeping --------------------------------------------------------------------------------
@dataclass(frozen=True)
class RpcContext:
    """What a handler knows about its caller: an authenticated node id (the handshake proved it)."""

    peer_id: str
    peer_name: str | None
    method: str


class _Call:
    """Our side of a request we sent: replies land in `queue` as (kind, value)."""

    def __init__(self, link: Link, cid: int, window: int):
        self.link, self.id, self.window = link, cid, window
        self.queue: asyncio.Queue = asyncio.Queue()
        self.unacked = 0
        self.finished = False

    def consumed(self) -> None:
        """One chunk reached the caller: return credit in batches so the sender keeps streaming."""
        self.unacked += 1
        if self.unacked >= max(1, self.window // 2):
            self.link.send_nowait({"t": "rpc.ack", "id": self.id, "n": self.unacked})
            self.unacked = 0


class _Served:
    """A request we are answering: the handler task and the stream credit the caller granted."""

    def __init__(self, window: int, idle: float):
        self.credits, self.window, self.idle = window, window, idle
        self.event = asyncio.Event()
        self.task: asyncio.Task | None = None

    async def take_credit(self) -> None:
        while self.credits <= 0:
            self.event.clear()
            # A caller that stops reading (and never cancels) frees the handler after its idle timeout.
            await asyncio.wait_for(self.event.wait(), self.idle)
        self.credits -= 1

    def grant(self, n) -> None:
        if isinstance(n, int) and not isinstance(n, bool) and 0 < n <= self.window:
            self.credits = min(self.window, self.credits + n)
            self.event.set()


class RpcStream:
    """`async with mesh.stream(...) as chunks: async for chunk in chunks: ...` - the remote handler's chunks,
    or its single result if it is not a streaming handler. Leaving early cancels the remote handler."""

    def __init__(self, link: Link, method: str, payload: Any, timeout: float, window: int):
        self.link, self.method, self.payload = link, method, payload
        self.timeout, self.window = timeout, window
        self._call: _Call | None = None
        self._done = False

    async def __aenter__(self) -> RpcStream:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def __aiter__(self) -> RpcStream:
        return self

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        try:
            if self._call is None:
                self._call = self.link._open_call(self.window)
                msg = {
                    "t": "rpc.req",
                    "id": self._call.id,
                    "m": self.method,
                    "w": self.window,
                    "to": self.timeout,
                }
                body = pack_payload(msg, self.payload)
                await asyncio.wait_for(self.link.send(msg, body), self.timeout)
            kind, value = await asyncio.wait_for(self._call.queue.get(), self.timeout)
        except TimeoutError:
            self._finish(cancel=True)
            raise RpcTimeout(
                f"{self.method} on peer {self.link.short} sent nothing for {self.timeout:g}s"
            ) from None
        except BaseException:
            self._finish(cancel=True)
            raise
        if kind == "chunk":
            self._call.consumed()
            return value
        self._finish(cancel=False)
        if kind == "end":
            streamed, result = value
            if streamed:
                raise StopAsyncIteration
            return result
        raise value

    async def aclose(self) -> None:
        self._finish(cancel=True)

    def _finish(self, *, cancel: bool) -> None:
        if self._done:
            return
        self._done = True
        if self._call is not None:
            self.link._end_call(self._call, cancel=cancel)


@dataclass
class LinkSettings:
    heartbeat_secs: float = 10.0
    dead_after_secs: float = 30.0
    max_frame: int = 1024 * 1024
    rate_limits: RateLimits = field(default_factory=RateLimits)
    status_every_secs: float = 5.0
    max_served: int = 64
    bye_timeout: float = 1.0


# -- the link ---------------------------------------------------------------------------------------
class Link:
    def __init__(
        self,
        mesh: Mesh,
        transport: Transport,
        result: HandshakeResult,
        *,
        direction: str,
        settings: LinkSettings,
        dialed_url: str | None = None,
    ):
        self.mesh, self.transport, self.settings = mesh, transport, settings
        self.direction = direction
        self.peer_id = result.peer_id
        self.short = result.peer_id[:7]
        hello = result.peer_hello
        self.name = _text(hello.get("name"), MAX_NAME)
        self.version = _text(hello.get("version"), 32)
        self.stealth = bool(hello.get("stealth"))
        # Peers that say they read batch frames get small messages packed together under load.
        self.batches = "batch" in (hello.get("features") if isinstance(hello.get("features"), list) else [])
        self.initiator_id = mesh.node_id if direction == "outbound" else result.peer_id
        self.url = None if self.stealth else self._advertised_url(hello, dialed_url)
        self.channel = Channel(
            result.send_key,
            result.recv_key,
            max_frame=settings.max_frame,
            limiter=RateLimiter(settings.rate_limits, max_frame=settings.max_frame),
        )
        # Pace our own sends a little under the limit a peer with the same settings enforces on us.
        limits = settings.rate_limits
        self._pace_frames = TokenBucket(limits.frames_per_sec * 0.95, max(1.0, limits.frames_per_sec))
        self._pace_bytes = TokenBucket(
            limits.bytes_per_sec * 0.95, max(limits.bytes_per_sec, settings.max_frame)
        )
        self.connected_since = time.time()
        self.last_rx = time.monotonic()
        self.latency_ms: float | None = None
        models = hello.get("models") if isinstance(hello.get("models"), list) else []
        self.status: dict = {"models": [{"name": n[:200]} for n in models[:MAX_MODELS] if isinstance(n, str)]}
        self.status_at: float | None = None
        self.counters: Counter = Counter()
        self.rejected: Counter = Counter()
        self._calls: dict[int, _Call] = {}
        self._served: dict[int, _Served] = {}
        self._next_call = 0
        self._pings: dict[int, float] = {}
        self._ping_seq = 0
        self._outq: asyncio.Queue = asyncio.Queue()
        # Queued messages are (head, body, future or None): see encode_head and _write_loop.
        self._carry: tuple[bytes, bytes, asyncio.Future | None] | None = None  # taken, did not fit a batch
        self._inflight: list[tuple[bytes, bytes, asyncio.Future | None]] = []  # the frame being sent
        self._closing = asyncio.Event()
        self.finished = asyncio.Event()
        self.close_reason: str | None = None
        self._close_code = CLOSE_NORMAL
        self._bye = True
        self._quiet = False
        self._tasks: list[asyncio.Task] = []
        # Byte-stream tunnels (services/tunnels.py): those we opened, and those the peer opened to us.
        self._tunnels_ours: dict[int, Tunnel] = {}
        self._tunnels_theirs: dict[int, Tunnel] = {}
        self._tunnel_tasks: set[asyncio.Task] = set()
        self._next_tunnel = 0

    def _advertised_url(self, hello: dict, dialed_url: str | None) -> str | None:
        port = hello.get("port")
        if isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535:
            host = _valid_host(hello.get("host"))
            if host is None:
                # The peer binds every interface: reach it where we see it (dialled host, or its address).
                if dialed_url:
                    from urllib.parse import urlsplit

                    host = urlsplit(dialed_url).hostname
                elif self.transport.remote:
                    host = self.transport.remote[0]
            if host:
                return make_url(host, port, getattr(self.mesh, "url_path", "/p2p"))
        return dialed_url

    @property
    def closing(self) -> bool:
        return self._closing.is_set()

    # -- lifecycle ---------------------------------------------------------------------------------
    def close(self, reason: str, code: int = CLOSE_NORMAL, *, bye: bool = True, quiet: bool = False) -> None:
        """Ask the link to close; `run()` does the work. The first reason given wins."""
        if self._closing.is_set():
            return
        self.close_reason, self._close_code, self._bye, self._quiet = reason, code, bye, quiet
        self._closing.set()

    async def refuse(self, reason: str, code: int = CLOSE_DUPLICATE) -> None:
        """Close a link that was never run (a duplicate, or over the peer limit), telling the peer why."""
        self.close(reason, code, quiet=True)
        with contextlib.suppress(TransportClosed, asyncio.TimeoutError):
            await asyncio.wait_for(
                self._send_direct({"t": "bye", "reason": reason}), self.settings.bye_timeout
            )
        await self.transport.close(code, reason)
        self.finished.set()

    async def run(self) -> None:
        """Serve the link until it closes; then fail pending calls with PeerGone and unregister it."""
        self._tasks = [
            asyncio.create_task(self._read_loop(), name=f"link-read-{self.short}"),
            asyncio.create_task(self._write_loop(), name=f"link-write-{self.short}"),
            asyncio.create_task(self._heartbeat_loop(), name=f"link-heartbeat-{self.short}"),
        ]
        waiter = asyncio.create_task(self._closing.wait())
        try:
            done, _ = await asyncio.wait([*self._tasks, waiter], return_when=asyncio.FIRST_COMPLETED)
            if not self._closing.is_set():
                self._close_from_task(next(t for t in done if t is not waiter))
        finally:
            if not self._closing.is_set():  # cancelled from outside (shutdown)
                self.close("node shutting down", CLOSE_GOING_AWAY)
            waiter.cancel()
            await self._teardown()

    def _close_from_task(self, task: asyncio.Task) -> None:
        exc = task.exception() if not task.cancelled() else None
        if isinstance(exc, TransportClosed):
            detail = f" ({exc.code}{': ' + exc.reason if exc.reason else ''})" if exc.code else ""
            self.close(f"connection closed{detail}", bye=False)
        elif exc is not None:
            log.error("link to %s failed: %s", self.short, type(exc).__name__, exc_info=exc)
            self.close(f"internal error ({type(exc).__name__})", CLOSE_PROTOCOL)
        else:
            self.close("link task ended", bye=False)

    async def _teardown(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._bye:
            with contextlib.suppress(TransportClosed, asyncio.TimeoutError, ChannelError):
                await asyncio.wait_for(
                    self._send_direct({"t": "bye", "reason": self.close_reason}), self.settings.bye_timeout
                )
        await self.transport.close(self._close_code, self.close_reason or "")
        gone = PeerGone(f"peer {self.short} went away: {self.close_reason}")
        unsent = [*self._inflight, *([self._carry] if self._carry else [])]
        while not self._outq.empty():
            unsent.append(self._outq.get_nowait())
        for _, _, fut in unsent:
            if fut is not None and not fut.done():
                fut.set_exception(gone)
        for call in list(self._calls.values()):
            if not call.finished:
                call.queue.put_nowait(("error", gone))
        for tunnel in [*self._tunnels_ours.values(), *self._tunnels_theirs.values()]:
            tunnel.close(f"link closed: {self.close_reason}", notify=False)
        for task in list(self._tunnel_tasks):
            task.cancel()
        served = [s.task for s in self._served.values() if s.task is not None]
        for task in served:
            task.cancel()
        if served:
            await asyncio.wait(served, timeout=2)
        self.mesh._link_closed(self)
        self.finished.set()

    # -- sending -----------------------------------------------------------------------------------
    def _encode(self, msg: dict | bytes, body: bytes) -> tuple[bytes, bytes]:
        head = msg if isinstance(msg, bytes) else encode_head(msg)
        body = bytes(body)  # no copy for bytes; a caller's bytearray cannot change while it waits
        size = len(head) + len(body)
        if size > self.settings.max_frame:
            raise MessageTooLarge(
                f"{msg.get('t')} message of {size} bytes is over the "
                f"{self.settings.max_frame}-byte frame "
                "limit; stream it in chunks"
            )
        return head, body

    async def send(self, msg: dict, body: bytes = b"") -> None:
        """Queue a message and wait until it is on the wire (backpressure for producers)."""
        await self.enqueue(msg, body)

    def enqueue(self, msg: dict, body: bytes = b"") -> asyncio.Future:
        """Queue a message; the future is done once it is on the wire, or fails with PeerGone. send() awaits
        it; a producer with many messages can queue them all and gather the futures, with no task per
        message (the writer sends them in order, packing small ones into shared frames)."""
        if self._closing.is_set() or not self._room():
            raise PeerGone(f"peer {self.short} went away: {self.close_reason}")
        fut = asyncio.get_running_loop().create_future()
        self._outq.put_nowait((*self._encode(msg, body), fut))
        return fut

    def post(self, msg: dict | bytes, body: bytes = b"") -> None:
        """Queue a message without waiting for it to reach the wire (PeerGone once the link is closing): for
        a producer that bounds its own backlog (a tunnel: by its credit, and by `backlog`). `msg` may be
        encode_head()'s bytes, for a producer that sends the same header over and over."""
        if self._closing.is_set() or not self._room():
            raise PeerGone(f"peer {self.short} went away: {self.close_reason}")
        self._outq.put_nowait((*self._encode(msg, body), None))

    @property
    def backlog(self) -> int:
        """Messages queued for the writer."""
        return self._outq.qsize()

    def _room(self) -> bool:
        if self._outq.qsize() < MAX_QUEUED:
            return True
        log.warning("closing link to %s: it has stopped reading (%d messages queued)", self.short, MAX_QUEUED)
        self.close("peer stopped reading", CLOSE_PROTOCOL, bye=False)
        return False

    def send_nowait(self, msg: dict, body: bytes = b"") -> bool:
        """Queue a small control message without waiting (the reader uses this: it must never block)."""
        if self._closing.is_set() or not self._room():
            return False
        try:
            self._outq.put_nowait((*self._encode(msg, body), None))
        except (MessageTooLarge, TypeError, ValueError):
            log.warning("not sending an oversized or unencodable %s message to %s", msg.get("t"), self.short)
            return False
        return True

    async def _send_direct(self, msg: dict) -> None:
        frame = self.channel.seal(encode_message(msg))
        await self.transport.send(frame)

    async def _pace(self, size: int) -> None:
        frames, nbytes = self._pace_frames, self._pace_bytes
        amount = min(float(size), nbytes.burst)
        now = frames.clock()
        if frames.refill(now) >= 1 and nbytes.refill(now) >= amount:  # under the pace: no wait, one clock read
            frames.tokens -= 1
            nbytes.tokens -= amount
            return
        for bucket, amount in ((self._pace_frames, 1.0), (self._pace_bytes, float(size))):
            while not bucket.take(min(amount, bucket.burst)):
                await asyncio.sleep(max(0.001, (min(amount, bucket.burst) - bucket.tokens) / bucket.rate))

    async def _write_loop(self) -> None:
        while True:
            batch = self._inflight = self._next_batch(await self._next_item())
            if not batch:
                continue
            if len(batch) == 1:
                parts = batch[0][:2]
            else:  # `batch`'s body is each message behind its length (encode_batch, without the copies)
                parts = [_BATCH_HEAD]
                for head, body, _ in batch:
                    parts += (_LEN.pack(len(head) + len(body)), head, body)
            frame = self.channel.seal_parts(parts)
            await self._pace(len(frame))
            await self.transport.send(frame)
            self.counters["frames_out"] += 1
            self.counters["bytes_out"] += len(frame)
            self.mesh.stats["frames_out"] += 1
            self._inflight = []
            for _, _, fut in batch:
                if fut is not None and not fut.done():
                    fut.set_result(None)

    async def _next_item(self) -> tuple[bytes, bytes, asyncio.Future | None]:
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        return await self._outq.get()

    def _next_batch(self, first: tuple[bytes, bytes, asyncio.Future | None]) -> list:
        """`first` plus what is already queued, as far as one frame holds: never waits for more, so an
        idle link sends at once, and a busy one sends fewer, larger frames."""
        fut = first[2]
        batch = [first] if fut is None or not fut.done() else []
        size = len(first[0]) + len(first[1])
        if not self.batches or size > BATCH_MAX_MESSAGE_BYTES:
            return batch
        room = self.settings.max_frame - _BATCH_SLACK - len(_BATCH_HEAD)
        size = sum(len(h) + len(b) + _LEN.size for h, b, _ in batch)
        while len(batch) < BATCH_MAX_MESSAGES and not self._outq.empty():
            item = self._outq.get_nowait()
            fut = item[2]
            if fut is not None and fut.done():  # its sender gave up (cancelled): skip it
                continue
            n = len(item[0]) + len(item[1])
            if n > BATCH_MAX_MESSAGE_BYTES or size + n + _LEN.size > room:
                self._carry = item
                break
            batch.append(item)
            size += n + _LEN.size
        return batch

    # -- receiving ---------------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        while True:
            data = await self.transport.recv()
            self.counters["bytes_in"] += len(data)
            gate = self.mesh.gate
            if gate is not None and not gate.admit_bytes(self.peer_id, len(data)):
                self.close("over the traffic budget of a peer this node does not trust", CLOSE_RATE)
                return
            try:
                _, plaintext = self.channel.open(data)
            except FrameRejected as exc:
                self._rejected(exc.reason, str(exc))
                continue
            except RateLimitExceeded as exc:
                log.warning("closing link to %s: %s", self.short, exc)
                self.close("rate limit exceeded", CLOSE_RATE)
                return
            self.last_rx = time.monotonic()
            self.counters["frames_in"] += 1
            self.mesh.stats["frames_in"] += 1
            try:
                msg, body = decode_message(plaintext)
                if msg["t"] == "batch":
                    messages = [decode_message(part) for part in split_batch(body)]
                    if any(m["t"] == "batch" for m, _ in messages):
                        raise ValueError("nested batch")
                else:
                    messages = [(msg, body)]
            except ValueError:
                self._rejected("malformed", "undecodable message")
                continue
            for msg, body in messages:
                self._dispatch(msg, body)

    def _rejected(self, reason: str, detail: str) -> None:
        self.rejected[reason] += 1
        self.mesh.rejected[reason] += 1
        n = sum(self.rejected.values())
        if n <= 10 or n % 100 == 0:
            log.warning("dropped a frame from %s: %s (%d dropped on this link)", self.short, detail, n)

    def _dispatch(self, msg: dict, body: bytes) -> None:
        kind = msg["t"]
        if kind == "ping":
            self.send_nowait({"t": "pong", "n": msg.get("n")})
        elif kind == "pong":
            sent = self._pings.pop(_int(msg.get("n")), None)
            if sent is not None:
                rtt = (time.monotonic() - sent) * 1000
                self.latency_ms = rtt if self.latency_ms is None else 0.7 * self.latency_ms + 0.3 * rtt
        elif kind == "status":
            self._on_status(msg)
        elif kind == "peers":
            self.mesh._on_peers(self, msg)
        elif kind == "bye":
            reason = _text(msg.get("reason"), 120) or "no reason given"
            self.close(f"peer closed the link: {reason}", bye=False)
        elif kind == "rpc.req":
            self._serve(msg, body)
        elif kind in ("rpc.chunk", "rpc.end", "rpc.err"):
            self._route_reply(kind, msg, body)
        elif kind == "rpc.ack":
            served = self._served.get(_int(msg.get("id")))
            if served is not None:
                served.grant(msg.get("n"))
        elif kind == "rpc.cancel":
            served = self._served.get(_int(msg.get("id")))
            if served is not None and served.task is not None:
                served.task.cancel()
        elif kind.startswith("tun."):
            self._on_tunnel(kind, msg, body)
        else:
            log.debug("ignoring unknown message type %r from %s", kind[:32], self.short)

    def _on_status(self, msg: dict) -> None:
        load = msg.get("load") if isinstance(msg.get("load"), dict) else {}
        guard = msg.get("guard") if isinstance(msg.get("guard"), dict) else {}
        models = msg.get("models") if isinstance(msg.get("models"), list) else []
        split = msg.get("split") if isinstance(msg.get("split"), dict) else {}
        self.status = {
            "load": {
                "cpu_percent": _number(load.get("cpu_percent")),
                "ram_percent": _number(load.get("ram_percent")),
            },
            "guard": {
                "sharing_paused": bool(guard.get("sharing_paused")),
                "reason": _text(guard.get("reason"), 200),
            },
            "sharing": bool(msg.get("sharing")),
            "split": {"lend": bool(split.get("lend")), "free_bytes": _int(split.get("free_bytes"))},
            "models": [m for m in models if isinstance(m, dict) and isinstance(m.get("name"), str)][
                :MAX_MODELS
            ],
        }
        self.status_at = time.time()

    async def _heartbeat_loop(self) -> None:
        hb, dead = self.settings.heartbeat_secs, self.settings.dead_after_secs
        self._send_status()
        next_status = time.monotonic() + self.settings.status_every_secs
        while True:
            await asyncio.sleep(hb)
            now = time.monotonic()
            silent = now - self.last_rx
            if silent > dead:
                log.warning("link to %s is dead: nothing heard for %.1fs", self.short, silent)
                self.close(f"heartbeat timeout ({silent:.1f}s silent)", CLOSE_DEAD, bye=False)
                return
            self._ping_seq += 1
            self._pings[self._ping_seq] = now
            for old in [n for n in self._pings if n <= self._ping_seq - 8]:
                del self._pings[old]
            self.send_nowait({"t": "ping", "n": self._ping_seq})
            if now >= next_status:
                self._send_status()
                next_status = now + self.settings.status_every_secs

    def _send_status(self) -> None:
        status = self.mesh._local_status()
        if status is not None:
            self.send_nowait({"t": "status", **status})

    # -- RPC: caller side --------------------------------------------------------------------------
    def _open_call(self, window: int) -> _Call:
        if self._closing.is_set():
            raise PeerGone(f"peer {self.short} went away: {self.close_reason}")
        self._next_call += 1
        call = _Call(self, self._next_call, window)
        self._calls[call.id] = call
        return call

    def _end_call(self, call: _Call, *, cancel: bool) -> None:
        if cancel and not call.finished:
            self.send_nowait({"t": "rpc.cancel", "id": call.id})
        call.finished = True
        self._calls.pop(call.id, None)

    def _route_reply(self, kind: str, msg: dict, body: bytes) -> None:
        call = self._calls.get(_int(msg.get("id")))
        if call is None or call.finished:
            return  # a late reply to a call that timed out or was cancelled
        if kind == "rpc.chunk":
            if call.queue.qsize() > call.window + 2:
                call.finished = True
                call.queue.put_nowait(("error", RemoteError("protocol", "peer ignored stream flow control")))
                self.send_nowait({"t": "rpc.cancel", "id": call.id})
                return
            call.queue.put_nowait(("chunk", unpack_payload(msg, body)))
        elif kind == "rpc.end":
            call.finished = True
            call.queue.put_nowait(("end", (bool(msg.get("s")), unpack_payload(msg, body))))
        else:
            call.finished = True
            code = _text(msg.get("code"), 64) or "error"
            call.queue.put_nowait(("error", RemoteError(code, _text(msg.get("message"), 500) or "")))

    async def request(self, method: str, payload: Any, timeout: float, window: int = 64) -> Any:
        call = self._open_call(window)
        msg = {"t": "rpc.req", "id": call.id, "m": method, "w": window, "to": timeout}
        try:
            body = pack_payload(msg, payload)
            return await asyncio.wait_for(self._collect(call, msg, body), timeout)
        except TimeoutError:
            self._end_call(call, cancel=True)
            raise RpcTimeout(f"{method} on peer {self.short} timed out after {timeout:g}s") from None
        except BaseException:
            self._end_call(call, cancel=True)
            raise
        finally:
            self._end_call(call, cancel=False)

    async def _collect(self, call: _Call, msg: dict, body: bytes) -> Any:
        await self.send(msg, body)
        chunks = []
        while True:
            kind, value = await call.queue.get()
            if kind == "chunk":
                chunks.append(value)
                call.consumed()
            elif kind == "end":
                streamed, result = value
                return chunks if streamed else result
            else:
                raise value

    # -- RPC: serving side -------------------------------------------------------------------------
    def _serve(self, msg: dict, body: bytes) -> None:
        cid, method = _int(msg.get("id")), msg.get("m")
        if cid is None or not isinstance(method, str) or len(method) > MAX_METHOD:
            self._rejected("malformed", "malformed rpc request")
            return
        if cid in self._served:
            self.send_nowait(
                {"t": "rpc.err", "id": cid, "code": "duplicate_id", "message": "request id in use"}
            )
            return
        if len(self._served) >= self.settings.max_served:
            self.send_nowait(
                {"t": "rpc.err", "id": cid, "code": "busy", "message": "too many calls in flight"}
            )
            return
        gate = self.mesh.gate
        refusal = gate.refuse_request(self.peer_id, method) if gate is not None else None
        if refusal is not None:
            self.send_nowait({"t": "rpc.err", "id": cid, "code": "not_trusted", "message": refusal[:500]})
            return
        handler = self.mesh._handlers.get(method)
        if handler is None:
            self.send_nowait(
                {"t": "rpc.err", "id": cid, "code": "unknown_method", "message": f"no handler for {method!r}"}
            )
            return
        window, idle = msg.get("w"), msg.get("to")
        window = min(max(window, 1), 1024) if _int(window) is not None else 16
        idle = min(max(float(idle), 0.1), 3600.0) if _number(idle) is not None else 30.0
        served = _Served(window, idle)
        self._served[cid] = served
        ctx = RpcContext(peer_id=self.peer_id, peer_name=self.name, method=method)
        served.task = asyncio.create_task(
            self._run_handler(cid, method, handler, ctx, unpack_payload(msg, body), served),
            name=f"rpc-{method[:32]}-{self.short}",
        )

    async def _run_handler(self, cid: int, method: str, handler, ctx: RpcContext, payload, served: _Served):
        try:
            if inspect.isasyncgenfunction(handler):
                agen = handler(ctx, payload)
                try:
                    async for chunk in agen:
                        await served.take_credit()
                        msg = {"t": "rpc.chunk", "id": cid}
                        await self.send(msg, pack_payload(msg, chunk))
                finally:
                    await agen.aclose()
                await self.send({"t": "rpc.end", "id": cid, "s": 1})
            else:
                result = await handler(ctx, payload)
                msg = {"t": "rpc.end", "id": cid}
                await self.send(msg, pack_payload(msg, result))
        except PeerGone:
            pass
        except RpcError as exc:
            self.send_nowait({"t": "rpc.err", "id": cid, "code": exc.code[:64], "message": exc.message[:500]})
        except MessageTooLarge as exc:
            self.send_nowait({"t": "rpc.err", "id": cid, "code": "too_large", "message": str(exc)})
        except TimeoutError:
            log.info("stream %s to %s stalled: the caller stopped reading", method[:32], self.short)
            self.send_nowait(
                {"t": "rpc.err", "id": cid, "code": "stalled", "message": "caller stopped reading"}
            )
        except Exception as exc:  # noqa: BLE001 - a handler bug must answer its caller, not end the link
            # Type only: exception messages can quote the payload, which is never logged.
            log.error("rpc handler %s failed for %s: %s", method[:32], self.short, type(exc).__name__)
            log.debug("rpc handler %s traceback", method[:32], exc_info=exc)
            self.send_nowait({"t": "rpc.err", "id": cid, "code": "internal", "message": "the handler failed"})
        finally:
            self._served.pop(cid, None)

    # -- tunnels (services/tunnels.py) -------------------------------------------------------------
    async def open_tunnel(self, kind: str, payload: Any = None, timeout: float = OPEN_TIMEOUT) -> Tunnel:
        """A byte stream to the peer's handler for `kind`; RemoteError when it refuses."""
        if self._closing.is_set():
            raise PeerGone(f"peer {self.short} went away: {self.close_reason}")
        self._next_tunnel += 1
        tunnel = Tunnel(self, self._next_tunnel, opener=True, window=TUNNEL_WINDOW, stats=self.mesh.stats)
        self._tunnels_ours[tunnel.id] = tunnel
        msg = {"t": "tun.open", "id": tunnel.id, "k": kind[:MAX_METHOD], "w": TUNNEL_WINDOW}
        try:
            await self.send(msg, pack_payload(msg, payload))
            await asyncio.wait_for(asyncio.shield(tunnel.ready), timeout)
        except TunnelClosed as exc:
            if isinstance(exc.__cause__, RemoteError):
                raise exc.__cause__ from None
            raise PeerGone(f"tunnel to {self.short} closed while opening: {exc}") from None
        except BaseException:
            tunnel.close("open abandoned")
            raise
        return tunnel

    def _tunnel_gone(self, tunnel: Tunnel) -> None:
        table = self._tunnels_ours if tunnel.opener else self._tunnels_theirs
        if table.get(tunnel.id) is tunnel:
            del table[tunnel.id]

    def _on_tunnel(self, kind: str, msg: dict, body: bytes) -> None:
        tid = _int(msg.get("id"))
        if tid is None:
            self._rejected("malformed", "tunnel message without an id")
            return
        if kind == "tun.open":
            self._accept_tunnel(tid, msg, body)
            return
        # tun.ok/err answer the opener (us); data/ack/close name the table by who opened the tunnel.
        mine = kind in ("tun.ok", "tun.err") or not msg.get("r")
        tunnel = (self._tunnels_ours if mine else self._tunnels_theirs).get(tid)
        if tunnel is None:
            return  # a late message for a tunnel that has already ended
        if kind == "tun.ok":
            tunnel._grant(_int(msg.get("w")))
            tunnel.reply = unpack_payload(msg, body)
            if not tunnel.ready.done():
                tunnel.ready.set_result(None)
        elif kind == "tun.err":
            code = _text(msg.get("code"), 64) or "error"
            error = RemoteError(code, _text(msg.get("message"), 500) or "")
            if not tunnel.ready.done():
                closed = TunnelClosed(str(error))
                closed.__cause__ = error
                tunnel.ready.set_exception(closed)
            tunnel.close(str(error), notify=False)
        elif kind == "tun.data":
            if not tunnel._received(body):
                log.warning("closing a tunnel from %s: it sent past its flow-control window", self.short)
                tunnel.close("peer ignored tunnel flow control")
        elif kind == "tun.ack":
            tunnel._grant(_int(msg.get("n")))
        elif kind == "tun.close":
            tunnel.close(_text(msg.get("reason"), 200) or "closed by peer", notify=False)

    def _accept_tunnel(self, tid: int, msg: dict, body: bytes) -> None:
        def refuse(code: str, message: str) -> None:
            self.send_nowait({"t": "tun.err", "id": tid, "code": code, "message": message[:500]})

        kind = msg.get("k")
        if not isinstance(kind, str) or not kind or len(kind) > MAX_METHOD:
            self._rejected("malformed", "malformed tunnel request")
            return
        if tid in self._tunnels_theirs:
            refuse("duplicate_id", "tunnel id in use")
            return
        if len(self._tunnels_theirs) >= MAX_TUNNELS:
            refuse("busy", "too many tunnels open")
            return
        gate = self.mesh.gate
        refusal = gate.refuse_request(self.peer_id, f"tunnel:{kind}") if gate is not None else None
        if refusal is not None:
            refuse("not_trusted", refusal)
            return
        handler = self.mesh._tunnel_handlers.get(kind)
        if handler is None:
            refuse("unknown_tunnel", f"no tunnel of kind {kind!r}")
            return
        window = _int(msg.get("w"))
        tunnel = Tunnel(self, tid, opener=False, window=TUNNEL_WINDOW, stats=self.mesh.stats)
        tunnel._grant(min(window, 64 * TUNNEL_WINDOW) if window is not None else TUNNEL_WINDOW)
        self._tunnels_theirs[tid] = tunnel
        ctx = RpcContext(peer_id=self.peer_id, peer_name=self.name, method=f"tunnel:{kind}")
        framing = self.mesh._tunnel_framings.get(kind)
        task = asyncio.create_task(self._run_tunnel(tunnel, handler, ctx, unpack_payload(msg, body),
                                                    framing() if framing else None),
                                   name=f"tunnel-{kind[:32]}-{self.short}")
        self._tunnel_tasks.add(task)
        task.add_done_callback(self._tunnel_tasks.discard)

    async def _run_tunnel(self, tunnel: Tunnel, handler, ctx: RpcContext, payload, framing=None) -> None:
        try:
            reader, writer, *extra = await handler(ctx, payload)
        except RpcError as exc:
            self.send_nowait({"t": "tun.err", "id": tunnel.id, "code": exc.code[:64], "message": exc.message[:500]})
            tunnel.close(exc.message, notify=False)
            return
        except Exception as exc:  # noqa: BLE001 - a handler bug answers the opener, never ends the link
            log.error("tunnel handler %s failed for %s: %s", ctx.method[:40], self.short, type(exc).__name__)
            self.send_nowait({"t": "tun.err", "id": tunnel.id, "code": "internal", "message": "the handler failed"})
            tunnel.close("handler failed", notify=False)
            return
        if tunnel.closed:  # the opener gave up (or the link went) while we connected
            writer.close()
            return
        ok = {"t": "tun.ok", "id": tunnel.id, "w": tunnel.window}
        # A handler may answer the opener with a reply beside the stream (a lend's receipt: node/split).
        body = pack_payload(ok, extra[0]) if extra and extra[0] is not None else b""
        self.send_nowait(ok, body)
        await pump(tunnel, reader, writer, framing)

    # -- views -------------------------------------------------------------------------------------
    def describe(self) -> dict:
        status = self.status
        load = status.get("load") or {}
        guard = status.get("guard") or {}
        remote = self.transport.remote
        return {
            "node_id": self.peer_id,
            "name": self.name,
            "version": self.version,
            "state": "connected",
            "direction": self.direction,
            "stealth": self.stealth,
            "address": None if self.stealth or remote is None else f"{remote[0]}:{remote[1]}",
            "url": None if self.stealth else self.url,
            "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 2),
            "connected_since": self.connected_since,
            "last_seen_secs": round(time.monotonic() - self.last_rx, 3),
            "shared_models": [m["name"] for m in status.get("models", [])],
            "load": {"cpu_percent": load.get("cpu_percent"), "ram_percent": load.get("ram_percent")},
            "guard": {"sharing_paused": guard.get("sharing_paused"), "reason": guard.get("reason")},
            "sharing": status.get("sharing"),
            "split": status.get("split") or {"lend": False, "free_bytes": None},
            "bytes_in": self.counters["bytes_in"],
            "bytes_out": self.counters["bytes_out"],
            "frames_in": self.counters["frames_in"],
            "frames_out": self.counters["frames_out"],
            "frames_rejected": dict(self.rejected),
        }
