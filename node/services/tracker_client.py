"""A node's side of the tracker protocol: authenticate, announce (and keep announcing), list peers, relay.

    client = TrackerClient("wss://tracker.pinkybrain.ai", identity, on_relay=..., on_circuit=...)
    await client.connect()                 # one attempt, raises TrackerError; then reconnects on its own
    # or: client.start(); await client.wait_connected(10)   # keeps trying in the background
    await client.announce({"addresses": ["ws://203.0.113.5:8080/p2p"], "models": [...],
                           "capacity": {...}, "stealth": False, "name": "box"}, ttl=300)
    peers = await client.list_peers(model="gemma3-270m-q4-k-m")     # verified AnnounceRecords
    await client.send_relay(node_id, b"...")                        # raw datagram (circuit 0)
    transport = client.open_relay(node_id)                          # a peer_link Transport over the relay
    await client.close(leave=True)

`announce` takes a dict or a callable returning one (re-read at every re-announce, so load and the guard
state stay current); the record is signed afresh and re-announced at half its TTL, and again after a
reconnect. Records from `list_peers` are verified here too: the tracker is not trusted, so a record it
altered is dropped, and stealth records are dropped even if a tracker listed them.

Relay circuits. `open_relay(node_id)` returns a RelayTransport with the interface of
peer_link.Transport (async send(bytes), recv() -> bytes, close(code, reason), `remote` = None), so a mesh
Link, its Noise handshake and its channel frames run over the relay unchanged; the tracker sees only
those ciphertexts. Each relay payload on a circuit starts with one op byte:

    0x01 DATA   the last (or only) fragment of one transport message
    0x02 MORE   a fragment; more of the same message follow
    0x03 CLOSE  close code (2, big-endian) | reason (UTF-8, at most 120 bytes)

Messages above the tracker's message size are cut into fragments and joined on the other side, up to
`max_frame` bytes. The node that opens a circuit picks its number (1 to 2**31-1); the other side answers
with the top bit set, so both ends may open circuits to each other without a clash. A frame on an unknown
circuit from its opener is a new inbound circuit: it is handed to `on_circuit(transport)` (the mesh's
`accept`), or refused with CLOSE when there is no such callback or the circuit limits are reached.
Circuit 0 carries raw datagrams for `send_relay` / `on_relay(from_id, payload)`.

When the tracker connection drops, every circuit closes (their peers' heartbeats notice the same), pending
requests fail with TrackerUnavailable, and the client reconnects with exponential backoff and jitter.
A session closed because the same node id logged in elsewhere (4409) is not resumed: that would make two
instances of one node evict each other forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import struct
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from pinkybrain.node.core.identity import Identity, IdentityError, validate_node_id
from pinkybrain.node.core.tracker_protocol import (
    CHALLENGE_BYTES,
    CLOSE_REPLACED,
    CLOSE_TRY_LATER,
    KIND_DELIVER,
    KIND_UNDELIVERABLE,
    LIST_DEFAULT_LIMIT,
    MAX_MESSAGE_BYTES,
    MAX_REPLY_BYTES,
    REASON_SELF,
    REASON_UNREACHABLE,
    RELAY_HEADER,
    UNDELIVERABLE_REASONS,
    AnnounceRecord,
    ListQuery,
    ProtocolError,
    auth_message,
    b64decode,
    canonical_tracker_url,
    decode_frame,
    dumps,
    encode_relay,
    key_to_node_id,
    node_id_to_key,
    parse_message,
    parse_record,
)
from pinkybrain.node.services.peer_link import CLOSE_NORMAL, CLOSE_PROTOCOL, TransportClosed

log = logging.getLogger("pinkybrain.tracker.client")
_rng = random.SystemRandom()

OP_DATA = 0x01
OP_MORE = 0x02
OP_CLOSE = 0x03
RESPONDER_BIT = 0x80000000
MAX_CIRCUIT_ID = RESPONDER_BIT - 1
REFRESH_FRACTION = 0.5  # re-announce when half the TTL has passed: one lost announce never expires us


class TrackerError(Exception):
    """A tracker refusal or failure; `code` is the protocol's error code (or a client-side one)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


