"""The tracker as a real process (`python -m pinkybrain tracker serve`) with clients in the test process:
authentication, signed records (listing, stealth, expiry, sequence numbers, forgeries), the relay (raw
datagrams and a peer_link-style circuit), and clients that misbehave while a good one keeps working."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from nodes import free_port
from pinkybrain.node.core.identity import Identity
from pinkybrain.node.core.tracker_protocol import (
    CLOSE_AUTH,
    CLOSE_FLOOD,
    CLOSE_PROTOCOL,
    CLOSE_REPLACED,
    CLOSE_TIMEOUT,
    CLOSE_TRY_LATER,
    RECORD_DOMAIN,
    AnnounceRecord,
    auth_message,
    b64decode,
    b64encode,
    canonical_json,
    encode_relay,
)
from pinkybrain.node.services.peer_link import TransportClosed
from pinkybrain.node.services.tracker_client import (
    TrackerAuthError,
    TrackerClient,
    TrackerError,
    TrackerUnavailable,
)

AUTH_TIMEOUT = 1.5


@dataclass
class TrackerProc:
    proc: subprocess.Popen
    port: int
    log_path: Path
    args: list

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def start_tracker(log_path: Path, *extra: str, port: int | None = None) -> TrackerProc:
    port = port or free_port()
    args = [
        sys.executable, "-m", "pinkybrain", "tracker", "serve", "--host", "127.0.0.1", "--port", str(port),
        "--log-level", "debug", "--auth-timeout", str(AUTH_TIMEOUT), *extra,
    ]  # fmt: skip
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    tracker = TrackerProc(proc, port, log_path, args)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tracker exited with {proc.returncode}:\n{tracker.log()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return tracker
        time.sleep(0.05)
    tracker.stop()
    raise RuntimeError(f"tracker did not listen within 30s:\n{tracker.log()}")


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    t = start_tracker(tmp_path_factory.mktemp("tracker") / "tracker.log")
    yield t
    assert t.stop() == 0, t.log()


@pytest.fixture
async def clients(tracker):
    """Make TrackerClients for the shared tracker; all are closed when the test ends."""
    made: list[TrackerClient] = []

    async def make(identity: Identity | None = None, url: str | None = None, **kw) -> TrackerClient:
        kw.setdefault("backoff_base", 0.2)
        kw.setdefault("request_timeout", 5)
        client = TrackerClient(url or tracker.url, identity or Identity.generate(), **kw)
        made.append(client)
        await client.connect()
        return client

    yield make
    for c in made:
        await c.close()


def fields(model: str, *, stealth: bool = False, name: str = "n", paused: bool = False) -> dict:
    return {
        "addresses": [] if stealth else [f"ws://192.0.2.{secrets.randbelow(250) + 1}:8080/p2p"],
        "models": [{"name": model, "sha256": "ab" * 32}],
        "capacity": {"cpu_cores": 4, "ram_mb": 8192, "cpu_percent": 10, "ram_percent": 40, "paused": paused},
        "stealth": stealth,
        "name": name,
    }


async def raw_session(url: str, identity: Identity, **kw):
    """A bare authenticated WebSocket (no client logic), for sending exactly what a test wants."""
    ws = await ws_connect(url, compression=None, proxy=None, max_size=2**21, **kw)
    challenge = json.loads(await asyncio.wait_for(ws.recv(), 5))
    await ws.send(auth_message(identity, b64decode(challenge["nonce"]), url))
    welcome = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert welcome["type"] == "welcome", welcome
    return ws


async def ask(ws, msg: dict) -> dict:
    await ws.send(json.dumps(msg))
    return json.loads(await asyncio.wait_for(ws.recv(), 5))


async def closed_with(ws, timeout: float = 10) -> int | None:
    """Drain until the tracker closes the connection; the close code it sent."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic()))
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd else None
    except TimeoutError:
        pytest.fail("the tracker did not close the connection")
    pytest.fail("the tracker did not close the connection")


