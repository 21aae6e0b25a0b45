"""Byte-stream tunnels over a peer link: a stream type beside the RPC calls, for carrying another
protocol's TCP traffic (llama.cpp's RPC, see node/split/) inside the link's authentication and encryption.

Messages (all on the link's frames, so sealed, counted and rate-limited like the rest):
  tun.open  {id, k: kind, w: window, p: payload}   the opener asks for a tunnel of a registered kind
  tun.ok    {id, w: window, p: reply}              the acceptor connected its end; data may flow (the
                                                   optional reply is the opener's Tunnel.reply)
  tun.err   {id, code, message}                    refused (unknown kind, not trusted, busy, ...)
  tun.data  {id, r} + raw bytes                    at most TUNNEL_CHUNK bytes
  tun.ack   {id, r, n}                             n bytes were consumed: the sender may send n more
  tun.close {id, r, reason}                        either side ends the tunnel (both directions)
`r` is 1 when the sender of the message is the side that opened the tunnel, so ids never collide: each
side numbers its own tunnels. Flow control is by bytes: each side may have at most the other's window
unacknowledged, and acknowledges only what its consumer has taken (written to its socket and drained),
so a slow reader slows the writer instead of filling memory. A peer that sends past its credit has the
tunnel closed.

Carried protocols such as llama.cpp's RPC are request/response, so every message's latency counts. `pump`
therefore takes no extra task hop per message: what arrives is written to the local socket from the
link's reader (`attach`), and the local side's bytes are queued on the link without waiting for them to
reach the wire while the link's queue is short (`Link.post`); both bounds still hold (the window, and a
wait for the wire once the link has a backlog). A protocol that writes one message in several sends
(llama.cpp's RPC: command, size, body) would cost a tunnel message per send; given its `Framing`, pump
holds a partial message until the rest arrives (never longer than HOLD_SECS: a stream that is not what
the framing expects is then forwarded as it comes).

The acceptor side never takes an address from the request: a kind's handler (`mesh.register_tunnel`)
decides what its end connects to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

log = logging.getLogger("pinkybrain.mesh")

TUNNEL_CHUNK = 128 * 1024  # one tun.data message: well under the link's 1 MiB frame
# A writer queues on the link without waiting for the wire while fewer messages than this are queued
# there; past it, it waits for each to be sent (back-pressure from a busy or slow link).
POST_BACKLOG = 16
TUNNEL_WINDOW = 4 * 1024 * 1024  # bytes a side may have in flight, unacknowledged
MAX_TUNNELS = 32  # tunnels a peer may have open to us on one link
OPEN_TIMEOUT = 60.0
# The longest pump holds a partial message for its rest: the sends of one message follow each other at
# once, so a wait this long means the stream does not frame as expected.
HOLD_SECS = 0.05

# handler(ctx, payload) -> (reader, writer) of the local end it connected, or (reader, writer, reply) to
# also answer the opener (sent with tun.ok), or raise RpcError to refuse
TunnelHandler = Callable[[Any, Any], Awaitable[tuple[Any, ...]]]


class Framing(Protocol):
    def feed(self, data: bytes) -> bool:
        """Take the stream's next bytes; True when they end at a message boundary."""
        ...


class TunnelClosed(ConnectionError):
    """The tunnel ended (closed by either side, or its link went away)."""


