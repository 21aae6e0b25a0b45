"""Split inference over three real nodes (node/split): A holds the default model and borrows from B and C,
which lend (`sharing.split: true`). A forced split puts blocks on all three; its greedy answer is the same,
token for token, as the whole model run on A. The RPC traffic never faces a network: the rpc-servers B and
C start listen on loopback only, and without the network secret a connection to a lender's port reaches
no rpc-server. A node with `sharing.split` off refuses a member's tunnel.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import subprocess

import httpx
import psutil
import pytest
import websockets
from test_remote_inference import FAST, wait_for

from model import DEFAULT_NAME, place_default_model
from nodes import free_port, query_events, start_node, strong_secret
from pinkybrain.node.core.identity import Identity
from pinkybrain.node.services.inference import TRANSCRIPT_STOPS, transcript_prompt
from pinkybrain.node.services.mesh import Mesh, MeshSettings, RemoteError
from pinkybrain.node.split.borrower import llama_server_argv
from pinkybrain.node.split.tools import find_tools

PROMPT = "Name three primary colours and say one thing about each."
SYSTEM = "You answer briefly."
PROFILE = {"greedy": {"description": "Greedy, for comparing engines.", "system_prompt": SYSTEM,
                      "temperature": 0.0, "top_p": 1.0, "max_tokens": 48}}
GREEDY = {"temperature": 0.0, "max_tokens": 48, "model": DEFAULT_NAME, "mode": "specialist", "specialist": "greedy"}


def three_split_nodes(tmp_path_factory, prefix: str, profiles: dict) -> tuple[str, dict, dict, dict]:
    """For a test of nodes a (the borrower, holding the default model), b and c: the secret, their ports and
    homes, and the settings they share. The RPC tools must be there: a failure, never a skip (install.sh
    builds them)."""
    tools = find_tools()
    if not tools.usable:
        pytest.fail(f"split inference needs llama.cpp's RPC tools: {tools.problem}")
    ports = {name: free_port() for name in "abc"}
    homes = {name: tmp_path_factory.mktemp(f"{prefix}-{name}") for name in "abc"}
    common = {**FAST, "inference.n_ctx": 1024, "inference.n_threads": 1, "specialists.profiles": profiles}
    place_default_model(homes["a"] / "shared_models")
    return strong_secret(), ports, homes, common


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    secret, ports, homes, common = three_split_nodes(tmp_path_factory, "split", PROFILE)
    url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    nodes = {}
    try:
        for name in "bc":
            nodes[name] = start_node(homes[name], port=ports[name], secret=secret,
                                     extra={**common, "sharing.split": True, "sharing.split_idle_secs": 300})
        nodes["a"] = start_node(homes["a"], port=ports["a"], secret=secret,
                                extra={**common, "p2p.peers": [url["b"], url["c"]]})
        ids = {name: n.get("/api/ping").json()["node_id"] for name, n in nodes.items()}
        wait_for(lambda: nodes["a"].get("/api/capabilities").json()["split"]["lenders_now"] == 2, 60,
                 "a to see b and c lending")
        yield {"nodes": nodes, "ids": ids, "secret": secret, "ports": ports}
    finally:
        for node in nodes.values():
            node.stop()


def ask(node, **extra) -> dict:
    """A query's result; streamed, the `end` event (with `split`: who held which layers)."""
    body = {"prompt": PROMPT, **GREEDY, **extra}
    if not extra.get("stream"):
        with node.client() as c:
            c.timeout = 600
            r = c.post("/api/query", json=body)
        assert r.status_code == 200, r.text
        return r.json()
    events = query_events(node, body, timeout=600)
    assert not [d for e, d in events if e == "error"], events
    return next(d for e, d in events if e == "end")


def test_capabilities_say_who_can_lend(net):
    a, b = net["nodes"]["a"], net["nodes"]["b"]
    lend_b = b.get("/api/capabilities").json()["split"]
    assert lend_b["can_lend"] and lend_b["lend_enabled"] and lend_b["rpc_server"] and lend_b["backends"]
    assert lend_b["free_bytes"] > 0
    lend_a = a.get("/api/capabilities").json()["split"]
    assert not lend_a["can_lend"] and "sharing.split is false" in lend_a["lend_refusal"]
    assert lend_a["can_borrow"]


