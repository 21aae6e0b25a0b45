"""Handshake slots strangers cannot hold: a per-address share of a large budget, a short deadline for the
first Noise message, and fair eviction when the budget is full. The flood test runs against a real node:
200 silent WebSockets from 127.0.0.2 (reopened as soon as they are closed), and a peer with the right
secret from 127.0.0.1 that must link within its 2-second handshake bound.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from nodes import free_port
from pinkybrain.node.core.admission import PendingSlots, address_bucket
from pinkybrain.node.core.identity import Identity
from pinkybrain.node.services.mesh import Mesh, MeshSettings


# -- the slot bookkeeping --------------------------------------------------------------------------------
def test_an_address_gets_at_most_its_share():
    slots = PendingSlots(total=100, per_address=3)
    held = [slots.admit("10.0.0.1", lambda: None) for _ in range(3)]
    assert all(held) and slots.admit("10.0.0.1", lambda: None) is None
    assert not slots.would_admit("10.0.0.1") and slots.would_admit("10.0.0.2")
    slots.release(held[0])
    slots.release(held[0])  # twice is harmless
    assert slots.held_by("10.0.0.1") == 2 and slots.admit("10.0.0.1", lambda: None) is not None


def test_a_full_budget_is_shared_fairly_by_evicting_the_heaviest_address():
    evicted: list[str] = []
    slots = PendingSlots(total=6, per_address=6)
    flood = [slots.admit("flood", lambda i=i: evicted.append(f"flood-{i}")) for i in range(6)]
    assert len(slots) == 6 and all(flood)
    # A newcomer takes the flood's oldest slot...
    first = slots.admit("peer", lambda: evicted.append("peer"))
    assert first is not None and evicted == ["flood-0"] and flood[0].evicted
    assert slots.held_by("flood") == 5 and slots.held_by("peer") == 1
    # ...and so on until both hold an even share; then nobody is evicted any more.
    for _ in range(2):
        assert slots.admit("peer", lambda: None) is not None
    assert slots.held_by("flood") == 3 and slots.held_by("peer") == 3
    assert slots.admit("peer", lambda: None) is None and slots.admit("flood", lambda: None) is None
    assert evicted == ["flood-0", "flood-1", "flood-2"] and len(slots) == 6


@pytest.mark.parametrize("host, bucket", [
    ("127.0.0.2", "127.0.0.2"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff::9", "2001:db8:1:2::/64"),  # the same machine's /64: one share
    ("::ffff:10.1.2.3", "10.1.2.3"),
    (None, "unknown"),
])
def test_address_buckets(host, bucket):
    assert address_bucket(host) == bucket


@pytest.mark.parametrize("total, per_address", [(0, 1), (1, 0)])
def test_slot_limits_must_be_positive(total, per_address):
    with pytest.raises(ValueError):
        PendingSlots(total, per_address)


# -- a real node under a flood -------------------------------------------------------------------------------
FLOOD = """
import asyncio, sys, websockets

async def main(url, count):
    opened = 0

    async def silent():
        nonlocal opened
        while True:
            try:
                async with websockets.connect(url, local_addr=("127.0.0.2", 0), open_timeout=10,
                                              close_timeout=0.2, ping_interval=None, proxy=None) as ws:
                    opened += 1
                    if opened == 50:
                        print("holding", flush=True)
                    await ws.wait_closed()  # never says a word: the node has to close it
            except Exception:
                await asyncio.sleep(0.2)  # refused at the upgrade: try again soon, as an attacker would

    await asyncio.gather(*(silent() for _ in range(count)))

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def test_a_peer_links_within_2s_while_another_address_floods_with_silent_websockets(node_factory):
    # The HTTP guard's per-address cap is raised so that what is tested is the handshake slots alone.
    node = node_factory(extra={"http.max_connections_per_address": 1000})
    url = f"ws://127.0.0.1:{node.port}/p2p"
    # The flood runs in its own process, so the peer's timing is the node's, not this event loop's.
    flood = subprocess.Popen([sys.executable, "-c", FLOOD, url, "200"], stdout=subprocess.PIPE, text=True)
    try:
        assert flood.stdout.readline().strip() == "holding"  # 50 silent sockets are in (more keep coming)

        async def link() -> tuple[str, float, dict]:
            peer = Mesh(Identity.generate(), node.secret, name="late-peer", version="t",
                        listen_host="127.0.0.1", listen_port=free_port(),
                        settings=MeshSettings(handshake_timeout=2.0, peer_exchange=False))
            await peer.start()
            try:
                started = time.monotonic()
                linked = await peer.connect(url)  # DialError unless the handshake finishes within 2 s
                took = time.monotonic() - started
                state = await asyncio.to_thread(lambda: node.get("/api/status").json()["mesh"]["private"])
                return linked.peer_id, took, state
            finally:
                await peer.stop()

        time.sleep(3)  # past the first-message deadline: the flood has had slots taken back and retried
        peer_id, took, state = asyncio.run(asyncio.wait_for(link(), 60))
    finally:
        flood.kill()
        flood.wait(10)
    assert peer_id == node.get("/api/ping").json()["node_id"]
    print(f"linked {took * 1000:.0f} ms into a flood of 200 silent WebSockets")
    failures = state["handshake_failures"]
    # Silent sockets lost their slots at the first-message deadline; the rest were turned away before
    # the upgrade, and the flood never held more than its share.
    assert failures.get("timeout", 0) >= 8, failures
    assert state["handshakes_pending"] <= 8 + 1