async def flood(ws, messages: list) -> tuple[int | None, list]:
    """Send everything without reading (stopping if the tracker hangs up), then read until it closes:
    the close code and whatever was answered before."""
    with contextlib.suppress(ConnectionClosed):
        for m in messages:
            await ws.send(m)
    replies = []
    try:
        while True:
            replies.append(await asyncio.wait_for(ws.recv(), 10))
    except ConnectionClosed as exc:
        return (exc.rcvd.code if exc.rcvd else None), replies
    except TimeoutError:
        pytest.fail("the tracker did not close a flooding connection")


def names(records) -> set[str]:
    return {r.name for r in records}


# -- authentication ---------------------------------------------------------------------------------
async def test_auth_wrong_signature_is_refused(tracker, clients):
    me, other = Identity.generate(), Identity.generate()
    async with ws_connect(tracker.url, proxy=None) as ws:
        challenge = json.loads(await ws.recv())
        assert challenge["type"] == "challenge" and challenge["tracker"] == tracker.url
        nonce = b64decode(challenge["nonce"])
        forged = json.loads(auth_message(other, nonce, tracker.url))
        forged["node_id"] = me.node_id  # claims my id, signed with another key
        await ws.send(json.dumps(forged))
        reply = json.loads(await ws.recv())
        assert reply["type"] == "error" and reply["code"] == "auth_failed"
        assert await closed_with(ws) == CLOSE_AUTH

    # A signature for another tracker's URL is no good here (relayed challenges cannot log in).
    async with ws_connect(tracker.url, proxy=None) as ws:
        nonce = b64decode(json.loads(await ws.recv())["nonce"])
        await ws.send(auth_message(me, nonce, "wss://elsewhere.example:443"))
        assert json.loads(await ws.recv())["code"] == "auth_failed"
        assert await closed_with(ws) == CLOSE_AUTH

    # An old answer cannot be replayed: every connection gets a fresh nonce.
    async with ws_connect(tracker.url, proxy=None) as ws:
        await ws.recv()
        await ws.send(auth_message(me, nonce, tracker.url))
        assert json.loads(await ws.recv())["code"] == "auth_failed"

    # And the client refuses to sign a challenge naming a URL other than the one it dialled.
    with pytest.raises(TrackerAuthError) as err:
        await clients(url=f"ws://localhost:{tracker.port}")
    assert err.value.code == "url_mismatch"

    good = await clients(me)
    assert good.connected and await good.ping() < 5
    assert "refused authentication" in tracker.log()


async def test_second_login_replaces_the_first(tracker, clients):
    me = Identity.generate()
    first = await clients(me)
    second = await clients(me)
    for _ in range(100):
        if not first.connected:
            break
        await asyncio.sleep(0.05)
    assert not first.connected and first.last_close[0] == CLOSE_REPLACED
    await asyncio.sleep(0.5)  # a replaced client does not fight back
    assert not first.connected and second.connected
    assert await second.ping() < 5


