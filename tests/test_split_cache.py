"""Weights move once (node/split/rpc_cache.py): a lender that shares the same GGUF itself fills llama.cpp's
RPC weight cache from its own copy, so a borrower's large tensors do not cross the link even on the first
load. The test model is the default one with a wider feed-forward whose last blocks are F32 (tests/model.py:
write_wide_model): the default model has no tensor a lender holds above ggml-rpc's 10 MiB hash threshold.
"""

from __future__ import annotations

import json
import mmap
import shutil

import pytest
from test_remote_inference import wait_for

from model import default_model_file, write_wide_model
from nodes import free_port, query_events, start_node, strong_secret
from pinkybrain.node.split.rpc_cache import (
    FNV_OFFSET,
    HASH_THRESHOLD,
    INDEX,
    cache_files_folder,
    fnv1a64_py,
    load_fnv,
    prefill,
    tensor_infos,
)
from pinkybrain.node.split.tools import find_tools

F32_LAYERS = range(14, 18)  # the last blocks: a split puts them on the lender
pytestmark = pytest.mark.timeout(1500)  # two split loads of a 400 MB model: minutes on a loaded machine
PROFILE = {"greedy": {"description": "Greedy.", "system_prompt": "You answer briefly.", "temperature": 0.0,
                      "top_p": 1.0, "max_tokens": 8}}


@pytest.fixture(scope="module")
def wide_model():
    # Built once per machine beside the default model (a few minutes: it dequantizes 12 tensors).
    return write_wide_model(default_model_file().with_name("pinkybrain-test-wide-ff-f32-14-17.gguf"), F32_LAYERS)


@pytest.fixture(scope="module")
def fnv():
    tools = find_tools()
    if not tools.usable:  # a failure, never a skip: install.sh builds the tools
        pytest.fail(f"split inference needs llama.cpp's RPC tools: {tools.problem}")
    fn = load_fnv(tools.folder)
    if fn is None:
        pytest.fail(f"install.sh builds the FNV helper into {tools.folder}")
    return fn


def test_the_helper_hashes_as_llama_cpp_does(fnv):
    import numpy as np

    # FNV-1a 64's published vectors (ggml-rpc.cpp's fnv_hash is FNV-1a 64 from the standard offset)
    assert fnv1a64_py(b"") == FNV_OFFSET == 0xCBF29CE484222325
    assert fnv1a64_py(b"a") == 0xAF63DC4C8601EC8C
    assert fnv1a64_py(b"foobar") == 0x85944171F73967E8
    for data in (b"", b"a", b"foobar", bytes(range(256)) * 41):
        assert fnv(np.frombuffer(data, dtype=np.uint8)) == fnv1a64_py(data)