def whole_on_one_node(home, messages: list[dict]) -> dict:
    """The whole model run on one node by the engine a split runs (llama-server, no RPC, the CPU kernels
    every node of a split uses), with the request a split sends for this model (the local engine's
    transcript prompt and sampling: it has no chat template)."""
    tools = find_tools()
    model = place_default_model(home / "shared_models")
    port = free_port()
    argv = llama_server_argv(tools, model, port, [], None, n_ctx=1024, threads=1)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _healthy(port, proc), 120, "llama-server with the whole model")
        body = {"prompt": transcript_prompt(messages), "max_tokens": GREEDY["max_tokens"], "temperature": 0.0,
                "top_p": 1.0, "top_k": 40, "min_p": 0.05, "repeat_last_n": 64, "repeat_penalty": 1.15,
                "stop": TRANSCRIPT_STOPS, "cache_prompt": False}
        out = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=300).json()
        return {"text": out["choices"][0]["text"].strip(), "tokens": out["usage"]["completion_tokens"]}
    finally:
        proc.terminate()
        proc.wait(30)


def _healthy(port: int, proc) -> bool:
    assert proc.poll() is None, "llama-server exited"
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_forced_split_over_three_nodes_answers_token_for_token_like_the_whole_model(net, tmp_path):
    a, ids = net["nodes"]["a"], net["ids"]
    split = ask(a, split=True, stream=True)
    assert split["split"] and len(split["split"]) == 3
    prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}]
    whole = whole_on_one_node(tmp_path, prompt)
    assert whole["text"] and split["answer"] == whole["text"]
    assert split["completion_tokens"] == whole["tokens"]
    ps = a.get("/api/models/ps").json()["models"]
    entry = next(m for m in ps if m.get("split"))
    holders = [p["node"] for p in entry["parts"]]
    assert sorted(holders) == sorted(ids.values())  # every node holds blocks
    assert all(p["layer_count"] >= 1 and p["bytes"] > 0 for p in entry["parts"])
    # The lenders' layers went through the tunnels (and nothing else could have carried them).
    assert entry["tunnel_bytes_out"] > sum(p["bytes"] for p in entry["parts"] if not p["local"]) * 0.9
    again = ask(a, split=True, stream=True)  # the loaded split answers again, the same
    assert again["answer"] == whole["text"]


def test_the_split_engine_and_the_local_engine_agree_on_greedy_tokens(tmp_path):
    """What makes "the same model whole on one node" the same whatever engine runs it: with the same CPU
    kernels (both repack here) and no repeat penalty (whose window llama-server also fills with the
    prompt, llama-cpp-python only with the answer), llama-cpp-python's greedy tokens and llama-server's
    are the same."""
    from llama_cpp import Llama

    tools = find_tools()
    if not tools.usable:
        pytest.fail(f"split inference needs llama.cpp's RPC tools: {tools.problem}")
    model = place_default_model(tmp_path / "shared_models")
    prompt = transcript_prompt([{"role": "user", "content": PROMPT}])
    llm = Llama(model_path=str(model), n_ctx=1024, n_threads=1, verbose=False)
    local = llm.create_completion(prompt, max_tokens=32, temperature=0.0, repeat_penalty=1.0)
    port = free_port()
    proc = subprocess.Popen(llama_server_argv(tools, model, port, [], None, n_ctx=1024, threads=1, no_repack=False),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _healthy(port, proc), 120, "llama-server")
        out = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=300, json={
            "prompt": prompt, "max_tokens": 32, "temperature": 0.0, "repeat_penalty": 1.0,
            "cache_prompt": False}).json()
    finally:
        proc.terminate()
        proc.wait(30)
    assert out["choices"][0]["text"] == local["choices"][0]["text"]
    assert out["usage"]["completion_tokens"] == local["usage"]["completion_tokens"]