# -- records ----------------------------------------------------------------------------------------
async def test_announce_and_list_keep_stealth_nodes_hidden_but_reachable(tracker, clients):
    model = f"model-{secrets.token_hex(4)}"
    got: asyncio.Queue = asyncio.Queue()
    a, b = await clients(), await clients()
    paused = await clients()
    stealthy = await clients(on_relay=lambda sender, payload: got.put_nowait((sender, payload)))
    asker = await clients()
    await a.announce(fields(model, name="a"), ttl=60)
    await b.announce(fields(model, name="b"), ttl=60)
    await paused.announce(fields(model, name="paused", paused=True), ttl=60)
    record = await stealthy.announce(fields(model, name="stealthy", stealth=True), ttl=60)
    assert record.stealth and record.addresses == ()

    listed = await asker.list_peers(model=model)
    assert names(listed) == {"a", "b", "paused"}
    assert all(r.verify() and r.addresses for r in listed)
    assert names(await asker.list_peers(model=model, available=True)) == {"a", "b"}
    assert names(await asker.list_peers(sha256="ab" * 32, max_records=100_000)) >= {"a", "b", "paused"}
    assert names(await a.list_peers(model=model)) == {"b", "paused"}  # never yourself
    assert names(await stealthy.list_peers(model=model)) == {"a", "b", "paused"}  # a stealth node may list

    # The tracker keeps the stealth record (a member) but no list carries it, page by page either.
    stats = await asker.tracker_stats()
    assert stats["stealth"] >= 1
    pages, after = [], None
    ws = await raw_session(tracker.url, Identity.generate())
    try:
        while True:
            msg = {"type": "list", "id": 1, "model": model, "limit": 1, **({"after": after} if after else {})}
            reply = await ask(ws, msg)
            pages.append(reply["records"])
            after = reply["next"]
            if after is None:
                break
    finally:
        await ws.close()
    assert sorted(r["name"] for page in pages for r in page) == ["a", "b", "paused"]
    assert all(len(page) <= 1 for page in pages)
    assert stealthy.node_id not in json.dumps(pages)

    # ... and still reachable through the relay.
    await asker.send_relay(stealthy.node_id, b"query for the stealth node")
    sender, payload = await asyncio.wait_for(got.get(), 5)
    assert (sender, payload) == (asker.node_id, b"query for the stealth node")


async def test_records_expire(tracker, clients):
    model = f"model-{secrets.token_hex(4)}"
    short, asker = await clients(), await clients()
    await short.announce(fields(model, name="short"), ttl=2)
    assert names(await asker.list_peers(model=model)) == {"short"}
    await short.close()  # stop it re-announcing
    deadline = time.monotonic() + 8
    while names(await asker.list_peers(model=model)) and time.monotonic() < deadline:
        await asyncio.sleep(0.25)
    assert names(await asker.list_peers(model=model)) == set()


async def test_newer_sequence_replaces_older(tracker, clients):
    model = f"model-{secrets.token_hex(4)}"
    me = Identity.generate()
    asker = await clients()
    ws = await raw_session(tracker.url, me)
    try:
        v1 = AnnounceRecord.build(me, seq=10, ttl=60, **fields(model, name="v1"))
        v2 = AnnounceRecord.build(me, seq=11, ttl=60, **fields(model, name="v2"))
        assert (await ask(ws, {"type": "announce", "id": 1, "record": v1.to_wire()}))["type"] == "ok"
        assert names(await asker.list_peers(model=model)) == {"v1"}
        assert (await ask(ws, {"type": "announce", "id": 2, "record": v2.to_wire()}))["type"] == "ok"
        assert names(await asker.list_peers(model=model)) == {"v2"}
        stale = await ask(ws, {"type": "announce", "id": 3, "record": v1.to_wire()})
        assert stale["code"] == "stale_sequence" and stale["id"] == 3
        assert names(await asker.list_peers(model=model)) == {"v2"}

        # After leave, a copy of the old (still valid) record cannot bring the node back...
        assert (await ask(ws, {"type": "leave", "id": 4}))["removed"] is True
        assert names(await asker.list_peers(model=model)) == set()
        assert (await ask(ws, {"type": "announce", "id": 5, "record": v2.to_wire()}))[
            "code"
        ] == "stale_sequence"
        # ...but the node itself can, with a higher sequence number.
        v3 = AnnounceRecord.build(me, seq=12, ttl=60, **fields(model, name="v3"))
        assert (await ask(ws, {"type": "announce", "id": 6, "record": v3.to_wire()}))["type"] == "ok"
        assert names(await asker.list_peers(model=model)) == {"v3"}
    finally:
        await ws.close()


