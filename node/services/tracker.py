"""The tracker: a standalone WebSocket server where nodes prove their id, announce signed records, list
each other and relay end-to-end-encrypted frames to nodes they cannot reach directly.

    pinkybrain tracker serve --host 0.0.0.0 --port 8090 --public-url wss://tracker.example.org

The protocol is in pinkybrain.node.core.tracker_protocol. Everything here is about staying up when
clients misbehave:

* Limits before work: sessions per IP and in all (checked before the WebSocket upgrade and again after),
  256 KiB per message (the library closes with 1009 above it), a 5 s deadline to authenticate, an idle
  timeout, token buckets per session for announces, lists, other requests and relayed frames and bytes.
* Refusals are answered, then counted: a session whose refused messages outrun a small budget, or that
  sends a handful of malformed ones, is closed (4429 / 4400). Nothing a client sends raises out of its
  handler; an unexpected fault closes that one session with 1011.
* Every session has one writer task and a bounded send queue. Relayed frames to a full queue are dropped
  (the sender gets an "undeliverable: congested" notice); a session that cannot even take the replies to
  its own requests, or stalls one send past the write timeout, is closed (4410). So a slow reader costs
  at most its queue bound, never unbounded memory, and never stalls the sender's session.
* Record store work is bounded: list pages scan at most `max_scan` ids, expiry runs from a heap.

Logs are operational only: counts, short node ids, addresses, reasons. Never a relayed payload, never a
record's content (the `websockets` library's frame-level debug logging is kept off for the same reason).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import heapq
import logging
import os
import secrets
import signal
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from pinkybrain.node.core.channel import TokenBucket
from pinkybrain.node.core.identity import public_key_from_node_id
from pinkybrain.node.core.tracker_protocol import (
    CHALLENGE_BYTES,
    CLOSE_AUTH,
    CLOSE_FLOOD,
    CLOSE_PROTOCOL,
    CLOSE_REPLACED,
    CLOSE_SLOW,
    CLOSE_TIMEOUT,
    CLOSE_TRY_LATER,
    E_AUTH_FAILED,
    E_AUTH_TIMEOUT,
    E_BAD_JSON,
    E_BAD_MESSAGE,
    E_FULL,
    E_NOT_YOURS,
    E_RATE_LIMITED,
    E_STALE,
    E_UNKNOWN_TYPE,
    KIND_RELAY,
    LIST_MAX_LIMIT,
    MAX_CLOCK_SKEW_SECS,
    MAX_MESSAGE_BYTES,
    MAX_REPLY_BYTES,
    MAX_TTL_SECS,
    PROTOCOL_VERSION,
    REASON_CONGESTED,
    REASON_RATE_LIMITED,
    REASON_SELF,
    REASON_UNREACHABLE,
    AnnounceRecord,
    ListQuery,
    ProtocolError,
    address_range,
    b64encode,
    canonical_tracker_url,
    check_auth,
    decode_frame,
    dumps,
    encode_deliver,
    encode_undeliverable,
    error_message,
    parse_message,
    parse_record,
    request_id,
)

log = logging.getLogger("pinkybrain.tracker")

WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")
_MALFORMED = (E_BAD_JSON, E_BAD_MESSAGE)


@dataclass
class TrackerSettings:
    host: str = "127.0.0.1"
    port: int = 8090
    public_url: str | None = None  # what clients dial (and sign); default ws://host:port
    tls_cert: str | None = None
    tls_key: str | None = None
    max_records: int = 100_000
    max_sessions: int = 10_000
    max_sessions_per_ip: int = 32
    auth_timeout: float = 5.0
    idle_timeout: float = 300.0
    write_timeout: float = 20.0
    max_message: int = MAX_MESSAGE_BYTES
    announce_rate: float = 1.0
    announce_burst: float = 10.0
    list_rate: float = 5.0
    list_burst: float = 20.0
    other_rate: float = 10.0
    other_burst: float = 30.0
    # Sybil limits, per address range (tracker_protocol.address_range: /24, /48). New node ids: records
    # outlive sessions, so without this one range could fill the store by logging in again and again
    # with fresh keys. Records held: whatever the rate, one range never holds more than this many.
    ip_new_record_rate: float = 1.0
    ip_new_record_burst: float = 64.0
    max_records_per_range: int = 1024
    relay_rate: float = 1000.0  # frames per second
    relay_burst: float = 2000.0
    relay_bytes_rate: float = 8 * 1024 * 1024
    relay_bytes_burst: float = 16 * 1024 * 1024
    # Refused messages a session may send before it is cut off: a burst is a bug, a stream is a flood.
    refusal_rate: float = 5.0
    refusal_burst: float = 50.0
    max_strikes: int = 5  # malformed messages before the session is closed
    send_queue_bytes: int = 2 * 1024 * 1024
    send_queue_messages: int = 1024
    max_scan: int = 2000
    sweep_secs: float = 1.0
    stats_log_secs: float = 60.0
    clock_skew: int = MAX_CLOCK_SKEW_SECS

    def advertised_url(self, host_header: str | None = None) -> str:
        """The URL clients must sign. Without --public-url on a wildcard bind it follows the Host header,
        which a relaying attacker controls: set --public-url on a public tracker."""
        if self.public_url:
            return canonical_tracker_url(self.public_url)
        scheme = "wss" if self.tls_cert else "ws"
        if self.host in WILDCARD_HOSTS:
            if host_header:
                with contextlib.suppress(ValueError):
                    return canonical_tracker_url(f"{scheme}://{host_header}")
            return canonical_tracker_url(f"{scheme}://127.0.0.1:{self.port}")
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return canonical_tracker_url(f"{scheme}://{host}:{self.port}")

    def limits(self) -> dict:
        return {
            "max_message": self.max_message,
            "max_ttl": MAX_TTL_SECS,
            "list_max_limit": LIST_MAX_LIMIT,
            "idle_timeout": self.idle_timeout,
            "announce_rate": self.announce_rate,
            "list_rate": self.list_rate,
            "relay_rate": self.relay_rate,
            "relay_bytes_rate": self.relay_bytes_rate,
        }


# -- record store -----------------------------------------------------------------------------------
@dataclass(slots=True)
class _Stored:
    seq: int
    expires: float
    stealth: bool
    paused: bool
    models: frozenset
    shas: frozenset
    wire: str  # canonical JSON, encoded once so a list reply is a join


class RecordStore:
    """Verified records by node id, with a sorted index of the listable (non-stealth) ones."""

    def __init__(self, max_records: int, *, max_per_range: int | None = None):
        self.max_records = max_records
        self.max_per_range = max_per_range
        self._records: dict[str, _Stored] = {}
        self._range_of: dict[str, str] = {}  # node id -> the address range that first announced it
        self._per_range: Counter = Counter()
        self._ids: list[str] = []  # listable ids, sorted: stable pagination by id
        self._by_model: dict[str, set[str]] = {}
        self._expiry: list[tuple[float, str, int]] = []
        # node id -> (seq, until): after `leave`, copies of its still-valid older records are refused.
        self._tombstones: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, node_id: str) -> bool:
        return node_id in self._records

    @property
    def listable(self) -> int:
        return len(self._ids)

    def put(self, record: AnnounceRecord, now: float, source_range: str | None = None) -> float:
        node_id = record.node_id
        old = self._records.get(node_id)
        if old is not None and record.seq <= old.seq:
            raise ProtocolError(E_STALE, f"sequence {record.seq} is not above the stored {old.seq}")
        tomb = self._tombstones.get(node_id)
        if tomb is not None and tomb[1] > now and record.seq <= tomb[0]:
            raise ProtocolError(E_STALE, "this node left; announce with a higher sequence number")
        if old is None and len(self._records) >= self.max_records:
            self.sweep(now)
            if len(self._records) >= self.max_records:
                raise ProtocolError(E_FULL, "the tracker holds as many records as it may")
        if old is None and source_range is not None and self.max_per_range is not None:
            if self._per_range[source_range] >= self.max_per_range:
                self.sweep(now)
                if self._per_range[source_range] >= self.max_per_range:
                    raise ProtocolError(E_RATE_LIMITED, f"this address range ({source_range}) holds as many "
                                                        "records as it may; try later")
        # A record cannot outlive the maximum TTL from now, whatever the signer's clock said.
        expires = min(float(record.expires_at), now + MAX_TTL_SECS)
        stored = _Stored(
            seq=record.seq,
            expires=expires,
            stealth=record.stealth,
            paused=record.capacity.paused,
            models=frozenset(m.name for m in record.models),
            shas=frozenset(m.sha256 for m in record.models if m.sha256),
            wire=record.wire_json(),
        )
        if old is not None:
            self._unindex(node_id, old)
        elif source_range is not None:
            self._range_of[node_id] = source_range
            self._per_range[source_range] += 1
        self._records[node_id] = stored
        self._index(node_id, stored)
        heapq.heappush(self._expiry, (expires, node_id, record.seq))
        return expires

    def remove(self, node_id: str, now: float) -> bool:
        old = self._records.pop(node_id, None)
        if old is None:
            return False
        self._unindex(node_id, old)
        self._release_range(node_id)
        self._tombstones[node_id] = (old.seq, now + MAX_TTL_SECS + MAX_CLOCK_SKEW_SECS)
        self._tombstones.move_to_end(node_id)
        while len(self._tombstones) > self.max_records:
            self._tombstones.popitem(last=False)
        return True

    def _release_range(self, node_id: str) -> None:
        source = self._range_of.pop(node_id, None)
        if source is not None:
            self._per_range[source] -= 1
            if self._per_range[source] <= 0:
                del self._per_range[source]

    def _index(self, node_id: str, stored: _Stored) -> None:
        if stored.stealth:
            return  # never listed, so never indexed
        bisect.insort(self._ids, node_id)
        for name in stored.models:
            self._by_model.setdefault(name, set()).add(node_id)

    def _unindex(self, node_id: str, stored: _Stored) -> None:
        if stored.stealth:
            return
        i = bisect.bisect_left(self._ids, node_id)
        if i < len(self._ids) and self._ids[i] == node_id:
            del self._ids[i]
        for name in stored.models:
            holders = self._by_model.get(name)
            if holders is not None:
                holders.discard(node_id)
                if not holders:
                    del self._by_model[name]

    def sweep(self, now: float) -> int:
        dropped = 0
        while self._expiry and self._expiry[0][0] <= now:
            _, node_id, seq = heapq.heappop(self._expiry)
            stored = self._records.get(node_id)
            if stored is not None and stored.seq == seq and stored.expires <= now:
                del self._records[node_id]
                self._unindex(node_id, stored)
                self._release_range(node_id)
                dropped += 1
        while self._tombstones:
            node_id, (_, until) = next(iter(self._tombstones.items()))
            if until > now:
                break
            del self._tombstones[node_id]
        return dropped

    def page(
        self, query: ListQuery, *, exclude: str | None, now: float, max_scan: int, max_bytes: int
    ) -> tuple[list[str], str | None]:
        """Wire records matching `query` after `query.after`, and the cursor for the next page."""
        if query.model is not None:
            holders = self._by_model.get(query.model)
            if not holders:
                return [], None
            if len(holders) <= max_scan:
                source = sorted(h for h in holders if query.after is None or h > query.after)
                start = 0
            else:
                source = self._ids
                start = 0 if query.after is None else bisect.bisect_right(source, query.after)
        else:
            source = self._ids
            start = 0 if query.after is None else bisect.bisect_right(source, query.after)
        out: list[str] = []
        size = scanned = 0
        for i in range(start, len(source)):
            if len(out) >= query.limit or scanned >= max_scan or size >= max_bytes:
                return out, source[i - 1]
            node_id = source[i]
            scanned += 1
            stored = self._records.get(node_id)
            if stored is None or node_id == exclude or stored.expires <= now or stored.stealth:
                continue
            if query.model is not None and query.model not in stored.models:
                continue
            if query.sha256 is not None and query.sha256 not in stored.shas:
                continue
            if query.available and stored.paused:
                continue
            if size + len(stored.wire) > max_bytes:
                return out, source[i - 1] if i > start else None
            out.append(stored.wire)
            size += len(stored.wire) + 1
        return out, None

    def counts(self) -> dict:
        return {
            "records": len(self._records),
            "listable": len(self._ids),
            "stealth": len(self._records) - len(self._ids),
        }


# -- sessions ---------------------------------------------------------------------------------------
class _Session:
    def __init__(self, tracker: Tracker, ws, ip: str):
        st = tracker.settings
        self.tracker, self.ws, self.ip = tracker, ws, ip
        self.node_id: str | None = None
        self.key: bytes | None = None
        self.short = ip
        self.queue: deque = deque()
        self.queued_bytes = 0
        self.wakeup = asyncio.Event()
        self.writer: asyncio.Task | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self.strikes = 0
        self.buckets = {
            "announce": TokenBucket(st.announce_rate, max(st.announce_burst, 2 * st.announce_rate)),
            "list": TokenBucket(st.list_rate, max(st.list_burst, 2 * st.list_rate)),
            "other": TokenBucket(st.other_rate, max(st.other_burst, 2 * st.other_rate)),
        }
        self.relay_frames = TokenBucket(st.relay_rate, max(st.relay_burst, 2 * st.relay_rate))
        self.relay_bytes = TokenBucket(
            st.relay_bytes_rate, max(st.relay_bytes_burst, 2 * st.relay_bytes_rate, 2 * st.max_message)
        )
        self.refusals = TokenBucket(st.refusal_rate, st.refusal_burst)

    def push(self, data, *, droppable: bool) -> bool:
        """Queue a message for the writer. A droppable one (a relayed frame) is dropped when the queue is
        full; anything else that does not fit means the client does not read: the session is closed."""
        if self.close_code is not None:
            return False
        st = self.tracker.settings
        if len(self.queue) >= st.send_queue_messages or self.queued_bytes + len(data) > st.send_queue_bytes:
            if not droppable:
                self.fail(CLOSE_SLOW, "send queue overflow: the client reads too slowly")
            return False
        self.queue.append(data)
        self.queued_bytes += len(data)
        self.wakeup.set()
        return True

    def fail(self, code: int, reason: str) -> None:
        """Close this session from anywhere (another session's task included); the first reason wins."""
        if self.close_code is not None:
            return
        self.close_code, self.close_reason = code, reason
        log.info("closing session %s (%s): %s", self.short, self.ip, reason)
        self.tracker.spawn(self.ws.close(code, reason[:120]))

    async def write_loop(self) -> None:
        from websockets.exceptions import ConnectionClosed

        timeout = self.tracker.settings.write_timeout
        try:
            while True:
                while not self.queue:
                    self.wakeup.clear()
                    await self.wakeup.wait()
                data = self.queue.popleft()
                self.queued_bytes -= len(data)
                await asyncio.wait_for(self.ws.send(data), timeout)
        except TimeoutError:
            self.fail(CLOSE_SLOW, f"a send stalled for {timeout:g}s")
        except ConnectionClosed:
            pass


# -- the server -------------------------------------------------------------------------------------
class Tracker:
    def __init__(self, settings: TrackerSettings | None = None):
        self.settings = settings or TrackerSettings()
        self.store = RecordStore(self.settings.max_records, max_per_range=self.settings.max_records_per_range)
        self.sessions: dict[str, _Session] = {}  # authenticated, by node id
        self._by_key: dict[bytes, _Session] = {}
        self._per_ip: Counter = Counter()
        self._ip_new_records: dict[str, TokenBucket] = {}
        self._connections = 0
        self._tasks: set[asyncio.Task] = set()
        self.stats: Counter = Counter()
        self.started = time.time()
        self._server = None
        self._background: list[asyncio.Task] = []

    def spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        from websockets.asyncio.server import serve

        st = self.settings
        ssl_ctx = None
        if st.tls_cert:
            import ssl

            ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_ctx.load_cert_chain(st.tls_cert, st.tls_key)
        self._server = await serve(
            self._handle,
            st.host or None,
            st.port,
            process_request=self._precheck,
            compression=None,  # payloads are ciphertext; deflate would cost CPU and invite zip bombs
            max_size=st.max_message,
            max_queue=16,
            open_timeout=st.auth_timeout,
            ping_interval=30,
            ping_timeout=30,
            close_timeout=3,
            ssl=ssl_ctx,
            server_header=None,
        )
        sock = next(iter(self._server.sockets), None)
        if sock is not None and st.port == 0:
            st.port = sock.getsockname()[1]
        self._background = [
            asyncio.create_task(self._sweep_loop(), name="tracker-sweep"),
            asyncio.create_task(self._stats_loop(), name="tracker-stats"),
        ]
        log.info(
            "tracker listening on %s:%d, advertised as %s (max %d records, %d sessions per IP)",
            st.host,
            st.port,
            st.advertised_url(),
            st.max_records,
            st.max_sessions_per_ip,
        )
        if st.host in WILDCARD_HOSTS and not st.public_url:
            log.warning("no --public-url: clients sign the Host header they send; set it on a public tracker")

    async def stop(self) -> None:
        for task in self._background:
            task.cancel()
        if self._server is not None:
            self._server.close()  # closes every connection with 1001
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 10)
        log.info("tracker stopped (%d records held)", len(self.store))

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_secs)
            dropped = self.store.sweep(time.time())
            # A full bucket holds nothing worth remembering.
            for ip in [ip for ip, b in self._ip_new_records.items() if b.refill() >= b.burst]:
                del self._ip_new_records[ip]
            if dropped:
                self.stats["expired"] += dropped
                log.debug("dropped %d expired records", dropped)

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.stats_log_secs)
            counts = self.store.counts()
            log.info(
                "%d records (%d stealth), %d sessions; since start: %d announces, %d lists, %d relayed, "
                "%d refused, %d sessions closed for abuse",
                counts["records"],
                counts["stealth"],
                len(self.sessions),
                self.stats["announces"],
                self.stats["lists"],
                self.stats["relayed"],
                self.stats["refused"],
                self.stats["cut_off"],
            )

    # -- connections --------------------------------------------------------------------------------
    def _precheck(self, connection, request):
        """Before the upgrade: refuse cheaply when the IP or the tracker is at its session limit."""
        from http import HTTPStatus

        ip = _ip(connection)
        if self._connections >= self.settings.max_sessions:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "tracker full\n")
        if self._per_ip[ip] >= self.settings.max_sessions_per_ip:
            self.stats["refused_ip_limit"] += 1
            return connection.respond(HTTPStatus.TOO_MANY_REQUESTS, "too many sessions from this address\n")
        return None

    async def _handle(self, ws) -> None:
        from websockets.exceptions import ConnectionClosed

        st = self.settings
        ip = _ip(ws)
        # Checked again here: several upgrades from one IP may have passed the precheck together.
        if self._per_ip[ip] >= st.max_sessions_per_ip or self._connections >= st.max_sessions:
            await ws.close(CLOSE_TRY_LATER, "too many sessions")
            return
        self._per_ip[ip] += 1
        self._connections += 1
        session = _Session(self, ws, ip)
        try:
            if not await self._authenticate(session):
                return
            self._register(session)
            session.writer = asyncio.create_task(session.write_loop(), name=f"tracker-writer-{session.short}")
            session.push(
                dumps(
                    {
                        "type": "welcome",
                        "node_id": session.node_id,
                        "time": int(time.time()),
                        "limits": st.limits(),
                    }
                ),
                droppable=False,
            )
            await self._serve(session)
        except ConnectionClosed:
            pass
        except Exception as exc:  # noqa: BLE001 - one session's fault must never take the tracker down
            log.error("session %s failed: %s", session.short, type(exc).__name__)
            log.debug("session %s traceback", session.short, exc_info=exc)
            session.fail(1011, "internal error")
        finally:
            self._unregister(session)
            self._per_ip[ip] -= 1
            if self._per_ip[ip] <= 0:
                del self._per_ip[ip]
            self._connections -= 1
            if session.writer is not None:
                session.writer.cancel()
            session.queue.clear()
            if session.close_code is not None and ws.state.name != "CLOSED":
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(session.close_code, session.close_reason[:120]), 3)

    async def _authenticate(self, s: _Session) -> bool:
        from websockets.exceptions import ConnectionClosed

        host_header = s.ws.request.headers.get("Host") if s.ws.request is not None else None
        url = self.settings.advertised_url(host_header)
        nonce = secrets.token_bytes(CHALLENGE_BYTES)

        async def exchange() -> str:
            await s.ws.send(
                dumps(
                    {
                        "type": "challenge",
                        "v": PROTOCOL_VERSION,
                        "nonce": b64encode(nonce),
                        "tracker": url,
                        "time": int(time.time()),
                    }
                )
            )
            data = await s.ws.recv()
            if not isinstance(data, str):
                raise ProtocolError(E_AUTH_FAILED, "the first message must be the auth text message")
            return check_auth(parse_message(data), nonce, url)

        try:
            node_id = await asyncio.wait_for(exchange(), self.settings.auth_timeout)
        except TimeoutError:
            self.stats["auth_timeouts"] += 1
            log.info("session from %s did not authenticate within %gs", s.ip, self.settings.auth_timeout)
            await self._refuse_and_close(s, E_AUTH_TIMEOUT, "authentication timed out", CLOSE_TIMEOUT)
            return False
        except ProtocolError as exc:
            self.stats["auth_failures"] += 1
            log.info("refused authentication from %s: %s", s.ip, exc.message[:200])
            await self._refuse_and_close(
                s, exc.code if exc.code in _MALFORMED else E_AUTH_FAILED, exc.message, CLOSE_AUTH
            )
            return False
        except ConnectionClosed:
            return False
        s.node_id, s.key = node_id, public_key_from_node_id(node_id)
        s.short = node_id[:7]
        return True

    async def _refuse_and_close(self, s: _Session, code: str, message: str, close_code: int) -> None:
        from websockets.exceptions import ConnectionClosed

        s.close_code, s.close_reason = close_code, message
        with contextlib.suppress(ConnectionClosed, asyncio.TimeoutError, OSError):
            await asyncio.wait_for(s.ws.send(error_message(code, message)), 2)

    def _register(self, s: _Session) -> None:
        old = self.sessions.get(s.node_id)
        if old is not None:
            # One session per node id, so relays have one place to go; the newer one proved the key now.
            old.fail(CLOSE_REPLACED, "replaced by a newer session of the same node")
            self._by_key.pop(old.key, None)
        self.sessions[s.node_id] = s
        self._by_key[s.key] = s
        self.stats["sessions"] += 1
        log.debug("session %s authenticated from %s", s.short, s.ip)

    def _unregister(self, s: _Session) -> None:
        if s.node_id is not None and self.sessions.get(s.node_id) is s:
            del self.sessions[s.node_id]
            self._by_key.pop(s.key, None)
            log.debug("session %s closed", s.short)

    async def _serve(self, s: _Session) -> None:
        idle = self.settings.idle_timeout
        while s.close_code is None:
            try:
                data = await asyncio.wait_for(s.ws.recv(), idle)
            except TimeoutError:
                s.fail(CLOSE_TIMEOUT, f"idle for {idle:g}s")
                return
            if isinstance(data, str):
                self._on_text(s, data)
            else:
                self._on_binary(s, data)

    # -- refusals -----------------------------------------------------------------------------------
    def _refused(self, s: _Session, code: str, message: str, rid: int | None, *, malformed: bool) -> None:
        self.stats["refused"] += 1
        if malformed:
            s.strikes += 1
            if s.strikes >= self.settings.max_strikes:
                self.stats["cut_off"] += 1
                s.fail(CLOSE_PROTOCOL, f"{s.strikes} malformed messages (last: {message[:80]})")
                return
        if not s.refusals.take():
            self.stats["cut_off"] += 1
            s.fail(CLOSE_FLOOD, "too many refused messages: flooding")
            return
        s.push(error_message(code, message, rid), droppable=True)

    # -- text requests ------------------------------------------------------------------------------
    def _on_text(self, s: _Session, text: str) -> None:
        try:
            msg = parse_message(text)
        except ProtocolError as exc:
            self._refused(s, exc.code, exc.message, None, malformed=True)
            return
        kind, rid = msg["type"], request_id(msg)
        handler = self._handlers.get(kind)
        if handler is None:
            self._refused(s, E_UNKNOWN_TYPE, f"unknown message type {kind[:32]!r}", rid, malformed=False)
            return
        bucket = s.buckets.get(kind, s.buckets["other"])
        if not bucket.take():
            self._refused(s, E_RATE_LIMITED, f"too many {kind} requests; slow down", rid, malformed=False)
            return
        try:
            reply = handler(self, s, msg, rid)
        except ProtocolError as exc:
            self._refused(s, exc.code, exc.message, rid, malformed=exc.code in _MALFORMED)
            return
        s.push(reply, droppable=False)

    def _announce(self, s: _Session, msg: dict, rid: int | None) -> str:
        now = time.time()
        record = parse_record(msg.get("record"), now=now, skew=self.settings.clock_skew)
        if record.node_id != s.node_id:
            raise ProtocolError(E_NOT_YOURS, "a session announces only its own node id")
        source = address_range(s.ip)
        if record.node_id not in self.store and not self._ip_bucket(source).take():
            raise ProtocolError(E_RATE_LIMITED, "too many new records from this address range; try later")
        expires = self.store.put(record, now, source)
        self.stats["announces"] += 1
        return dumps({"type": "ok", "id": rid, "op": "announce", "expires_at": int(expires)})

    def _ip_bucket(self, ip: str) -> TokenBucket:
        bucket = self._ip_new_records.get(ip)
        if bucket is None:
            st = self.settings
            burst = max(st.ip_new_record_burst, 2 * st.ip_new_record_rate)
            bucket = self._ip_new_records[ip] = TokenBucket(st.ip_new_record_rate, burst)
        return bucket

    def _list(self, s: _Session, msg: dict, rid: int | None) -> str:
        query = ListQuery.from_message(msg)
        records, cursor = self.store.page(
            query,
            exclude=s.node_id,
            now=time.time(),
            max_scan=self.settings.max_scan,
            max_bytes=MAX_REPLY_BYTES - 1024,
        )
        self.stats["lists"] += 1
        return f'{{"type":"peers","id":{dumps(rid)},"records":[{",".join(records)}],"next":{dumps(cursor)}}}'

    def _leave(self, s: _Session, msg: dict, rid: int | None) -> str:
        removed = self.store.remove(s.node_id, time.time())
        self.stats["leaves"] += 1
        return dumps({"type": "ok", "id": rid, "op": "leave", "removed": removed})

    def _ping(self, s: _Session, msg: dict, rid: int | None) -> str:
        return dumps({"type": "pong", "id": rid, "time": int(time.time())})

    def _stats(self, s: _Session, msg: dict, rid: int | None) -> str:
        return dumps(
            {
                "type": "stats",
                "id": rid,
                **self.store.counts(),
                "sessions": len(self.sessions),
                "uptime_secs": int(time.time() - self.started),
            }
        )

    _handlers = {"announce": _announce, "list": _list, "leave": _leave, "ping": _ping, "stats": _stats}

    # -- relay --------------------------------------------------------------------------------------
    def _on_binary(self, s: _Session, data: bytes) -> None:
        try:
            kind, circuit, key, payload = decode_frame(data)
        except ProtocolError as exc:
            self._refused(s, exc.code, exc.message, None, malformed=True)
            return
        if kind != KIND_RELAY:
            self._refused(s, E_BAD_MESSAGE, "clients send relay frames (kind 1) only", None, malformed=True)
            return
        if not s.relay_frames.take() or not s.relay_bytes.take(len(payload)):
            self.stats["relay_refused"] += 1
            if s.refusals.take():
                s.push(encode_undeliverable(circuit, key, REASON_RATE_LIMITED), droppable=True)
            else:
                self.stats["cut_off"] += 1
                s.fail(CLOSE_FLOOD, "relaying far over the rate limit: flooding")
            return
        if key == s.key:
            s.push(encode_undeliverable(circuit, key, REASON_SELF), droppable=True)
            return
        dest = self._by_key.get(key)
        if dest is None or dest.close_code is not None:
            self.stats["relay_unreachable"] += 1
            s.push(encode_undeliverable(circuit, key, REASON_UNREACHABLE), droppable=True)
            return
        if dest.push(encode_deliver(circuit, s.key, payload), droppable=True):
            self.stats["relayed"] += 1
            self.stats["relayed_bytes"] += len(payload)
        else:
            self.stats["relay_congested"] += 1
            s.push(encode_undeliverable(circuit, key, REASON_CONGESTED), droppable=True)


