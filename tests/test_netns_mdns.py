"""Two real nodes on different addresses, each in a network namespace of its own joined by a veth pair,
find each other over mDNS (real multicast on that link) and link up from what they found.

The namespaces, the veth pair and the 10.231.77.0/24 addresses exist only for the test and are removed
at its end; no traffic leaves them. Needs Linux, iproute2's `ip` and the right to create namespaces
(root or CAP_SYS_ADMIN + CAP_NET_ADMIN); where the machine forbids that, the test is skipped and says why.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from nodes import node_env, strong_secret, write_node_config

SUBNET = "10.231.77"
PORT = 8080  # each namespace has its own ports: both nodes may use the same one
FAST = {"p2p.heartbeat_secs": 0.5, "p2p.dead_after_secs": 2.0}
DENIED = ("Operation not permitted", "Permission denied", "must be root", "Cannot open network namespace")

# Run inside a namespace: signed calls to the node there, polling until the condition holds (or time runs
# out), then the last answers as JSON. One process per check, since only code inside the namespace can
# reach the node's address.
PROBE = r"""
import json, sys, time
import httpx
from pinkybrain.skill.signing import HmacAuth

url, secret, other, timeout, credential = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5]
deadline = time.monotonic() + timeout
out = {}
with httpx.Client(base_url=url, auth=HmacAuth(secret, credential=credential), timeout=5) as c:
    while time.monotonic() < deadline:
        try:
            out["ping"] = c.get("/api/ping").json()
            if other == "-":
                break
            out["discover"] = c.get("/api/discover").json()
            out["peers"] = c.get("/api/peers").json()
        except httpx.HTTPError as exc:
            out["error"] = str(exc)
            time.sleep(0.2)
            continue
        found = [n for n in out["discover"]["mdns"]["nodes"] if n.get("node_id") == other]
        if found and any(p["node_id"] == other for p in out["peers"]["peers"]):
            break
        time.sleep(0.3)
print(json.dumps(out))
"""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def probe(ns: str, url: str, secret: str, other: str, timeout: float, credential: str = "mesh") -> dict:
    """`secret`: the network secret, or the owner key with credential "owner" (/api/discover is the owner's)."""
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", PROBE, url, secret, other, str(timeout), credential],
        capture_output=True, text=True, timeout=timeout + 30,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def namespaces():
    if not sys.platform.startswith("linux"):
        pytest.skip("network namespaces are Linux only")
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` command is not installed (apt-get install iproute2)")
    tag = f"{os.getpid() % 100000}"
    names = (f"pbmdns-{tag}-a", f"pbmdns-{tag}-b")
    veths = (f"pbv{tag}a", f"pbv{tag}b")  # interface names are at most 15 characters
    made = ip("netns", "add", names[0], check=False)
    if made.returncode != 0:
        if any(word in made.stderr for word in DENIED):
            pytest.skip(f"network namespaces are not permitted here: {made.stderr.strip()}")
        raise RuntimeError(f"ip netns add failed: {made.stderr.strip()}")
    try:
        ip("netns", "add", names[1])
        ip("link", "add", veths[0], "type", "veth", "peer", "name", veths[1])
        for i, (ns, veth) in enumerate(zip(names, veths, strict=True), start=1):
            ip("link", "set", veth, "netns", ns)
            ip("-n", ns, "addr", "add", f"{SUBNET}.{i}/24", "dev", veth)
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "set", veth, "up", "multicast", "on")
        yield [(ns, f"{SUBNET}.{i}") for i, ns in enumerate(names, start=1)]
    finally:
        for ns in names:  # deleting a namespace deletes the veth end inside it, and with it the pair
            ip("netns", "del", ns, check=False)
        ip("link", "del", veths[0], check=False)  # only there if setup failed before the move


def test_two_nodes_in_separate_namespaces_find_each_other_over_mdns(namespaces, tmp_path):
    secret = strong_secret()
    procs, nodes = [], []
    try:
        for ns, address in namespaces:
            home = tmp_path / ns
            config = write_node_config(home, host=address, port=PORT, secret=secret,
                                       extra={**FAST, "p2p.mdns": True})
            log = open(home / "test-node.log", "ab")  # noqa: SIM115 - closed with the process below
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "pinkybrain.node", "serve", "--config",
                 str(config)],
                stdout=log, stderr=subprocess.STDOUT, env=node_env(home), cwd=str(home))
            log.close()
            procs.append(proc)
            nodes.append({"ns": ns, "address": address, "url": f"http://{address}:{PORT}", "home": home})
        for node in nodes:
            up = probe(node["ns"], node["url"], secret, "-", 60)
            assert "ping" in up, f"{node['ns']}: node did not come up: {up}\n{(node['home'] / 'test-node.log').read_text()}"
            node["id"] = up["ping"]["node_id"]
        for node, other in ((nodes[0], nodes[1]), (nodes[1], nodes[0])):
            owner_key = json.loads((node["home"] / "owner.key").read_text())["key"]
            seen = probe(node["ns"], node["url"], owner_key, other["id"], 60, "owner")
            logs = (node["home"] / "test-node.log").read_text()
            assert seen["discover"]["mdns"]["available"], logs
            found = [n for n in seen["discover"]["mdns"]["nodes"] if n["node_id"] == other["id"]]
            assert found, f"{node['ns']} did not hear {other['ns']} over mDNS: {seen}\n{logs}"
            assert found[0]["addresses"] == [other["address"]] and found[0]["port"] == PORT
            # What mDNS found is dialled: the two are linked, over the namespace addresses.
            peers = {p["node_id"]: p for p in seen["peers"]["peers"]}
            assert other["id"] in peers, seen
            assert peers[other["id"]]["address"].split(":")[0] == other["address"]
            assert "Traceback" not in logs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