async def test_forged_records_are_refused(tracker, clients):
    model = f"model-{secrets.token_hex(4)}"
    me, other = Identity.generate(), Identity.generate()
    asker = await clients()
    ws = await raw_session(tracker.url, me)

    def resign(body: dict, signer: Identity) -> dict:
        return {**body, "sig": b64encode(signer.sign(RECORD_DOMAIN + canonical_json(body)))}

    try:
        genuine = AnnounceRecord.build(me, seq=1, ttl=60, **fields(model, name="genuine")).to_wire()
        body = {k: v for k, v in genuine.items() if k != "sig"}
        cases = {
            "signed by another key": (resign(body, other), "bad_signature"),
            "altered after signing": (
                {**genuine, "addresses": ["ws://198.51.100.7:8080/p2p"]},
                "bad_signature",
            ),
            "stealth flag flipped": ({**genuine, "stealth": True, "addresses": []}, "bad_signature"),
            "another node's record": (
                AnnounceRecord.build(other, seq=1, ttl=60, **fields(model, name="other")).to_wire(),
                "not_yours",
            ),
            "expired": (
                AnnounceRecord.build(me, seq=2, ttl=60, now=time.time() - 120, **fields(model)).to_wire(),
                "expired",
            ),
            "TTL over the maximum": (
                resign({**body, "expires_at": body["issued_at"] + 3600}, me),
                "bad_record",
            ),
            "stealth with an address": (resign({**body, "stealth": True}, me), "bad_record"),
            "a float in a signed field": (resign({**body, "seq": 1.5}, me), "bad_record"),
            "unknown field": (resign({**body, "extra": 1}, me), "bad_record"),
            "not base64": ({**genuine, "sig": "%%%"}, "bad_record"),
            "not an object": ([1, 2, 3], "bad_record"),
        }
        for i, (what, (record, code)) in enumerate(cases.items()):
            if i and i % 8 == 0:  # a fresh session: the announce budget is 10 in a burst
                await ws.close()
                ws = await raw_session(tracker.url, me)
            reply = await ask(ws, {"type": "announce", "id": i, "record": record})
            assert (reply["type"], reply.get("code")) == ("error", code), what
        assert names(await asker.list_peers(model=model)) == set()
        assert (await ask(ws, {"type": "announce", "id": 99, "record": genuine}))["type"] == "ok"
        listed = await asker.list_peers(model=model)
        assert names(listed) == {"genuine"} and listed[0].node_id == me.node_id
    finally:
        await ws.close()


# -- relay ------------------------------------------------------------------------------------------
async def test_relay_between_two_clients_delivers_intact_and_never_logs_payloads(tracker, clients):
    marker = b"PAYLOAD-MARKER-" + secrets.token_hex(8).encode()
    got: asyncio.Queue = asyncio.Queue()
    undeliverable: asyncio.Queue = asyncio.Queue()
    a = await clients(on_undeliverable=lambda to, circuit, reason: undeliverable.put_nowait((to, reason)))
    b = await clients(on_relay=lambda sender, payload: got.put_nowait((sender, payload)))
    largest = (marker * 12000)[: a.max_relay_payload]  # the most one relay message may carry
    payloads = [marker, marker + bytes(range(256)) * 100, b"", largest]
    for p in payloads:
        await a.send_relay(b.node_id, p)
    for p in payloads:
        sender, payload = await asyncio.wait_for(got.get(), 5)
        assert sender == a.node_id and payload == p
    with pytest.raises(TrackerError):
        await a.send_relay(b.node_id, b"x" * (a.max_relay_payload + 1))

    nobody = Identity.generate().node_id
    await a.send_relay(nobody, marker)
    assert await asyncio.wait_for(undeliverable.get(), 5) == (nobody, "unreachable")

    # A circuit carries messages of any size (fragmented) both ways, like a direct link.
    inbound: asyncio.Queue = asyncio.Queue()
    b.on_circuit = inbound.put_nowait
    circuit = a.open_relay(b.node_id)
    big = marker + secrets.token_bytes(700_000)
    await circuit.send(big)
    theirs = await asyncio.wait_for(inbound.get(), 5)
    assert theirs.peer_id == a.node_id and theirs.remote is None
    assert await asyncio.wait_for(theirs.recv(), 5) == big
    await theirs.send(marker + b"-reply")
    assert await asyncio.wait_for(circuit.recv(), 5) == marker + b"-reply"
    await circuit.close(4001, "done")
    with pytest.raises(TransportClosed) as closed:
        await asyncio.wait_for(theirs.recv(), 5)
    assert closed.value.code == 4001 and closed.value.reason == "done"

    # A node that takes no relayed links refuses a circuit instead of leaving it hanging.
    closed_node = await clients()
    refused = a.open_relay(closed_node.node_id)
    await refused.send(marker)
    with pytest.raises(TransportClosed) as no_links:
        await asyncio.wait_for(refused.recv(), 5)
    assert no_links.value.code == CLOSE_TRY_LATER

    await asyncio.sleep(0.2)
    text = tracker.log()
    for form in (marker, marker.hex().encode(), base64.b64encode(marker)):
        assert form.decode() not in text
    assert tracker.alive()