def test_rpc_servers_listen_on_loopback_only_and_are_unreachable_without_the_secret(net):
    nodes, ports = net["nodes"], net["ports"]
    lending = nodes["b"].get("/api/capabilities").json()["split"]["lending"]
    if not lending:  # a query loads the split (the test above may not have run first)
        ask(nodes["a"], split=True)
        lending = nodes["b"].get("/api/capabilities").json()["split"]["lending"]
    assert lending, "b runs no rpc-server after a split over it"
    for node in "bc":
        for server in nodes[node].get("/api/capabilities").json()["split"]["lending"]:
            proc = psutil.Process(server["pid"])
            assert "rpc-server" in proc.name() or "rpc-server" in " ".join(proc.cmdline())
            listening = [c for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
            assert listening, "the rpc-server listens nowhere"
            assert all(c.laddr.ip == "127.0.0.1" for c in listening), listening
            assert server["port"] not in (ports["b"], ports["c"])
    # llama-server on the borrower: its HTTP port and the tunnel endpoints, loopback too.
    borrower = psutil.Process(nodes["a"].proc.pid)
    for child in borrower.children(recursive=True):
        for c in child.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN:
                assert c.laddr.ip == "127.0.0.1", (child.name(), c)

    rpc_hello = struct.pack("<BQ", 14, 0)  # ggml-rpc's RPC_CMD_HELLO with an empty body
    with socket.create_connection(("127.0.0.1", ports["b"]), timeout=5) as s:
        s.sendall(rpc_hello)
        reply = s.recv(64)
    assert reply == b"" or reply.startswith(b"HTTP/1.1 4")  # the node's HTTP server, never rpc-server

    async def intruder():
        # A mesh with the wrong secret cannot finish the handshake, so it never gets to open a tunnel.
        mesh = Mesh(Identity.generate(), strong_secret(), name="intruder", version="test",
                    listen_host="127.0.0.1", listen_port=free_port(), settings=MeshSettings())
        try:
            with pytest.raises(Exception) as info:
                await mesh.connect(f"ws://127.0.0.1:{ports['b']}/p2p")
            assert not isinstance(info.value, AssertionError)
            assert not mesh.peer_ids()
        finally:
            await mesh.stop()

    asyncio.run(asyncio.wait_for(intruder(), 30))


def test_a_node_that_does_not_lend_refuses_a_members_tunnel(net):
    a = net["nodes"]["a"]  # sharing.split is off on a

    async def member():
        mesh = Mesh(Identity.generate(), net["secret"], name="member", version="test",
                    listen_host="127.0.0.1", listen_port=free_port(), settings=MeshSettings())
        try:
            link = await mesh.connect(f"ws://127.0.0.1:{a.port}/p2p")
            with pytest.raises(RemoteError) as info:
                await mesh.open_tunnel(link.peer_id, "split.rpc", {"sha256": "0" * 64, "bytes": 1})
            assert info.value.code == "busy" and "sharing.split is false" in info.value.message
            with pytest.raises(RemoteError) as info:  # the kind decides the far end: nothing else is reachable
                await mesh.open_tunnel(link.peer_id, "tcp", {"host": "127.0.0.1", "port": a.port})
            assert info.value.code == "unknown_tunnel"
        finally:
            await mesh.stop()

    asyncio.run(asyncio.wait_for(member(), 30))


def test_websocket_without_the_secret_is_closed_before_any_tunnel(net):
    port = net["ports"]["c"]

    async def probe():
        async with websockets.connect(f"ws://127.0.0.1:{port}/p2p", open_timeout=10) as ws:
            await ws.send(b"\x00" * 64)  # not a handshake
            with pytest.raises(websockets.exceptions.ConnectionClosed):
                for _ in range(10):
                    await asyncio.wait_for(ws.recv(), 10)

    asyncio.run(probe())


def test_after_a_lender_goes_the_next_split_uses_the_others_and_answers_the_same(net, tmp_path):
    """Runs last (it stops C). The loaded split lost a lender: the next query plans afresh over A and B,
    and the greedy answer is still the whole model's (the same kernels on every node)."""
    a, ids = net["nodes"]["a"], net["ids"]
    before = ask(a, split=True, stream=True)
    net["nodes"]["c"].stop()
    wait_for(lambda: a.get("/api/capabilities").json()["split"]["lenders_now"] == 1, 60, "a to see c gone")
    after = ask(a, split=True, stream=True)
    assert sorted(p["node"] for p in after["split"]) == sorted([ids["a"], ids["b"]])
    assert after["answer"] == before["answer"]