class Tunnel:
    """One end of a tunnel: `await write(data)`, `await read()` (b"" once closed by the other side)."""

    def __init__(self, link, tid: int, *, opener: bool, window: int, stats: Counter):
        self.link, self.id, self.opener = link, tid, opener
        self.window = window  # what we grant the other side
        self.credit = 0  # what the other side granted us (set by tun.ok / tun.open)
        self.stats = stats
        self.bytes_in = self.bytes_out = 0
        self._rx: asyncio.Queue = asyncio.Queue()
        self._rx_buffered = 0  # received, not yet taken by our reader
        self._unacked = 0  # taken by our reader, not yet acknowledged
        self._credit_event = asyncio.Event()
        self._sink: asyncio.StreamWriter | None = None  # attach(): where received bytes go at once
        self._drainer: asyncio.Task | None = None
        self.closed = False
        self.close_reason: str | None = None
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future = loop.create_future()
        self.ended: asyncio.Future = loop.create_future()  # done once closed, by either side
        self.reply: Any = None  # what the acceptor's handler sent with tun.ok (opener side)
        self._data_head: bytes | None = None  # every tun.data header of ours is the same: encoded once

    @property
    def _r(self) -> int:
        return 1 if self.opener else 0

    # -- writing -----------------------------------------------------------------------------------
    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.closed:
                raise TunnelClosed(self.close_reason or "tunnel closed")
            if self.credit <= 0:
                self._credit_event.clear()
                await self._credit_event.wait()
                continue
            n = min(len(view), TUNNEL_CHUNK, self.credit)
            self.credit -= n
            # The whole of `data` (the usual RPC message) goes as it is: no copy.
            chunk = data if n == len(data) and isinstance(data, bytes) else bytes(view[:n])
            msg = {"t": "tun.data", "id": self.id, "r": self._r}
            if self.link.backlog < POST_BACKLOG:
                if self._data_head is None:
                    from pinkybrain.node.services.peer_link import encode_head  # peer_link imports us

                    self._data_head = encode_head(msg)
                self.link.post(self._data_head, chunk)  # no wait for the wire: the next read starts at once
            else:
                await self.link.send(msg, chunk)
            self.bytes_out += n
            self.stats["tunnel_bytes_out"] += n
            view = view[n:]

    def _grant(self, n) -> None:
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            self.credit = min(self.credit + n, 1 << 31)
            self._credit_event.set()

    # -- reading -----------------------------------------------------------------------------------
    def _received(self, data: bytes) -> bool:
        """False when the other side sent past the window it was granted (a protocol error)."""
        if self.closed:
            return True
        self._rx_buffered += len(data)
        if self._rx_buffered + self._unacked > self.window:
            return False
        self.bytes_in += len(data)
        self.stats["tunnel_bytes_in"] += len(data)
        if self._sink is not None:
            self._sink.write(data)
            self._settle()
        else:
            self._rx.put_nowait(data)
        return True

    def attach(self, writer: asyncio.StreamWriter) -> None:
        """Write what arrives straight to `writer` from now on (what was queued first), instead of read().
        Credit returns once the socket took the bytes: at once while its buffer is under its high-water
        mark, else after it drained, so a local end that stops reading still stops the other side."""
        self._sink = writer
        while not self._rx.empty():
            data = self._rx.get_nowait()
            if data is None:
                self._rx.put_nowait(None)
                break
            writer.write(data)
        if not self.closed:
            self._settle()

    def _settle(self) -> None:
        """Count what the sink has taken as consumed (see attach)."""
        if self._drainer is not None or not self._rx_buffered:
            return  # a drain is under way: it settles when the socket has taken the bytes
        transport = self._sink.transport
        if transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]:
            self._drainer = asyncio.create_task(self._drain())
            return
        self._consumed(self._rx_buffered)
        self._rx_buffered = 0

    async def _drain(self) -> None:
        try:
            await self._sink.drain()
        except (ConnectionError, OSError) as exc:
            self.close(f"local end failed: {type(exc).__name__}")
            return
        finally:
            self._drainer = None
        if not self.closed:
            self._settle()

    def _consumed(self, n: int) -> None:
        self._unacked += n
        # Acknowledge in batches of a quarter window: the writer is never short of credit while less than
        # that is unacknowledged, so request/response traffic (RPC) sends no ack frame per message.
        if self._unacked >= self.window // 4:
            self.link.send_nowait({"t": "tun.ack", "id": self.id, "r": self._r, "n": self._unacked})
            self._unacked = 0

    async def read(self) -> bytes:
        """The next bytes; b"" when the tunnel closed. Taking them returns credit to the other side."""
        if self.closed and self._rx.empty():
            return b""
        data = await self._rx.get()
        if data is None:
            self._rx.put_nowait(None)  # later reads see the end too
            return b""
        self._rx_buffered -= len(data)
        self._consumed(len(data))
        return data

    # -- ending ------------------------------------------------------------------------------------
    def close(self, reason: str = "closed", *, notify: bool = True) -> None:
        if self.closed:
            return
        self.closed, self.close_reason = True, reason
        if notify:
            self.link.send_nowait({"t": "tun.close", "id": self.id, "r": self._r, "reason": reason[:200]})
        self._rx.put_nowait(None)
        self._credit_event.set()
        if not self.ended.done():
            self.ended.set_result(reason)
        if not self.ready.done():
            self.ready.set_exception(TunnelClosed(reason))
            self.ready.exception()  # retrieved: an open that was never awaited logs nothing
        self.link._tunnel_gone(self)


async def pump(tunnel: Tunnel, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
               framing: Framing | None = None) -> str:
    """Copy between a local socket and a tunnel, both ways, until either side ends; then close both.
    Returns which side ended first: "local" (the socket) or "remote" (the tunnel). `framing`: the local
    end's message boundaries, so that each message crosses as one tunnel message."""

    async def up() -> None:
        nonlocal framing
        while data := await reader.read(TUNNEL_CHUNK):
            if framing is not None and not framing.feed(data):
                parts, size = [data], len(data)
                while size < TUNNEL_CHUNK:  # the rest of the message is on its way: take it too
                    try:
                        async with asyncio.timeout(HOLD_SECS):
                            more = await reader.read(TUNNEL_CHUNK - size)
                    except TimeoutError:
                        log.debug("tunnel %d: the stream does not frame as expected; forwarding as it comes",
                                  tunnel.id)
                        framing = None
                        break
                    if not more:
                        break
                    parts.append(more)
                    size += len(more)
                    if framing.feed(more):
                        break
                data = b"".join(parts) if len(parts) > 1 else data
            await tunnel.write(data)

    tunnel.attach(writer)  # the other way needs no task: the tunnel writes to the socket as data arrives
    task = asyncio.create_task(up())
    ended = "remote"
    try:
        done, _ = await asyncio.wait([task, tunnel.ended], return_when=asyncio.FIRST_COMPLETED)
        if task in done and task.exception() is None:
            ended = "local"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        tunnel.close("stream ended")
        writer.close()  # what the socket still buffers is sent before it closes
        with contextlib.suppress(OSError, ConnectionError, asyncio.TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 2)
    return ended