async def test_slow_reader_costs_the_tracker_a_bounded_queue(tracker, clients):
    notes: list[str] = []
    sender = await clients(on_undeliverable=lambda to, circuit, reason: notes.append(reason))
    # A session that logs in and then never reads, with a tiny receive buffer so the kernel does not
    # soak up what the tracker sends: the tracker's own bounded queue is what fills.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", tracker.port))
    sleeper_identity = Identity.generate()
    sleeper = await raw_session(tracker.url, sleeper_identity, sock=sock)
    try:
        chunk = secrets.token_bytes(60_000)
        for _ in range(250):  # ~15 MB offered, under the sender's relay byte budget
            await sender.send_relay(sleeper_identity.node_id, chunk)
            await asyncio.sleep(0)
            if "congested" in notes:
                break
        for _ in range(50):
            if "congested" in notes:
                break
            await asyncio.sleep(0.1)
        assert "congested" in notes, dict(sender.stats)
        assert "rate_limited" not in notes
        assert await sender.ping() < 5  # the sender's own session is unaffected
        assert tracker.alive()
    finally:
        sleeper.transport.abort()


# -- misbehaving clients ----------------------------------------------------------------------------
async def test_malformed_and_flooding_clients_are_cut_off_while_a_good_client_works(tracker, clients):
    model = f"model-{secrets.token_hex(4)}"
    good = await clients()
    await good.announce(fields(model, name="good"), ttl=60)
    peer = await clients()

    # Garbage bytes instead of an HTTP upgrade: the connection is dropped.
    reader, writer = await asyncio.open_connection("127.0.0.1", tracker.port)
    writer.write(secrets.token_bytes(4096) + b"\r\n\r\n")
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 10) is not None  # EOF (or a 400) and then closed
    writer.close()

    # Not JSON instead of the auth answer.
    async with ws_connect(tracker.url, proxy=None) as ws:
        await ws.recv()
        await ws.send("{this is not json")
        assert await closed_with(ws) == CLOSE_AUTH

    # Binary garbage instead of the auth answer.
    async with ws_connect(tracker.url, proxy=None) as ws:
        await ws.recv()
        await ws.send(secrets.token_bytes(100))
        assert await closed_with(ws) == CLOSE_AUTH

    # Never authenticating: closed at the auth deadline.
    async with ws_connect(tracker.url, proxy=None) as ws:
        start = time.monotonic()
        assert await closed_with(ws, timeout=AUTH_TIMEOUT + 5) == CLOSE_TIMEOUT
        assert time.monotonic() - start < AUTH_TIMEOUT + 3

    # An oversize message: the library closes with 1009 before parsing any of it.
    ws = await raw_session(tracker.url, Identity.generate())
    await ws.send("x" * (300 * 1024))
    assert await closed_with(ws) == 1009

    # Malformed messages after login: each is answered, a handful closes the session.
    ws = await raw_session(tracker.url, Identity.generate())
    nasty = [
        "not json",
        "[" * 100_000,  # nesting deep enough to hit the recursion limit
        '{"type": "list", "limit": ' + "9" * 5000 + "}",  # an integer literal too long to parse
        '{"type": "list", "id": -1}',
        '{"type": "list", "limit": 1e999}',
        '{"type": "list", "limit": NaN}',
        "[]",
        '{"type": 12}',
    ]
    errors = []
    with pytest.raises(ConnectionClosed) as cut:
        for text in nasty:
            await ws.send(text)
            errors.append(json.loads(await asyncio.wait_for(ws.recv(), 5))["code"])
    assert cut.value.rcvd is not None and cut.value.rcvd.code == CLOSE_PROTOCOL
    assert errors and set(errors) <= {"bad_json", "bad_message"}

    # A few bad requests are each answered and the session stays.
    ws = await raw_session(tracker.url, Identity.generate())
    for i, msg in enumerate(
        [
            {"type": "list", "limit": "ten"},
            {"type": "list", "limit": 10**30},
            {"type": "list", "model": ["x"]},
            {"type": "announce", "record": "nope"},
            {"type": "teleport"},
            {"type": "relay"},
        ]
    ):
        reply = await ask(ws, {**msg, "id": i})
        assert reply["type"] == "error" and reply["id"] == i
    assert (await ask(ws, {"type": "ping", "id": 7}))["type"] == "pong"
    await ws.close()

    # A flood of announces: rate limited, then cut off.
    flooder = Identity.generate()
    ws = await raw_session(tracker.url, flooder)
    records = [
        AnnounceRecord.build(flooder, seq=i + 1, ttl=60, **fields(model, name="flood")) for i in range(400)
    ]
    code, replies = await flood(
        ws, [json.dumps({"type": "announce", "id": r.seq, "record": r.to_wire()}) for r in records]
    )
    assert code == CLOSE_FLOOD
    codes = {json.loads(r).get("code") or json.loads(r)["type"] for r in replies}
    assert {"ok", "rate_limited"} <= codes

    # A relay flood: refusal notices, then cut off.
    ws = await raw_session(tracker.url, Identity.generate())
    frame = encode_relay(0, Identity.generate().public_key, b"x" * 100)
    code, _ = await flood(ws, [frame] * 20_000)
    assert code == CLOSE_FLOOD

    # The good client never noticed.
    assert tracker.alive()
    assert good.connected and peer.connected
    assert names(await peer.list_peers(model=model)) >= {"good"}
    assert await good.ping() < 5
    assert "flooding" in tracker.log()


