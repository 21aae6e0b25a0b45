"""Connection guard for the node's port: no client holds a connection (or the memory behind it) by being
slow, and no single address holds more than its share of connections.

uvicorn's own settings cover part of it (an idle keep-alive connection is closed after
`timeout_keep_alive`, headers are capped by `h11_max_incomplete_event_size`, `limit_concurrency` answers
503 past a total), but nothing in uvicorn times out a client that sends its headers or its body a byte
at a time, or that connects and sends nothing. This is a small subclass of uvicorn's h11 protocol:

- from the moment a connection opens, or the first byte of a next request arrives, the request's
  headers must be complete within `header_secs`;
- once the headers are in, the body must be complete within `body_secs` (a response may then take as
  long as it takes: streamed answers are the app's business);
- a connection from an address (an IPv6 /64 counts as one) that already holds `per_address` connections
  (HTTP and WebSocket alike: uvicorn's server state lists both) is closed at once.

Closing is an abort: a client that does not read cannot keep the socket open through a pending write.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from uvicorn.protocols.http.h11_impl import H11Protocol

from pinkybrain.node.core.admission import address_bucket


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


def guarded_protocol(limits: ConnectionLimits) -> type[H11Protocol]:
    """An H11Protocol class enforcing `limits`, for uvicorn.Config(http=...)."""

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            self._guard_timer: asyncio.TimerHandle | None = None
            self._guard_cycle = None
            self._guard_done = False  # upgraded to a WebSocket: the connection is no longer ours
            super().connection_made(transport)
            host = address_bucket(self.client[0]) if self.client else None
            if host is not None and _held_by(self.connections, host) > limits.per_address:
                self._guard_close()
                return
            self._guard_arm(limits.header_secs, self._guard_headers_late)

        def connection_lost(self, exc: Exception | None) -> None:
            self._guard_cancel()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._guard_watch(bytes_arrived=bool(data))

        def on_response_complete(self) -> None:
            self._guard_cancel()
            super().on_response_complete()  # may start a pipelined request already buffered
            self._guard_watch(bytes_arrived=False)

        def _guard_watch(self, *, bytes_arrived: bool) -> None:
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

        def handle_websocket_upgrade(self, event) -> None:
            # The connection now belongs to the WebSocket protocol (the mesh sets its own deadlines).
            self._guard_done = True
            self._guard_cancel()
            super().handle_websocket_upgrade(event)

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

    return GuardedH11Protocol


def _held_by(connections, bucket: str) -> int:
    return sum(1 for p in connections if getattr(p, "client", None) and address_bucket(p.client[0]) == bucket)