class TrackerUnavailable(TrackerError):
    """Not connected, or the connection dropped before the reply came."""


class TrackerAuthError(TrackerError):
    """The tracker refused our proof of identity, or we refused its challenge."""


def _reason_name(reason: int) -> str:
    return UNDELIVERABLE_REASONS.get(reason, f"reason {reason}")


# -- relay circuits ---------------------------------------------------------------------------------
class RelayTransport:
    """One circuit to one node through the tracker, with peer_link.Transport's interface."""

    remote = None  # no network address: the peer may be stealthy, and the tracker is not the peer

    def __init__(self, client: TrackerClient, peer_key: bytes, circuit: int, *, initiator: bool):
        self.client = client
        self.peer_key = peer_key
        self.peer_id = key_to_node_id(peer_key)
        self.circuit = circuit
        self.initiator = initiator
        self._wire = circuit if initiator else circuit | RESPONDER_BIT
        self._queue: deque[bytes] = deque()
        self._ready = asyncio.Event()
        self._parts: list[bytes] = []
        self._parts_len = 0
        self._closed: TransportClosed | None = None
        self._send_lock = asyncio.Lock()
        self.stats: Counter = Counter()

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def _gone(self) -> TransportClosed:
        return TransportClosed(self._closed.code, self._closed.reason)

    async def send(self, data: bytes) -> None:
        if self._closed is not None:
            raise self._gone()
        chunk = self.client.max_relay_payload - 1
        data = bytes(data)
        # One lock per circuit: fragments of two messages must never interleave.
        async with self._send_lock:
            for off in range(0, max(len(data), 1), chunk):
                part = data[off : off + chunk]
                op = OP_DATA if off + chunk >= len(data) else OP_MORE
                try:
                    await self.client._send_frame(self.peer_key, self._wire, bytes((op,)) + part)
                except TrackerError as exc:
                    self._shutdown(1006, f"tracker connection lost ({exc.code})")
                    raise self._gone() from None
                if self._closed is not None:
                    raise self._gone()
        self.stats["frames_out"] += 1
        self.stats["bytes_out"] += len(data)

    async def recv(self) -> bytes:
        while not self._queue:
            if self._closed is not None:
                raise self._gone()
            self._ready.clear()
            await self._ready.wait()
        return self._queue.popleft()

    async def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        if self._closed is not None:
            return
        self._shutdown(code, reason)
        await self.client._send_close(self.peer_key, self._wire, code, reason)

    # -- from the client's reader ------------------------------------------------------------------
    def _feed(self, op: int, data: memoryview) -> None:
        if self._closed is not None:
            return
        if op == OP_CLOSE:
            code, reason = 1000, ""
            if len(data) >= 2:
                (code,) = struct.unpack_from(">H", data)
                reason = bytes(data[2:122]).decode("utf-8", "replace")
            self._shutdown(code, reason)
            return
        if op not in (OP_DATA, OP_MORE):
            self.stats["rejected"] += 1
            return
        if self._parts_len + len(data) > self.client.max_frame:
            self._abort(CLOSE_PROTOCOL, "relayed message over the size limit")
            return
        self._parts.append(bytes(data))
        self._parts_len += len(data)
        if op == OP_MORE:
            return
        message = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        self._parts, self._parts_len = [], 0
        if len(self._queue) >= self.client.max_circuit_queue:
            self._abort(CLOSE_PROTOCOL, "receiver overwhelmed")
            return
        self._queue.append(message)
        self.stats["frames_in"] += 1
        self.stats["bytes_in"] += len(message)
        self._ready.set()

    def _shutdown(self, code: int, reason: str) -> None:
        if self._closed is None:
            self._closed = TransportClosed(code, reason)
            self._ready.set()
            self.client._forget(self)

    def _abort(self, code: int, reason: str) -> None:
        self._shutdown(code, reason)
        self.client._spawn(self.client._send_close(self.peer_key, self._wire, code, reason))