async def test_sessions_per_ip_are_limited_and_clients_reconnect(tmp_path):
    t = start_tracker(tmp_path / "tracker.log", "--max-sessions-per-ip", "3")
    opened = []
    try:
        for _ in range(3):
            opened.append(await ws_connect(t.url, proxy=None))
        with pytest.raises(InvalidStatus) as refused:
            await ws_connect(t.url, proxy=None)
        assert refused.value.response.status_code == 429
        for ws in opened:
            await ws.close()
        opened.clear()

        model = f"model-{secrets.token_hex(4)}"
        me = TrackerClient(t.url, Identity.generate(), backoff_base=0.2, backoff_max=1.0)
        asker = TrackerClient(t.url, Identity.generate(), backoff_base=0.2, backoff_max=1.0)
        try:
            await me.connect()
            await asker.connect()
            await me.announce(fields(model, name="me"), ttl=60)

            # The tracker restarts and forgets everything; the client comes back and re-announces.
            assert t.stop() == 0
            await asyncio.sleep(0.3)
            assert not me.connected
            with pytest.raises(TrackerUnavailable):
                await me.list_peers()
            t = start_tracker(tmp_path / "tracker.log", "--max-sessions-per-ip", "3", port=t.port)
            assert await me.wait_connected(15) and await asker.wait_connected(15)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if names(await asker.list_peers(model=model)) == {"me"}:
                    break
                await asyncio.sleep(0.2)
            assert names(await asker.list_peers(model=model)) == {"me"}
            assert me.stats["connects"] == 2
        finally:
            await me.close(leave=True)
            await asker.close()
    finally:
        for ws in opened:
            await ws.close()
        assert t.stop() == 0, t.log()


