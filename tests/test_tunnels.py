"""Byte-stream tunnels on a peer link (services/tunnels.py), between two in-process meshes: data both
ways intact, back-pressure when the far end stops reading, refusals, and the acceptor's end decided only
by its own handler; `pump` on both ends (as a split joins llama-server to an rpc-server), writers that
queue without waiting for the wire still bounded by the link's backlog; llama.cpp RPC messages written in
several sends cross as one tunnel message."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os

import pytest
from test_mesh import Node, eventually, run

from pinkybrain.node.services.mesh import RemoteError, RpcError
from pinkybrain.node.services.peer_link import MAX_QUEUED
from pinkybrain.node.services.tunnels import HOLD_SECS, POST_BACKLOG, TUNNEL_WINDOW, pump
from pinkybrain.node.split.framing import RpcFraming


async def _echo_server():
    """A local TCP echo server (what a tunnel's acceptor joins the stream to)."""
    seen: list[bytes] = []

    async def handle(reader, writer):
        while data := await reader.read(65536):
            seen.append(data)
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], seen


async def _tunnel_kind(a, b, port: int, kind: str = "echo"):
    """B joins every tunnel of `kind` to 127.0.0.1:`port`; A links to B. Returns A's link."""
    async def join(ctx, payload):
        return await asyncio.open_connection("127.0.0.1", port)

    b.mesh.register_tunnel(kind, join)
    return await a.mesh.connect(b.url)


@contextlib.asynccontextmanager
async def _echo_pair():
    """Nodes A and B, linked, B joining every `echo` tunnel to a local echo server. Yields A, B, A's link
    and the chunks the echo server received."""
    server, port, seen = await _echo_server()
    try:
        async with Node("a") as a, Node("b") as b:
            yield a, b, await _tunnel_kind(a, b, port), seen
    finally:
        server.close()


async def _pumped_listener(a, b, framing=None):
    """A loopback listener on A whose every connection is pumped through a new `echo` tunnel to B, as the
    split borrower joins llama-server's connections. Returns the listener and a queue of its tunnels."""
    tunnels: asyncio.Queue = asyncio.Queue()

    async def joined(reader, writer):
        tunnel = await a.mesh.open_tunnel(b.id, "echo")
        tunnels.put_nowait(tunnel)
        await pump(tunnel, reader, writer, framing)

    return await asyncio.start_server(joined, "127.0.0.1", 0), tunnels


def test_tunnel_carries_bytes_both_ways_and_refuses_what_it_should():
    async def scenario():
        server, port, _ = await _echo_server()
        async with Node("a") as a, Node("b") as b:
            asked = []

            async def open_echo(ctx, payload):
                asked.append((ctx.peer_id, payload))
                if payload == "no":
                    raise RpcError("busy", "not now")
                return await asyncio.open_connection("127.0.0.1", port)

            b.mesh.register_tunnel("echo", open_echo)
            await a.mesh.connect(b.url)
            tunnel = await a.mesh.open_tunnel(b.id, "echo", {"model": "x"})
            assert asked == [(a.id, {"model": "x"})]
            blob = os.urandom(3 * TUNNEL_WINDOW + 12345)  # several windows: credit must come back
            writer = asyncio.create_task(tunnel.write(blob))
            got = bytearray()
            while len(got) < len(blob):
                got += await tunnel.read()
            await writer
            assert hashlib.sha256(got).digest() == hashlib.sha256(blob).digest()
            assert tunnel.bytes_out == tunnel.bytes_in == len(blob)
            tunnel.close("done")
            await eventually(lambda: not b.mesh._links[a.id]._tunnels_theirs)

            with pytest.raises(RemoteError) as info:
                await a.mesh.open_tunnel(b.id, "echo", "no")
            assert info.value.code == "busy"
            with pytest.raises(RemoteError) as info:
                await a.mesh.open_tunnel(b.id, "elsewhere", {"host": "10.0.0.1", "port": 22})
            assert info.value.code == "unknown_tunnel"
        server.close()

    run(scenario())


def test_a_far_end_that_stops_reading_stops_the_writer():
    async def scenario():
        stalled = asyncio.Event()

        async def handle(reader, writer):  # accepts, then never reads
            await stalled.wait()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with Node("a") as a, Node("b") as b:
            await _tunnel_kind(a, b, port, "sink")
            tunnel = await a.mesh.open_tunnel(b.id, "sink")
            writer = asyncio.create_task(tunnel.write(bytes(16 * TUNNEL_WINDOW)))
            await asyncio.sleep(2)
            # Bounded: the window plus what the kernel's socket buffers took, far below the 64 MiB offered.
            assert not writer.done()
            assert tunnel.bytes_out < 8 * TUNNEL_WINDOW
            sent = tunnel.bytes_out
            await asyncio.sleep(0.5)
            assert tunnel.bytes_out == sent  # it waits; it does not creep on
            stalled.set()
            tunnel.close("giving up")
            with pytest.raises(ConnectionError):
                await asyncio.wait_for(writer, 5)
        server.close()

    run(scenario())