def test_prefill_writes_the_large_block_tensors_once_under_their_hash(wide_model, fnv, tmp_path):
    import gguf

    cache = tmp_path / "cache"
    done = prefill(wide_model, cache, fnv, range(16, 18))
    folder = cache_files_folder(cache)
    files = sorted(p.name for p in folder.iterdir())
    assert done["written"] == 6 and len(files) == 6  # ffn gate/up/down of blocks 16 and 17, nothing else
    assert all(len(name) == 16 and int(name, 16) >= 0 for name in files)  # rpc-server's "%016" PRIx64
    reader = gguf.GGUFReader(str(wide_model), "r")
    tensor = next(t for t in reader.tensors if t.name == "blk.17.ffn_down.weight")
    assert int(tensor.n_bytes) > HASH_THRESHOLD
    name = json.loads((cache / INDEX).read_text())["blk.17.ffn_down.weight"]
    content = (folder / name).read_bytes()
    assert content == tensor.data.tobytes() and name == f"{fnv1a64_py(content):016x}"
    with open(wide_model, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        assert tensor_infos(buf) == [(t.name, int(t.data_offset), int(t.n_bytes)) for t in reader.tensors]
    again = prefill(wide_model, cache, fnv, range(14, 18))  # the ones written before are not written again
    assert again["written"] == 6 and again["present"] == 6
    assert len(list(folder.iterdir())) == 12


@pytest.fixture(scope="module")
def pair(tmp_path_factory, wide_model, fnv):
    secret = strong_secret()
    ports = {name: free_port() for name in "ab"}
    homes = {name: tmp_path_factory.mktemp(f"splitcache-{name}") for name in "ab"}
    for home in homes.values():  # both have the file; only B's share says so to its split service
        (home / "shared_models").mkdir()
        shutil.copyfile(wide_model, home / "shared_models" / "wide.gguf")
    # not FAST heartbeats: on a loaded machine a 2 s silence would drop the link in the middle of a load
    common = {"inference.n_ctx": 512, "inference.n_threads": 1, "specialists.profiles": PROFILE}
    nodes = {}
    try:
        nodes["b"] = start_node(homes["b"], port=ports["b"], secret=secret,
                                extra={**common, "sharing.split": True, "sharing.split_idle_secs": 300})
        # keep_alive: A unloads the split soon after an answer, so the next query loads it afresh
        nodes["a"] = start_node(homes["a"], port=ports["a"], secret=secret,
                                extra={**common, "inference.keep_alive_secs": 1,
                                       "p2p.peers": [f"http://127.0.0.1:{ports['b']}"]})
        wait_for(lambda: nodes["a"].get("/api/capabilities").json()["split"]["lenders_now"] == 1, 60,
                 "a to see b lending")
        yield nodes
    finally:
        for node in nodes.values():
            node.stop()


def load_and_ask(a) -> tuple[dict, int]:
    """A fresh split load and answer; the bytes A sent through tunnels meanwhile."""
    wait_for(lambda: not [m for m in a.get("/api/models/ps").json()["models"] if m.get("split")], 60,
             "the previous split to unload")
    before = a.get("/api/status").json()["mesh"]["private"]["tunnel_bytes_out"]
    body = {"prompt": "Name a colour.", "model": "wide", "mode": "specialist", "specialist": "greedy",
            "split": True}
    events = query_events(a, body, timeout=600)
    assert not [d for e, d in events if e == "error"], events
    sent = a.get("/api/status").json()["mesh"]["private"]["tunnel_bytes_out"] - before
    return next(d for e, d in events if e == "end"), sent


def assert_lender_holds_the_large_tensors(end: dict) -> None:
    (lent,) = [p for p in end["split"] if not p["local"]]
    assert lent["layers"][0] <= F32_LAYERS.start and lent["layers"][1] == F32_LAYERS.stop - 1, end["split"]


def test_a_lender_with_the_model_in_shared_models_is_not_sent_its_large_tensors(pair, wide_model):
    import gguf

    a, b = pair["a"], pair["b"]
    first, sent_without = load_and_ask(a)
    reader = gguf.GGUFReader(str(wide_model), "r")
    large = sum(int(t.n_bytes) for t in reader.tensors if int(t.n_bytes) > HASH_THRESHOLD and t.name.startswith("blk."))
    assert large >= 12 * HASH_THRESHOLD  # the F32 feed-forward of blocks 14-17, and nothing else
    assert_lender_holds_the_large_tensors(first)
    assert sent_without > large  # without its own copy, the lender was sent them

    # Forget what rpc-server cached from that load; then B shares its own copy of the same file.
    (sha_dir,) = (b.home / "rpc-cache").iterdir()
    (borrower_dir,) = sha_dir.iterdir()  # A's own folder: no other borrower reads or writes it
    shutil.rmtree(cache_files_folder(borrower_dir))
    r = b.post("/api/models/wide/share")
    assert r.status_code == 200 and r.json()["entry"]["sha256"] == sha_dir.name, r.text
    second, sent_with = load_and_ask(a)
    assert_lender_holds_the_large_tensors(second)
    assert second["answer"] == first["answer"] and second["completion_tokens"] == first["completion_tokens"]
    assert sent_with < sent_without - 0.95 * large, (sent_with, sent_without, large)
    assert b.get("/api/capabilities").json()["split"]["cache_prefilled_bytes"] == large
    print(f"first load sent {sent_without / 2**20:.1f} MiB without the lender's copy, "
          f"{sent_with / 2**20:.1f} MiB with it ({large / 2**20:.1f} MiB of large tensors)")


def test_each_borrower_has_its_own_weight_cache(tmp_path):
    """rpc-server names cached tensors by FNV-1a, which a mesh member can collide on purpose: a folder
    shared between borrowers would let one plant weights another's load of the same model then uses."""
    from pinkybrain.node.split.lender import RpcServers
    from pinkybrain.node.split.tools import find_tools

    servers = RpcServers(find_tools(), tmp_path / "rpc-cache")
    sha = "ab" * 32
    one, other = servers.cache_dir("member-one", sha), servers.cache_dir("member-two", sha)
    assert one != other
    assert one.parent == other.parent == tmp_path / "rpc-cache" / sha
    assert servers.cache_dir("member-one", sha) == one  # stable: the second load finds its cache
    assert not one.is_relative_to(other) and not other.is_relative_to(one)