# -- the client -------------------------------------------------------------------------------------
class TrackerClient:
    def __init__(
        self,
        url: str,
        identity: Identity,
        *,
        on_relay: Callable[[str, bytes], Any] | None = None,
        on_circuit: Callable[[RelayTransport], Any] | None = None,
        on_undeliverable: Callable[[str, int, str], Any] | None = None,
        reconnect: bool = True,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        max_attempts: int | None = None,
        connect_timeout: float = 10.0,
        request_timeout: float = 10.0,
        ssl=None,
        proxy: str | bool | None = True,
        max_circuits: int = 64,
        max_circuits_per_peer: int = 4,
        max_frame: int = 2 * 1024 * 1024,
        max_circuit_queue: int = 1024,
    ):
        self.url = canonical_tracker_url(url)
        self.identity = identity
        self.on_relay, self.on_circuit, self.on_undeliverable = on_relay, on_circuit, on_undeliverable
        self.reconnect = reconnect
        self.backoff_base, self.backoff_max, self.max_attempts = backoff_base, backoff_max, max_attempts
        self.connect_timeout, self.request_timeout = connect_timeout, request_timeout
        self._ssl, self._proxy = ssl, proxy
        self.max_circuits, self.max_circuits_per_peer = max_circuits, max_circuits_per_peer
        self.max_frame, self.max_circuit_queue = max_frame, max_circuit_queue
        self.limits: dict = {}
        self.record: AnnounceRecord | None = None
        self.stats: Counter = Counter()
        self.last_close: tuple[int | None, str] = (None, "")
        self._ws = None
        self._reader: asyncio.Task | None = None
        self._supervisor: asyncio.Task | None = None
        self._keeper: asyncio.Task | None = None
        self._connected = asyncio.Event()
        self._closed = False
        self._pending: dict[int, asyncio.Future] = {}
        self._next_id = 0
        self._source: dict | Callable[[], dict] | None = None
        self._ttl = 300
        self._left = False
        self._last_seq = 0
        self._next_announce = float("inf")
        self._last_send = time.monotonic()
        self._circuits: dict[tuple[bytes, int, bool], RelayTransport] = {}
        self._per_peer: Counter = Counter()
        self._ids: dict[bytes, str] = {}
        self._tasks: set[asyncio.Task] = set()

    # -- properties --------------------------------------------------------------------------------
    @property
    def node_id(self) -> str:
        return self.identity.node_id

    @property
    def connected(self) -> bool:
        return self._ws is not None and self._connected.is_set()

    @property
    def max_relay_payload(self) -> int:
        return int(self.limits.get("max_message", MAX_MESSAGE_BYTES)) - RELAY_HEADER.size

    # -- connecting --------------------------------------------------------------------------------
    async def connect(self) -> None:
        """Connect and authenticate once (raises TrackerError); afterwards reconnect in the background."""
        if self._closed:
            raise TrackerError("closed", "this client was closed")
        if not self.connected:
            await self._open()
        self._ensure_tasks()

    def start(self) -> None:
        """Connect in the background, retrying with backoff; never raises (see wait_connected)."""
        if self._closed:
            raise TrackerError("closed", "this client was closed")
        self._ensure_tasks()

    async def wait_connected(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _ensure_tasks(self) -> None:
        if self._supervisor is None:
            self._supervisor = asyncio.create_task(self._supervise(), name="tracker-client-supervisor")
        if self._keeper is None:
            self._keeper = asyncio.create_task(self._keep(), name="tracker-client-keeper")

    async def _open(self) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

        # websockets refuses ssl=None for wss://; here None means "the default TLS context".
        ssl = True if self._ssl is None and self.url.startswith("wss://") else self._ssl
        try:
            ws = await asyncio.wait_for(
                connect(
                    self.url,
                    open_timeout=self.connect_timeout,
                    compression=None,
                    max_size=MAX_REPLY_BYTES + 4096,
                    max_queue=64,
                    ping_interval=20,
                    ping_timeout=20,
                    close_timeout=3,
                    ssl=ssl,
                    proxy=self._proxy,
                    user_agent_header=None,
                ),
                self.connect_timeout,
            )
        except (TimeoutError, OSError, InvalidHandshake, InvalidURI) as exc:
            raise TrackerUnavailable(
                "unreachable", f"cannot reach the tracker at {self.url}: {_describe(exc)}"
            ) from None
        try:
            welcome = await asyncio.wait_for(self._login(ws), self.connect_timeout)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 3)
            if isinstance(exc, asyncio.TimeoutError):
                raise TrackerUnavailable(
                    "timeout", "the tracker did not complete the login in time"
                ) from None
            if isinstance(exc, ConnectionClosed):
                raise TrackerUnavailable(
                    "closed", f"the tracker closed the connection during login ({_closed(ws)})"
                ) from None
            raise
        limits = welcome.get("limits")
        self.limits = limits if isinstance(limits, dict) else {}
        server_time = welcome.get("time")
        if isinstance(server_time, int) and abs(server_time - time.time()) > 60:
            log.warning(
                "this clock is %+ds off the tracker's: records may be refused", time.time() - server_time
            )
        self._ws = ws
        self._last_send = time.monotonic()
        self._reader = asyncio.create_task(self._read_loop(ws), name="tracker-client-reader")
        self._connected.set()
        self.stats["connects"] += 1
        log.info("connected to tracker %s as %s", self.url, self.node_id[:7])

    async def _login(self, ws) -> dict:
        raw = await ws.recv()
        try:
            challenge = parse_message(raw) if isinstance(raw, str) else {}
        except ProtocolError:
            challenge = {}
        if challenge.get("type") != "challenge":
            raise TrackerAuthError("bad_challenge", "the server did not open with a tracker challenge")
        try:
            nonce = b64decode(challenge.get("nonce"), CHALLENGE_BYTES)
            advertised = canonical_tracker_url(challenge.get("tracker"))
        except (ProtocolError, ValueError):
            raise TrackerAuthError("bad_challenge", "the tracker's challenge is malformed") from None
        if advertised != self.url:
            # Signing would let that server log in elsewhere as us: refuse.
            raise TrackerAuthError(
                "url_mismatch",
                f"the server calls itself {advertised} but {self.url} was dialled; not signing",
            )
        await ws.send(auth_message(self.identity, nonce, self.url))
        raw = await ws.recv()
        try:
            reply = parse_message(raw) if isinstance(raw, str) else {}
        except ProtocolError:
            reply = {}
        if reply.get("type") == "error":
            raise TrackerAuthError(str(reply.get("code"))[:64], str(reply.get("message"))[:300])
        if reply.get("type") != "welcome" or reply.get("node_id") != self.node_id:
            raise TrackerAuthError("bad_welcome", "the tracker did not confirm our node id")
        return reply

    def _backoff(self, failures: int) -> float:
        return min(self.backoff_max, self.backoff_base * 2 ** min(failures, 20)) * _rng.uniform(0.5, 1.0)

    async def _supervise(self) -> None:
        failures = 0
        while not self._closed:
            if self._reader is not None and not self._reader.done():
                await asyncio.wait({self._reader})
            if self._closed:
                return
            if self.stats["connects"] and not self.reconnect:
                return
            if self.last_close[0] == CLOSE_REPLACED:
                log.warning(
                    "the tracker session was taken over by another login of this node; not reconnecting"
                )
                return
            while not self._closed and not self.connected:
                if self.stats["connects"] or failures:
                    await asyncio.sleep(self._backoff(failures))
                try:
                    await self._open()
                    failures = 0
                except TrackerError as exc:
                    failures += 1
                    self.stats["connect_failures"] += 1
                    level = logging.WARNING if isinstance(exc, TrackerAuthError) else logging.INFO
                    log.log(level, "tracker %s: %s (attempt %d)", self.url, exc.message, failures)
                    if self.max_attempts is not None and failures >= self.max_attempts:
                        log.error("giving up on tracker %s after %d attempts", self.url, failures)
                        return
            if self.connected and self._source is not None and not self._left:
                with contextlib.suppress(TrackerError):
                    await self._announce_now()

    async def _keep(self) -> None:
        """Re-announce before expiry and ping when idle, so the tracker never times the session out."""
        while not self._closed:
            if not self.connected:
                await self._connected.wait()
                continue
            idle = float(self.limits.get("idle_timeout", 300)) / 3
            now = time.monotonic()
            due_ping = self._last_send + idle
            wait = max(0.2, min(self._next_announce, due_ping) - now)
            await asyncio.sleep(min(wait, 30.0))
            now = time.monotonic()
            try:
                if self._source is not None and not self._left and now >= self._next_announce:
                    await self._announce_now()
                elif now >= self._last_send + idle:
                    await self._request({"type": "ping"})
            except TrackerError as exc:
                # Try again soon, but not in a tight loop.
                if self._source is not None and not self._left:
                    self._next_announce = min(self._next_announce, time.monotonic() + 5.0)
                log.info("tracker keep-alive failed: %s", exc.message)
                await asyncio.sleep(1.0)

    # -- reading -----------------------------------------------------------------------------------
    async def _read_loop(self, ws) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for data in ws:
                if isinstance(data, str):
                    self._on_text(data)
                else:
                    await self._on_binary(data)
        except ConnectionClosed:
            pass
        except Exception as exc:  # noqa: BLE001 - a bad frame or callback must not leave us half-connected
            log.error("tracker reader failed: %s", type(exc).__name__)
            log.debug("tracker reader traceback", exc_info=exc)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 3)
        finally:
            self._lost(ws)

    def _lost(self, ws) -> None:
        if self._ws is not ws:
            return
        self._ws = None
        self._connected.clear()
        self.last_close = (ws.close_code, ws.close_reason or "")
        why = _closed(ws)
        if not self._closed:
            log.info("lost the tracker connection (%s)", why)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(
                    TrackerUnavailable("disconnected", f"the tracker connection closed ({why})")
                )
        for transport in list(self._circuits.values()):
            transport._shutdown(1006, "the tracker connection closed")

    def _on_text(self, text: str) -> None:
        try:
            msg = parse_message(text)
        except ProtocolError:
            self.stats["bad_messages"] += 1
            return
        fut = self._pending.get(msg.get("id")) if msg.get("id") is not None else None
        if msg["type"] == "error":
            code, message = str(msg.get("code"))[:64], str(msg.get("message"))[:300]
            if fut is not None and not fut.done():
                fut.set_exception(TrackerError(code, message))
            else:
                log.warning("tracker error: %s: %s", code, message)
            return
        if fut is not None and not fut.done():
            fut.set_result(msg)

    async def _on_binary(self, data: bytes) -> None:
        try:
            kind, circuit, key, payload = decode_frame(data)
        except ProtocolError:
            self.stats["bad_frames"] += 1
            return
        if kind == KIND_DELIVER:
            self.stats["relay_in"] += 1
            if circuit == 0:
                if self.on_relay is not None:
                    result = self.on_relay(self._id_of(key), bytes(payload))
                    if inspect.isawaitable(result):
                        await result  # the callback's pace is the reader's: backpressure, not a queue
                return
            self._on_circuit_frame(key, circuit, payload)
        elif kind == KIND_UNDELIVERABLE:
            reason = payload[0] if len(payload) else 0
            self.stats[f"undeliverable_{_reason_name(reason)}"] += 1
            if circuit and reason in (REASON_UNREACHABLE, REASON_SELF):
                mine = not (circuit & RESPONDER_BIT)
                transport = self._circuits.get((key, circuit & MAX_CIRCUIT_ID, mine))
                if transport is not None:
                    transport._shutdown(1006, f"relay to the peer failed: {_reason_name(reason)}")
            if self.on_undeliverable is not None:
                self.on_undeliverable(self._id_of(key), circuit, _reason_name(reason))
        else:
            self.stats["bad_frames"] += 1

    def _on_circuit_frame(self, key: bytes, wire: int, payload: memoryview) -> None:
        if not len(payload):
            self.stats["bad_frames"] += 1
            return
        op, body = payload[0], payload[1:]
        # The top bit says the sender answers on a circuit that we opened.
        mine = bool(wire & RESPONDER_BIT)
        circuit = wire & MAX_CIRCUIT_ID
        transport = self._circuits.get((key, circuit, mine))
        if transport is None:
            if mine or op == OP_CLOSE:
                return  # traffic for a circuit we already closed
            if (
                self.on_circuit is None
                or len(self._circuits) >= self.max_circuits
                or self._per_peer[key] >= self.max_circuits_per_peer
            ):
                self.stats["circuits_refused"] += 1
                self._spawn(
                    self._send_close(
                        key, wire | RESPONDER_BIT, CLOSE_TRY_LATER, "not accepting relayed links"
                    )
                )
                return
            transport = RelayTransport(self, key, circuit, initiator=False)
            self._register(transport)
            transport._feed(op, body)
            self.stats["circuits_in"] += 1
            result = self.on_circuit(transport)
            if inspect.isawaitable(result):
                self._spawn(result)
            return
        transport._feed(op, body)

    # -- sending -----------------------------------------------------------------------------------
    async def _send(self, data) -> None:
        from websockets.exceptions import ConnectionClosed

        ws = self._ws
        if ws is None:
            raise TrackerUnavailable("disconnected", "not connected to the tracker")
        try:
            await ws.send(data)
        except ConnectionClosed:
            raise TrackerUnavailable("disconnected", "the tracker connection closed") from None
        self._last_send = time.monotonic()

    async def _send_frame(self, key: bytes, wire: int, payload: bytes) -> None:
        if len(payload) > self.max_relay_payload:
            raise TrackerError(
                "too_large", f"relay payload of {len(payload)} bytes is over {self.max_relay_payload}"
            )
        await self._send(encode_relay(wire, key, payload))
        self.stats["relay_out"] += 1

    async def _send_close(self, key: bytes, wire: int, code: int, reason: str) -> None:
        payload = bytes((OP_CLOSE,)) + struct.pack(">H", code & 0xFFFF) + reason.encode()[:120]
        with contextlib.suppress(TrackerError, asyncio.TimeoutError):
            await asyncio.wait_for(self._send_frame(key, wire, payload), 3)

    async def _request(self, msg: dict) -> dict:
        self._next_id += 1
        rid = self._next_id
        msg["id"] = rid
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await self._send(dumps(msg))
            return await asyncio.wait_for(fut, self.request_timeout)
        except TimeoutError:
            raise TrackerError(
                "timeout", f"no answer to {msg['type']} within {self.request_timeout:g}s"
            ) from None
        finally:
            self._pending.pop(rid, None)

    # -- records -----------------------------------------------------------------------------------
    async def announce(
        self, fields: dict | Callable[[], dict] | None = None, *, ttl: int = 300
    ) -> AnnounceRecord:
        """Sign and announce this node's record (fields: addresses, models, capacity, stealth, name);
        it is re-announced at half its TTL and after reconnects until `leave()` or `close()`."""
        if fields is not None:
            self._source, self._ttl = fields, int(ttl)
        if self._source is None:
            raise ValueError("nothing to announce yet: pass the record fields")
        self._left = False
        return await self._announce_now()

    async def _announce_now(self) -> AnnounceRecord:
        fields = self._source() if callable(self._source) else dict(self._source)
        # Milliseconds since the epoch keep sequence numbers rising across restarts without a state file.
        seq = max(self._last_seq + 1, time.time_ns() // 1_000_000)
        self._last_seq = seq
        record = AnnounceRecord.build(self.identity, seq=seq, ttl=self._ttl, **fields)
        await self._request({"type": "announce", "record": record.to_wire()})
        self.record = record
        self._next_announce = time.monotonic() + self._ttl * REFRESH_FRACTION
        self.stats["announces"] += 1
        return record

    async def leave(self) -> bool:
        """Withdraw this node's record now (and stop re-announcing it); True if the tracker held one."""
        self._left = True
        self._next_announce = float("inf")
        reply = await self._request({"type": "leave"})
        return bool(reply.get("removed"))

    async def list_peers(
        self,
        *,
        model: str | None = None,
        sha256: str | None = None,
        available: bool | None = None,
        limit: int = LIST_DEFAULT_LIMIT,
        max_records: int = 1000,
        max_pages: int = 200,
    ) -> list[AnnounceRecord]:
        """Peers the tracker lists, each record verified here; never this node, never a stealth record."""
        out: dict[str, AnnounceRecord] = {}
        after = None
        for _ in range(max_pages):
            msg = ListQuery(model, sha256, available, limit, after).to_message(0)
            reply = await self._request(msg)
            now = time.time()
            records = reply.get("records")
            for obj in records if isinstance(records, list) else ():
                try:
                    record = parse_record(obj, now=now)
                except ProtocolError:
                    self.stats["bad_records"] += 1
                    continue
                if record.stealth or record.node_id == self.node_id:
                    continue
                out[record.node_id] = record
            after = reply.get("next")
            if not isinstance(after, str) or len(out) >= max_records:
                break
        return list(out.values())[:max_records]

    async def ping(self) -> float:
        """Round trip to the tracker in seconds."""
        start = time.perf_counter()
        await self._request({"type": "ping"})
        return time.perf_counter() - start

    async def tracker_stats(self) -> dict:
        return await self._request({"type": "stats"})

    # -- relay -------------------------------------------------------------------------------------
    async def send_relay(self, to_node_id: str, payload: bytes, *, circuit: int = 0) -> None:
        """Send one raw datagram to a node through the tracker (it reaches that node's `on_relay`).
        Delivery is best effort: an unreachable or congested peer is reported to `on_undeliverable`."""
        await self._send_frame(self._key_of(to_node_id), circuit, bytes(payload))

    def open_relay(self, node_id: str) -> RelayTransport:
        """A new circuit to `node_id`, ready to carry a mesh link (run the initiator's handshake on it)."""
        key = self._key_of(node_id)
        if key == self.identity.public_key:
            raise ValueError("a relay circuit to this node itself")
        if len(self._circuits) >= self.max_circuits or self._per_peer[key] >= self.max_circuits_per_peer:
            raise TrackerError("too_many_circuits", "circuit limit reached")
        while True:
            circuit = _rng.randint(1, MAX_CIRCUIT_ID)
            if (key, circuit, True) not in self._circuits:
                break
        transport = RelayTransport(self, key, circuit, initiator=True)
        self._register(transport)
        self.stats["circuits_out"] += 1
        return transport

    def circuits(self) -> list[RelayTransport]:
        return list(self._circuits.values())

    def _register(self, transport: RelayTransport) -> None:
        self._circuits[(transport.peer_key, transport.circuit, transport.initiator)] = transport
        self._per_peer[transport.peer_key] += 1

    def _forget(self, transport: RelayTransport) -> None:
        ident = (transport.peer_key, transport.circuit, transport.initiator)
        if self._circuits.get(ident) is transport:
            del self._circuits[ident]
            self._per_peer[transport.peer_key] -= 1
            if self._per_peer[transport.peer_key] <= 0:
                del self._per_peer[transport.peer_key]

    def _key_of(self, node_id: str) -> bytes:
        try:
            return node_id_to_key(validate_node_id(node_id))
        except IdentityError as exc:
            raise ValueError(str(exc)) from None

    def _id_of(self, key: bytes) -> str:
        node_id = self._ids.get(key)
        if node_id is None:
            if len(self._ids) > 4096:
                self._ids.clear()
            node_id = self._ids[key] = key_to_node_id(key)
        return node_id

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- closing -----------------------------------------------------------------------------------
    async def close(self, *, leave: bool = False) -> None:
        """Stop reconnecting, close every circuit and the connection (withdrawing the record if asked)."""
        if leave and self.connected:
            with contextlib.suppress(TrackerError):
                await self.leave()
        self._closed = True
        for task in (self._supervisor, self._keeper):
            if task is not None:
                task.cancel()
        for transport in list(self._circuits.values()):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(transport.close(1001, "going away"), 1)
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 3)
            self._lost(ws)
        for task in (self._reader, self._supervisor, self._keeper, *self._tasks):
            if task is not None and not task.done():
                task.cancel()
        tasks = [t for t in (self._reader, self._supervisor, self._keeper, *self._tasks) if t is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=3)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(TrackerUnavailable("closed", "the client was closed"))

    async def __aenter__(self) -> TrackerClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def _closed(ws) -> str:
    code, reason = getattr(ws, "close_code", None), getattr(ws, "close_reason", None) or ""
    return f"{code}{': ' + reason if reason else ''}" if code is not None else "no close frame"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


__all__ = [
    "RelayTransport",
    "TrackerAuthError",
    "TrackerClient",
    "TrackerError",
    "TrackerUnavailable",
]