async def test_new_records_per_address_are_rate_limited(tmp_path):
    """Records outlive sessions, so one address logging in with fresh keys must not fill the store."""
    t = start_tracker(tmp_path / "tracker.log", "--ip-new-record-rate", "0.01")  # burst: 64 new ids
    try:
        model = f"model-{secrets.token_hex(4)}"
        first = Identity.generate()
        replies = []
        for i in range(66):
            me = first if i == 0 else Identity.generate()
            ws = await raw_session(t.url, me)
            record = AnnounceRecord.build(me, seq=1, ttl=60, **fields(model, name=f"n{i}"))
            replies.append(await ask(ws, {"type": "announce", "id": i, "record": record.to_wire()}))
            await ws.close()
        assert [r["type"] for r in replies[:64]] == ["ok"] * 64
        assert [r.get("code") for r in replies[64:]] == ["rate_limited"] * 2
        # A node already in the store refreshes its record freely.
        ws = await raw_session(t.url, first)
        refresh = AnnounceRecord.build(first, seq=2, ttl=60, **fields(model, name="n0"))
        assert (await ask(ws, {"type": "announce", "id": 99, "record": refresh.to_wire()}))["type"] == "ok"
        await ws.close()
    finally:
        assert t.stop() == 0, t.log()


async def test_an_address_range_holds_a_bounded_number_of_records(tmp_path):
    """Sybil limit: however slowly it adds them, one address range (127.0.0.0/24 here) never holds more than
    --max-records-per-range records; a record that leaves frees its place."""
    t = start_tracker(tmp_path / "tracker.log", "--max-records-per-range", "5")
    try:
        model = f"model-{secrets.token_hex(4)}"
        keys = [Identity.generate() for _ in range(7)]
        replies = []
        for i, me in enumerate(keys[:6]):
            ws = await raw_session(t.url, me)
            record = AnnounceRecord.build(me, seq=1, ttl=60, **fields(model, name=f"n{i}"))
            replies.append(await ask(ws, {"type": "announce", "id": i, "record": record.to_wire()}))
            if i == 0:
                # A refresh of a record already held is not a new one: never refused by the cap.
                again = AnnounceRecord.build(me, seq=2, ttl=60, **fields(model, name="n0"))
                assert (await ask(ws, {"type": "announce", "id": 50, "record": again.to_wire()}))["type"] == "ok"
                first = ws
            else:
                await ws.close()
        assert [r["type"] for r in replies[:5]] == ["ok"] * 5
        assert replies[5]["code"] == "rate_limited" and "127.0.0.0/24" in replies[5]["message"]
        assert (await ask(first, {"type": "leave", "id": 60}))["removed"] is True
        await first.close()
        ws = await raw_session(t.url, keys[6])
        record = AnnounceRecord.build(keys[6], seq=1, ttl=60, **fields(model, name="n6"))
        assert (await ask(ws, {"type": "announce", "id": 70, "record": record.to_wire()}))["type"] == "ok"
        await ws.close()
    finally:
        assert t.stop() == 0, t.log()


def test_address_ranges_are_slash_24_and_slash_48():
    from pinkybrain.node.core.tracker_protocol import address_range

    assert address_range("203.0.113.7") == address_range("203.0.113.250") == "203.0.113.0/24"
    assert address_range("203.0.114.7") != address_range("203.0.113.7")
    assert address_range("::ffff:203.0.113.9") == "203.0.113.0/24"  # IPv4-mapped counts as IPv4
    assert address_range("2001:db8:1:2::1") == address_range("2001:db8:1:ffff::9") == "2001:db8:1::/48"
    assert address_range("not-an-ip") == "not-an-ip"


async def test_tracker_cli_refuses_bad_options(tmp_path):
    bad = subprocess.run(
        [sys.executable, "-m", "pinkybrain", "tracker", "serve", "--public-url", "ftp://x", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "--public-url" in bad.stderr
