"""Connection guard for the node's port: no client holds a connection (or the memory behind it) by being
slow, and no single address holds more than its share of connections.

uvicorn's own settings cover part of it (an idle keep-alive connection is closed after
`timeout_keep_alive`, `limit_concurrency` answers 503 past a total), but nothing in uvicorn times out a
client that sends its headers or its body a byte at a time, or that connects and sends nothing, and its
httptools protocol puts no cap on the size of a request's headers. This is a small subclass of uvicorn's
HTTP protocol (httptools where installed, which parses in C; else h11):

- from the moment a connection opens, or the first byte of a next request arrives, the request's
  headers must be complete within `header_secs`;
- once the headers are in, the body must be complete within `body_secs` (a response may then take as
  long as it takes: streamed answers are the app's business);
- a request's headers may take at most `MAX_HEADER_BYTES` (h11's own default cap): past it, 431;
- a connection from an address (an IPv6 /64 counts as one) that already holds `per_address` connections
  (HTTP and WebSocket alike: uvicorn's server state lists both) is closed at once.

Closing is an abort: a client that does not read cannot keep the socket open through a pending write.

It also writes each answer in one piece: uvicorn writes a response's status line and headers, then its
body, each at once, so a small answer costs two send() calls and two TCP segments. `CoalescingTransport`
holds what is written during one step of the event loop and sends it together when the answer is
complete, or else at the end of that step (a streamed answer's chunks still leave as they come, one loop
step later). Measured on the bare
baseline of bench/api_load.py, this alone takes about 15 % off the server's CPU per request.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from pinkybrain.node.core.admission import address_bucket

MAX_HEADER_BYTES = 16 * 1024  # request line and headers together; h11's default incomplete-event cap
_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
              b"content-length: 31\r\nconnection: close\r\n\r\nrequest headers exceed 16 KiB.\n")


def http_protocol_class() -> type:
    """uvicorn's httptools protocol where httptools is installed, else its h11 one (what http="auto" picks)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol


class CoalescingTransport:
    """A transport that sends everything written to it during one event-loop step as one write."""

    __slots__ = ("transport", "_loop", "_pending")

    def __init__(self, transport, loop: asyncio.AbstractEventLoop):
        self.transport, self._loop = transport, loop
        self._pending: list[bytes] | None = None

    def write(self, data) -> None:
        if self._pending is None:
            self._pending = [data]
            self._loop.call_soon(self.flush)
        else:
            self._pending.append(data)

    def flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and not self.transport.is_closing():
            self.transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def is_closing(self) -> bool:  # asked several times per request: not through __getattr__
        return self.transport.is_closing()

    def close(self) -> None:
        self.flush()  # a close after the last write (Connection: close) sends that write first
        self.transport.close()

    def abort(self) -> None:
        self._pending = None
        self.transport.abort()

    def __getattr__(self, name):  # everything else is the real transport's
        return getattr(self.transport, name)


def websocket_protocol(**kwargs) -> asyncio.Protocol:
    """uvicorn's WebSocket protocol (what ws="auto" picks), imported at the first upgrade (a peer link)
    rather than when the server starts: websockets' import is 25-55 ms of a node's start on the 2-core
    development VM, before any peer needs it. uvicorn calls it as it would the class."""
    from uvicorn.protocols.websockets.auto import AutoWebSocketsProtocol

    return AutoWebSocketsProtocol(**kwargs)


@dataclass(frozen=True)
class ConnectionLimits:
    header_secs: float = 10.0
    body_secs: float = 30.0
    per_address: int = 64

    @classmethod
    def from_config(cls, cfg) -> ConnectionLimits:
        return cls(
            header_secs=cfg["http.header_timeout_secs"],
            body_secs=cfg["http.body_timeout_secs"],
            per_address=cfg["http.max_connections_per_address"],
        )


