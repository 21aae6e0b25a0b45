"""Byte-stream tunnels on a peer link (services/tunnels.py), between two in-process meshes: data both
ways intact, back-pressure when the far end stops reading, refusals, and the acceptor's end decided only
by its own handler."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest
from test_mesh import Node, eventually, run

from pinkybrain.node.services.mesh import RemoteError, RpcError
from pinkybrain.node.services.tunnels import TUNNEL_WINDOW


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
            async def open_sink(ctx, payload):
                return await asyncio.open_connection("127.0.0.1", port)

            b.mesh.register_tunnel("sink", open_sink)
            await a.mesh.connect(b.url)
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
