"""Split inference when a node cannot hold the model and when a lender goes away, over three real nodes
(node/split). A holds the default model but may give its models only `inference.memory_limit_mb`, less
than the model needs; B and C lend (`sharing.split: true`).

- Asked without `split`, A splits the model on its own: its part within the limit, a lender the rest.
- A lender killed (SIGKILL) in the middle of an answer ends that answer with a clear error event, in
  bounded time; A stays up and its next query plans a new split over the lender left.
- With no lender left, the model is refused with the memory error, streamed or not.
The tests run in order and share the nodes (model runs are slow on a small machine).
"""

from __future__ import annotations

import signal
import time

import psutil
import pytest
from test_remote_inference import BOUND_SECS, wait_for
from test_split_inference import three_split_nodes

from model import DEFAULT_NAME
from nodes import query_events, start_node

pytestmark = pytest.mark.timeout(1200)  # split loads take minutes on a loaded machine
LIMIT_MB = 200  # the default model needs ~330 MiB whole; its embeddings (~170 MiB) and a few blocks fit
PROFILE = {"counter": {"description": "Counts, deterministically.", "system_prompt": "You count numbers.",
                       "temperature": 0.0, "top_p": 1.0, "max_tokens": 200}}
LONG_PROMPT = "Count from 1 to 300, one number per line."
SHORT = {"prompt": "Say hello.", "model": DEFAULT_NAME, "mode": "specialist", "specialist": "counter",
         "max_tokens": 8}


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    secret, ports, homes, common = three_split_nodes(tmp_path_factory, "splitfault", PROFILE)
    nodes, rpc_pids = {}, set()
    try:
        for name in "bc":
            nodes[name] = start_node(homes[name], port=ports[name], secret=secret,
                                     extra={**common, "sharing.split": True, "sharing.split_idle_secs": 300})
        nodes["a"] = start_node(homes["a"], port=ports["a"], secret=secret,
                                extra={**common, "inference.memory_limit_mb": LIMIT_MB,
                                       "p2p.peers": [f"http://127.0.0.1:{ports[n]}" for n in "bc"]})
        ids = {name: n.get("/api/ping").json()["node_id"] for name, n in nodes.items()}
        wait_for(lambda: nodes["a"].get("/api/capabilities").json()["split"]["lenders_now"] == 2, 60,
                 "a to see b and c lending")
        yield {"nodes": nodes, "ids": ids, "rpc_pids": rpc_pids}
    finally:
        for node in nodes.values():
            node.stop()
        # Should an rpc-server outlive its SIGKILLed lender (the test would have failed), do not leave it.
        for pid in rpc_pids:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def events_of(node, body: dict, on_event=None) -> list[tuple[str, dict]]:
    """A streamed query's events (a read waits ten minutes at most, for a split's first load on a loaded
    machine)."""
    return query_events(node, body, on_event, timeout=600)


def split_entry(node) -> dict | None:
    return next((m for m in node.get("/api/models/ps").json()["models"] if m.get("split")), None)


def test_a_model_over_the_memory_limit_is_split_without_asking(net):
    a, ids = net["nodes"]["a"], net["ids"]
    events = events_of(a, SHORT)
    assert not [d for e, d in events if e == "error"], events
    end = next(d for e, d in events if e == "end")
    assert end["answer"].strip()
    local = [p for p in end["split"] if p["local"]]
    lent = [p for p in end["split"] if not p["local"]]
    assert [p["node"] for p in local] == [ids["a"]] and lent
    assert {p["node"] for p in lent} <= {ids["b"], ids["c"]}
    n_layers = sum(p["layer_count"] for p in end["split"])
    assert local[0]["layer_count"] < n_layers and all(p["layer_count"] >= 1 for p in lent)
    ps = a.get("/api/models/ps").json()["models"]
    assert [m["model"] for m in ps] == [DEFAULT_NAME] and ps[0]["split"]  # not loaded whole as well
    assert ps[0]["tunnel_bytes_out"] > 0


def test_a_lender_killed_mid_answer_ends_it_with_a_clear_error_and_the_next_query_replans(net):
    a, ids, nodes = net["nodes"]["a"], net["ids"], net["nodes"]
    entry = split_entry(a)
    if entry is None:  # the test above loads the split; alone, this one loads it
        events_of(a, SHORT)
        entry = split_entry(a)
    lender = next(name for name in "bc" if ids[name] in {p["node"] for p in entry["parts"] if not p["local"]})
    survivor = "c" if lender == "b" else "b"
    lent_pids = {s["pid"] for s in nodes[lender].get("/api/capabilities").json()["split"]["lending"]}
    assert lent_pids
    net["rpc_pids"].update(lent_pids)
    killed = {}

    def on_event(event, data):
        if event == "token" and not killed:
            killed["at"] = time.monotonic()
            nodes[lender].stop(signal.SIGKILL)

    events = events_of(a, {**SHORT, "prompt": LONG_PROMPT, "max_tokens": 200}, on_event)
    assert killed, "no token came before the answer ended"
    assert time.monotonic() - killed["at"] < BOUND_SECS
    kind, data = events[-1]
    assert kind == "error", events[-3:]
    assert f"lender {ids[lender][:7]} went away" in data["detail"], data
    assert not [d for e, d in events if e == "end"]
    assert a.get("/api/ping").status_code == 200  # the borrower is fine
    # The kernel stops a SIGKILLed lender's rpc-servers (PR_SET_PDEATHSIG): none is left holding the model.
    wait_for(lambda: not any(_running(pid) for pid in lent_pids), 30, "the lender's rpc-servers to die with it")
    wait_for(lambda: a.get("/api/capabilities").json()["split"]["lenders_now"] == 1, 60, "a to see the lender gone")
    assert split_entry(a) is None  # the broken split is unloaded
    again = events_of(a, SHORT)
    assert not [d for e, d in again if e == "error"], again
    end = next(d for e, d in again if e == "end")
    assert end["answer"].strip()
    assert {p["node"] for p in end["split"]} == {ids["a"], ids[survivor]}
    net["survivor"] = survivor


def test_with_no_lender_left_the_model_is_refused_for_memory(net):
    a, nodes = net["nodes"]["a"], net["nodes"]
    for name in "bc":
        nodes[name].stop()
    wait_for(lambda: a.get("/api/capabilities").json()["split"]["lenders_now"] == 0, 60, "a to see no lender")
    wait_for(lambda: split_entry(a) is None, 30, "the split to unload with its lender")
    events = events_of(a, SHORT)
    kind, data = events[-1]
    assert kind == "error", events
    assert "needs about" in data["detail"] and f"inference.memory_limit_mb ({LIMIT_MB})" in data["detail"], data
    with a.client() as c:
        r = c.post("/api/query", json=SHORT)
    assert r.status_code in (502, 503), r.text
    assert "needs about" in r.text and "memory_limit_mb" in r.text
    assert a.get("/api/ping").status_code == 200
