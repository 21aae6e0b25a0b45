"""Between the skill and a node on a non-loopback address, a query, its streamed answer and a memory value
are not readable on the wire, while the skill gets all of them; nor are an OpenAI client's prompt and
streamed answer on /v1 where the owner turned on `api.tls` (HTTPS, certificate pinned by its file).

The node runs in one network namespace, the skill in another, joined by a veth pair (the namespaces come
from tests/test_netns_mdns.py's fixture, skipped with its reason where namespaces are not permitted). A
raw AF_PACKET socket in the skill's namespace records every frame on its end of the pair; the TCP streams
are put back together from those frames (so a text split across two segments is still found) and searched.
"""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
from pathlib import Path

from test_netns_mdns import (
    PORT,
    namespaces,  # noqa: F401 - the fixture
    probe,
)

from model import DEFAULT_NAME, place_default_model
from nodes import node_env, strong_secret, write_node_config

PROMPT = "Explain briefly why the zebra-unicorn-4711 crossed the river."
MEMORY_VALUE = "the vault code is quokka-9265-orchid"
V1_PROMPT = "Describe the walrus-parsnip-3318 in one line."
TLS_PORT = 8443

# Run in the skill's namespace: an OpenAI-style streamed chat completion over HTTPS, the node's certificate
# pinned by its file; prints the answer's text.
V1_CLIENT = r"""
import json, ssl, sys
import httpx
url, key, cert, prompt = sys.argv[1:5]
body = {"model": "pinkybrain", "messages": [{"role": "user", "content": prompt}], "max_tokens": 24, "stream": True}
text = []
with httpx.stream("POST", url + "/v1/chat/completions", json=body, verify=ssl.create_default_context(cafile=cert), timeout=300,
                  headers={"authorization": "Bearer " + key}) as response:
    assert response.status_code == 200, response.read()
    for line in response.iter_lines():
        if line.startswith("data: {"):
            text += [c["delta"].get("content") or "" for c in json.loads(line[6:]).get("choices", [])]
print("".join(text).strip())
"""

# Run in the skill's namespace: every frame seen on the interface, each as u32 length | frame, until the
# stop file appears (or the time limit passes).
CAPTURE = r"""
import os, socket, struct, sys, time
iface, out, stop, limit = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))  # ETH_P_ALL: both directions
s.bind((iface, 0))
s.settimeout(0.1)
deadline = time.monotonic() + limit
with open(out, "wb") as f:
    print("ready", flush=True)
    while time.monotonic() < deadline and not os.path.exists(stop):
        try:
            frame = s.recv(262144)
        except TimeoutError:
            continue
        f.write(struct.pack(">I", len(frame)) + frame)
"""


def tcp_streams(path: Path) -> dict[tuple, bytes]:
    """The TCP payload of each direction of each connection, in sequence order, from captured frames."""
    data = path.read_bytes()
    segments: dict[tuple, dict[int, bytes]] = {}
    offset = 0
    while offset < len(data):
        (size,) = struct.unpack_from(">I", data, offset)
        frame = data[offset + 4 : offset + 4 + size]
        offset += 4 + size
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":  # IPv4 over Ethernet only
            continue
        ip = frame[14:]
        ihl, total, proto = (ip[0] & 0x0F) * 4, struct.unpack_from(">H", ip, 2)[0], ip[9]
        if proto != 6:
            continue
        tcp = ip[ihl:total]
        sport, dport, seq = struct.unpack_from(">HHI", tcp)
        payload = tcp[(tcp[12] >> 4) * 4 :]
        if payload:
            segments.setdefault((ip[12:16], sport, ip[16:20], dport), {})[seq] = payload
    return {key: b"".join(parts[seq] for seq in sorted(parts)) for key, parts in segments.items()}