def test_pumped_on_both_ends_a_stalled_local_reader_holds_the_stream_then_it_resumes_intact():
    async def scenario():
        reading = asyncio.Event()

        async def slow_echo(reader, writer):  # reads nothing at first, then echoes all of it
            await reading.wait()
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(slow_echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with Node("a") as a, Node("b") as b:
            await _tunnel_kind(a, b, port)
            listener, tunnels = await _pumped_listener(a, b)
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.sockets[0].getsockname()[1])
            blob = os.urandom(6 * TUNNEL_WINDOW + 4321)
            sending = asyncio.create_task(writer.drain())
            writer.write(blob)
            tunnel = await asyncio.wait_for(tunnels.get(), 10)
            await eventually(lambda: tunnel.bytes_out > 0)
            await asyncio.sleep(1.5)
            held = tunnel.bytes_out
            # The acceptor wrote into a socket nobody reads: its credit stopped, so the opener did too.
            assert held < 5 * TUNNEL_WINDOW
            await asyncio.sleep(0.3)
            assert tunnel.bytes_out == held
            reading.set()
            got = await asyncio.wait_for(reader.readexactly(len(blob)), 30)
            assert hashlib.sha256(got).digest() == hashlib.sha256(blob).digest()
            await sending
            writer.close()
            await eventually(lambda: tunnel.closed)  # the local end closing ends the tunnel
            await eventually(lambda: not b.mesh._links[a.id]._tunnels_theirs)
            listener.close()
        server.close()

    run(scenario())


def test_bytes_that_arrive_before_the_pump_starts_reach_its_socket_first():
    async def scenario():
        async with _echo_pair() as (a, b, _, _):
            tunnel = await a.mesh.open_tunnel(b.id, "echo")
            await tunnel.write(b"early ")
            await eventually(lambda: tunnel.bytes_in == 6)  # echoed, waiting in the tunnel: nobody read it

            accepted: asyncio.Queue = asyncio.Queue()
            local = await asyncio.start_server(lambda r, w: accepted.put_nowait((r, w)), "127.0.0.1", 0)
            reader, writer = await asyncio.open_connection("127.0.0.1", local.sockets[0].getsockname()[1])
            pumping = asyncio.create_task(pump(tunnel, *await accepted.get()))
            writer.write(b"late")
            assert await asyncio.wait_for(reader.readexactly(10), 10) == b"early late"
            writer.close()
            assert await asyncio.wait_for(pumping, 10) == "local"
            local.close()

    run(scenario())


def test_many_small_writes_wait_for_the_wire_once_the_link_has_a_backlog():
    async def scenario():
        async with _echo_pair() as (a, b, link, _):
            tunnel = await a.mesh.open_tunnel(b.id, "echo")
            peak, count = 0, MAX_QUEUED + 1000  # more messages than a link may queue
            for i in range(count):
                await tunnel.write(b"%09d;" % i)  # queued without waiting while the backlog is short
                peak = max(peak, link.backlog)
            assert peak <= POST_BACKLOG + 1
            got = bytearray()
            while len(got) < 10 * count:
                got += await asyncio.wait_for(tunnel.read(), 10)
            assert bytes(got) == b"".join(b"%09d;" % i for i in range(count))  # all of it, in order
            assert not link.closing

    run(scenario())


def _command(cmd: int, body: bytes) -> list[bytes]:
    """One llama.cpp RPC command as llama-server sends it: three sends."""
    return [bytes([cmd]), len(body).to_bytes(8, "little"), body]


def test_rpc_framing_finds_message_boundaries_however_the_bytes_are_cut():
    stream = b"".join(_command(5, b"x" * 20) + _command(9, b"") + _command(1, os.urandom(70000)))
    ends = {29, 38, len(stream)}  # where each command ends
    for cut in (1, 3, 8, 9, 10, 4096, len(stream)):
        framing = RpcFraming(commands=True)
        for at in range(0, len(stream), cut):
            piece = stream[at:at + cut]
            assert framing.feed(piece) == (at + len(piece) in ends), (cut, at)
    replies = RpcFraming(commands=False)  # rpc-server's replies: size, body
    assert not replies.feed((3).to_bytes(8, "little"))
    assert not replies.feed(b"ab")
    assert replies.feed(b"c" + (0).to_bytes(8, "little"))  # a reply, then an empty one: both complete


def test_an_rpc_command_sent_in_pieces_crosses_as_one_message_and_a_stream_that_is_not_rpc_still_flows():
    async def scenario():
        async with _echo_pair() as (a, b, _, seen):
            listener, accepted = await _pumped_listener(a, b, RpcFraming(commands=True))
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.sockets[0].getsockname()[1])
            tunnel = None
            for body in (b"graph" * 100, b""):
                pieces = _command(7, body)
                for piece in pieces:  # each its own segment, as llama.cpp's sends with TCP_NODELAY are
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.01)
                message = b"".join(pieces)
                assert await asyncio.wait_for(reader.readexactly(len(message)), 10) == message
                tunnel = tunnel or await accepted.get()
                assert seen[-1] == message  # the far end got it in one piece: one tunnel message
            assert len(seen) == 2

            # A header announcing more than ever comes: held at most HOLD_SECS, then forwarded as it comes.
            writer.write(b"\x07" + (1 << 40).to_bytes(8, "little") + b"stray")
            assert await asyncio.wait_for(reader.readexactly(14), 10 * HOLD_SECS + 5) == seen[-1]
            writer.write(b"then more")
            assert await asyncio.wait_for(reader.readexactly(9), 5) == b"then more"
            writer.close()
            listener.close()

    run(scenario())