def guarded_protocol(limits: ConnectionLimits, base: type | None = None) -> type:
    """A uvicorn HTTP protocol class (`base`, default: http_protocol_class()) enforcing `limits`, for
    uvicorn.Config(http=...)."""
    base = base or http_protocol_class()

    class GuardedProtocol(base):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            self._guard_timer: asyncio.TimerHandle | None = None
            self._guard_cycle = None
            self._guard_done = False  # upgraded to a WebSocket: the connection is no longer ours
            self._guard_header_bytes = 0  # bytes of a request whose headers are not complete yet
            self._guard_out = CoalescingTransport(transport, asyncio.get_running_loop())
            super().connection_made(self._guard_out)
            host = address_bucket(self.client[0]) if self.client else None
            if host is not None and _held_by(self.connections, host) > limits.per_address:
                self._guard_close()
                return
            self._guard_arm(limits.header_secs, self._guard_headers_late)

        def connection_lost(self, exc: Exception | None) -> None:
            self._guard_cancel()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            cycle_before = self.cycle
            waiting = cycle_before is None or cycle_before.response_complete
            super().data_received(data)
            if waiting and self.cycle is cycle_before and not self._guard_done:  # still no complete headers
                self._guard_header_bytes += len(data)
                if self._guard_header_bytes > MAX_HEADER_BYTES and not self.transport.is_closing():
                    self._guard_cancel()
                    self.transport.write(_TOO_LARGE)
                    self.transport.close()  # after the 431 is written; 200 bytes fit any socket buffer
                    return
            else:
                self._guard_header_bytes = 0
            self._guard_watch(bool(data))

        def on_response_complete(self) -> None:
            # The whole answer is written: it leaves now, not a loop step later (a step that, with few
            # connections, is an extra turn of the loop per request).
            self._guard_out.flush()
            self._guard_cancel()
            super().on_response_complete()  # may start a pipelined request already buffered
            self._guard_watch(False)

        def _guard_watch(self, bytes_arrived: bool) -> None:
            if self._guard_done or self.transport.is_closing():
                return
            cycle = self.cycle
            if cycle is None or cycle.response_complete:
                # Between requests: idle time is uvicorn's keep-alive timer, but the first byte of a next
                # request starts the header clock.
                if bytes_arrived and self._guard_timer is None:
                    self._guard_arm(limits.header_secs, self._guard_headers_late)
            elif cycle is not self._guard_cycle:  # a new request's headers are complete
                self._guard_cycle = cycle
                self._guard_cancel()
                if cycle.more_body:
                    self._guard_arm(limits.body_secs, self._guard_body_late)
            elif not cycle.more_body:
                self._guard_cancel()

        def handle_websocket_upgrade(self, *event) -> None:  # h11 passes the request event, httptools none
            # The connection now belongs to the WebSocket protocol (the mesh sets its own deadlines).
            self._guard_done = True
            self._guard_cancel()
            # ...and its own transport: frames of a peer link are written as the link sends them.
            if isinstance(self.transport, CoalescingTransport):
                self.transport.flush()
                self.transport = self.transport.transport
            super().handle_websocket_upgrade(*event)

        # -- the guard ------------------------------------------------------------------------------
        def _guard_arm(self, delay: float, callback) -> None:
            self._guard_cancel()
            self._guard_timer = self.loop.call_later(delay, callback)

        def _guard_cancel(self) -> None:
            if self._guard_timer is not None:
                self._guard_timer.cancel()
                self._guard_timer = None

        def _guard_headers_late(self) -> None:
            self._guard_timer = None
            if self.cycle is None or self.cycle.response_complete:
                self._guard_close()

        def _guard_body_late(self) -> None:
            self._guard_timer = None
            cycle = self.cycle
            if cycle is not None and cycle is self._guard_cycle and cycle.more_body and not cycle.response_complete:
                self._guard_close()

        def _guard_close(self) -> None:
            if self._guard_done:
                return
            self._guard_cancel()
            if not self.transport.is_closing():
                self.transport.abort()

    GuardedProtocol.__name__ = GuardedProtocol.__qualname__ = f"Guarded{base.__name__}"
    return GuardedProtocol


def _held_by(connections, bucket: str) -> int:
    return sum(1 for p in connections if getattr(p, "client", None) and address_bucket(p.client[0]) == bucket)