def test_query_answer_and_memory_value_are_sealed_on_the_wire(namespaces, tmp_path):  # noqa: F811
    (skill_ns, _), (node_ns, node_address) = namespaces
    secret = strong_secret()
    home = tmp_path / "node"
    place_default_model(home / "shared_models")
    config = write_node_config(home, host=node_address, port=PORT, secret=secret,
                               extra={"inference.n_ctx": 1024, "api.tls": True, "api.tls_port": TLS_PORT})
    with open(home / "test-node.log", "ab") as log:
        node = subprocess.Popen(["ip", "netns", "exec", node_ns, sys.executable, "-m", "pinkybrain.node", "serve",
                                 "--config", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                env=node_env(home), cwd=str(home))
    url = f"http://{node_address}:{PORT}"
    capture_file, stop_file = tmp_path / "capture.bin", tmp_path / "stop"
    capture = None
    try:
        up = probe(node_ns, url, secret, "-", 60)
        assert "ping" in up, f"node did not come up: {up}\n{(home / 'test-node.log').read_text()}"
        iface = subprocess.run(["ip", "-n", skill_ns, "-o", "link", "show", "type", "veth"], capture_output=True,
                               text=True, check=True).stdout.split(":")[1].strip().split("@")[0]
        capture = subprocess.Popen(["ip", "netns", "exec", skill_ns, sys.executable, "-c", CAPTURE, iface,
                                    str(capture_file), str(stop_file), "600"], stdout=subprocess.PIPE, text=True)
        assert capture.stdout.readline().strip() == "ready"

        env = node_env(tmp_path / "skill-home", {"P2P_SECRET": secret, "PINKYBRAIN_NODE": up["ping"]["node_id"]})
        exe = str(Path(sys.executable).with_name("pinkybrain"))

        def skill(*args: str) -> subprocess.CompletedProcess:
            result = subprocess.run(["ip", "netns", "exec", skill_ns, exe, *args, "--url", url], env=env,
                                    capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
            assert result.returncode == 0, f"{args}: {result.stderr}"
            return result

        # A mesh member may use only what the node shares: its owner shares the model first (over the wire).
        shared = subprocess.run(["ip", "netns", "exec", skill_ns, exe, "models", "share", DEFAULT_NAME, "--url", url],
                                env=node_env(home, {"P2P_SECRET": secret}), capture_output=True, text=True,
                                timeout=900, cwd=str(tmp_path))
        assert shared.returncode == 0, shared.stderr
        answer = skill("query", PROMPT, "--stream", "--max-tokens", "24").stdout.strip()
        assert answer, "the skill got no answer"
        skill("memory", "set", "wire/secret", MEMORY_VALUE)
        assert skill("memory", "get", "wire/secret").stdout.strip() == MEMORY_VALUE
        # New conversations are private: the owner searches them (the search text travels sealed all the same).
        searched = subprocess.run(["ip", "netns", "exec", skill_ns, exe, "conversations", "search", "zebra-unicorn-4711",
                                   "--json", "--url", url], env=node_env(home, {"P2P_SECRET": secret}),
                                  capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
        assert searched.returncode == 0, searched.stderr
        found = json.loads(searched.stdout)
        assert found["count"] >= 1  # the prompt was stored, and found by a search text that travelled sealed

        # The owner issues the /v1 key (its owner key is in the node's home); asked over the same wire, sealed.
        owner = subprocess.run(["ip", "netns", "exec", skill_ns, exe, "openai-key", "--json", "--url", url],
                               env=node_env(home, {"P2P_SECRET": secret}), capture_output=True, text=True,
                               timeout=600, cwd=str(tmp_path))
        assert owner.returncode == 0, owner.stderr
        key = json.loads(owner.stdout)
        v1 = subprocess.run(["ip", "netns", "exec", skill_ns, sys.executable, "-c", V1_CLIENT,
                             f"https://{node_address}:{TLS_PORT}", key["api_key"], str(home / "tls" / "cert.pem"),
                             V1_PROMPT], capture_output=True, text=True, timeout=600)
        assert v1.returncode == 0, v1.stderr
        v1_answer = v1.stdout.strip()
    finally:
        stop_file.touch()
        if capture is not None:
            capture.wait(30)
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(30)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait(10)

    streams = tcp_streams(capture_file)
    wire = b"\n".join(streams.values())
    to_node = b"\n".join(v for (_, _, _, dport), v in streams.items() if dport == PORT)
    # The capture saw the exchanges: the requests' paths, and the (unsealed, nothing secret) ping answer.
    assert b"POST /api/query" in to_node and b"POST /api/memory/set" in to_node
    assert b'"pong": true' in wire or b'"pong":true' in wire
    assert b"/v1/chat/completions" not in wire  # the HTTPS exchange: not even its path is in clear
    assert len(answer) >= 8 and len(v1_answer) >= 8  # so the checks below mean something
    for text in (PROMPT, "zebra-unicorn-4711", MEMORY_VALUE, "quokka-9265", answer, json.dumps(answer)[1:-1],
                 "event: token", '"answer"', V1_PROMPT, "walrus-parsnip-3318", v1_answer,
                 json.dumps(v1_answer)[1:-1], "chat.completion.chunk"):
        assert text.encode() not in wire, f"{text!r} crossed the link in clear text"