def _ip(connection) -> str:
    addr = getattr(connection, "remote_address", None)
    return str(addr[0]) if addr else "?"


# -- process entry point ----------------------------------------------------------------------------
def configure_logging(level: str) -> None:
    from pinkybrain.node.services.node_log import configure

    configure(level)  # escaped, capped lines: nothing a client sends can forge one
    # websockets logs frame contents at DEBUG: never let relayed payloads reach the log.
    logging.getLogger("websockets").setLevel(logging.WARNING)


def run_tracker(
    settings: TrackerSettings, *, log_level: str = "info", on_ready: Callable[[dict], None] | None = None
) -> int:
    """Run until SIGTERM or SIGINT; exit status 0 after a clean stop. `on_ready` gets the bound address
    once the tracker listens (`tracker serve --json` prints it)."""
    configure_logging(log_level)

    async def main() -> None:
        tracker = Tracker(settings)
        await tracker.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        if on_ready is not None:  # after the handlers: whoever reads it may stop the tracker at once
            on_ready({"host": settings.host, "port": settings.port, "url": settings.advertised_url(),
                      "pid": os.getpid()})
        await stop.wait()
        await tracker.stop()

    try:
        asyncio.run(main())
    except OSError as exc:
        log.error("cannot serve on %s:%d: %s", settings.host, settings.port, exc.strerror or exc)
        return 1
    return 0
