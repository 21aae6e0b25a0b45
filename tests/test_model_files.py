"""Model files against real nodes: what sits in shared_models/ is read only if it is a regular file inside it
(a FIFO or a symlink leading out is never opened, the start-up scan included, and the node still stops on
SIGTERM), and a shared file swapped for another of the same size is not served to a peer again."""

from __future__ import annotations

import ctypes
import os
import signal
import struct
import sys
import time

import pytest

from model import DEFAULT_NAME, place_default_model, write_tiny_gguf
from nodes import free_port, run_cli, start_node, strong_secret

FAST = {"p2p.heartbeat_secs": 0.5, "p2p.dead_after_secs": 2.0}
IN_OPEN, IN_ACCESS = 0x20, 0x01


class OpenWatch:
    """inotify IN_OPEN/IN_ACCESS on files: proves a process never opened or read them (stat is not seen)."""

    def __init__(self, *paths):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, ctypes.get_errno()
        self.names = {}
        for path in paths:
            wd = self.libc.inotify_add_watch(self.fd, os.fsencode(path), IN_OPEN | IN_ACCESS)
            assert wd >= 0, (path, ctypes.get_errno())
            self.names[wd] = str(path)

    def events(self) -> list[str]:
        seen = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return seen
            offset = 0
            while offset < len(data):
                wd, mask, _cookie, length = struct.unpack_from("iIII", data, offset)
                seen.append(f"{self.names.get(wd)} mask={mask:#x}")
                offset += 16 + length

    def close(self):
        os.close(self.fd)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")
def test_fifo_and_outside_symlink_are_never_opened_and_the_node_stops_on_sigterm(tmp_path):
    home = tmp_path / "node"
    models = home / "shared_models"
    models.mkdir(parents=True)
    outside = write_tiny_gguf(tmp_path / "outside-secret.gguf")  # a valid GGUF: parsing it would succeed
    (models / "escape.gguf").symlink_to(outside)
    os.mkfifo(models / "x.gguf")  # opened for reading without O_NONBLOCK, this blocks for ever
    write_tiny_gguf(models / "fine.gguf")
    watch = OpenWatch(outside, models / "x.gguf")
    try:
        node = start_node(home)
        try:
            listed = {m["name"]: m for m in node.get("/api/models").json()["models"]}
            assert listed["fine"]["usable"] is True and listed["fine"]["architecture"] == "llama"
            assert listed["x"]["usable"] is False and "regular file" in listed["x"]["problem"]
            assert listed["escape"]["usable"] is False and "outside" in listed["escape"]["problem"]
            for name in ("x", "escape"):
                r = node.post(f"/api/models/{name}/share")
                assert r.status_code == 400 and r.json()["error"] == "refused_path", r.text
            r = node.post("/api/query", json={"prompt": "hi", "mode": "single", "model": "escape"})
            assert r.status_code in (400, 502, 503) and "escape" in r.text
            deadline = time.monotonic() + 30
            while "skipping x.gguf" not in node.log() and time.monotonic() < deadline:
                time.sleep(0.1)
            log = node.log()
            assert "skipping x.gguf" in log and "skipping escape.gguf" in log  # the start-up scan refused both
        finally:
            started = time.monotonic()
            code = node.stop(signal.SIGTERM, timeout=30)
        assert code == 0 and time.monotonic() - started < 30
        assert watch.events() == []  # neither the FIFO nor the file outside was ever opened or read
    finally:
        watch.close()


def _swap_same_size(path):
    """Another file of the same size under the same name and mtime: one byte of tensor data changed."""
    st = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(st.st_size - 1)
        last = fh.read(1)
        fh.seek(st.st_size - 1)
        fh.write(bytes([last[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def _wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def test_a_shared_model_swapped_for_one_of_the_same_size_is_not_served_to_a_peer(tmp_path):
    secret = strong_secret()
    b_port = free_port()
    common = {**FAST, "inference.n_ctx": 512, "p2p.remote_timeout_secs": 120}
    model_file = place_default_model(tmp_path / "b" / "shared_models")
    b = start_node(tmp_path / "b", port=b_port, secret=secret, extra=common)
    a = start_node(tmp_path / "a", secret=secret, extra={**common, "p2p.peers": [f"http://127.0.0.1:{b_port}"]})
    try:
        b_id = b.get("/api/ping").json()["node_id"]
        assert b.post(f"/api/models/{DEFAULT_NAME}/share").status_code == 200

        def a_sees(models):
            peer = next((p for p in a.get("/api/peers").json()["peers"] if p["node_id"] == b_id), None)
            return peer is not None and peer["shared_models"] == models

        _wait_for(lambda: a_sees([DEFAULT_NAME]), 30, "a to see b's shared model")
        body = {"prompt": "Say hi.", "mode": "single", "model": DEFAULT_NAME, "max_tokens": 4}
        with a.client() as c:
            served = c.post("/api/query", json=body)
        assert served.status_code == 200, served.text  # the positive control: b serves the file it shared
        assert served.json()["answers"][0]["node"] == b_id

        _swap_same_size(model_file)
        with a.client() as c:
            refused = c.post("/api/query", json=body)
        assert refused.status_code == 502 and refused.json()["error"] == "no_answer", refused.text
        assert "changed on disk" in refused.json()["detail"]  # noticed before it was served again
        status = _wait_for(lambda: b.get("/api/status").json()["sharing"]["withdrawn"], 60, "b to withdraw it")
        assert status[-1]["model"] == DEFAULT_NAME and "SHA-256" in status[-1]["reason"]
        # The log line follows the status entry (the re-hash runs in a worker thread): wait for it too.
        _wait_for(lambda: f"unshared model {DEFAULT_NAME}: SHA-256 no longer matches" in b.log(), 10,
                  "b to log the withdrawal")
        local = {m["name"]: m for m in b.get("/api/models").json()["models"]}
        assert local[DEFAULT_NAME]["shared"] is False  # locally: b lists it as not shared
        _wait_for(lambda: a_sees([]), 30, "a to see the share withdrawn")
        with a.client() as c:
            again = c.post("/api/query", json=body)
        assert again.status_code in (502, 503), again.text
        assert b.log().count("serving a remote query") == 1  # only the positive control ever ran on b
    finally:
        a.stop()
        b.stop()


def test_a_refusal_names_the_peer_whose_guard_paused_sharing(tmp_path):
    """The only peer that could serve has paused sharing: the error says so, not just "available: none"."""
    secret = strong_secret()
    b_port = free_port()
    (tmp_path / "b" / "shared_models").mkdir(parents=True)
    write_tiny_gguf(tmp_path / "b" / "shared_models" / "tiny.gguf")
    b = start_node(tmp_path / "b", port=b_port, secret=secret, extra={
        **FAST, "resource_guard.ram_threshold": 1, "resource_guard.sustain_secs": 0.3,
        "resource_guard.sample_secs": 0.1})
    a = start_node(tmp_path / "a", secret=secret, extra={**FAST, "p2p.peers": [f"http://127.0.0.1:{b_port}"]})
    try:
        b_id = b.get("/api/ping").json()["node_id"]
        assert b.post("/api/models/tiny/share").status_code == 200

        def a_sees_b_paused():
            peer = next((p for p in a.get("/api/peers").json()["peers"] if p["node_id"] == b_id), None)
            return peer is not None and peer["guard"]["sharing_paused"]

        _wait_for(a_sees_b_paused, 30, "a to see b's guard pause sharing")
        r = a.post("/api/query", json={"prompt": "hi", "mode": "single", "model": "tiny"})
        assert r.status_code in (502, 503), r.text
        detail = r.json()["detail"]
        assert "available: none" in detail and f"({b_id[:7]}) has paused sharing: RAM" in detail, detail
        cli = run_cli("query", "hi", "--url", a.url, env={**a.env, "P2P_SECRET": secret})
        assert cli.returncode != 0 and "has paused sharing" in cli.stderr, cli.stderr
        assert len(cli.stderr.strip().splitlines()) == 1
    finally:
        a.stop()
        b.stop()
