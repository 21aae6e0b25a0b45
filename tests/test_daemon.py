"""serve --daemon / --stop: detaches, pid and log files, refuses a second start, stops gracefully."""

import json
import os
import signal
import subprocess
import sys
import time

import httpx

from nodes import free_port, node_env, owner_auth, run_cli, write_node_config


def test_daemon_lifecycle(tmp_path):
    home = tmp_path / "home"
    port = free_port()
    cfg = write_node_config(home, host="127.0.0.1", port=port, secret=None)
    run_cli("config", "set", "--config", str(cfg), "p2p.secret", "Tq7v" + os.urandom(24).hex(), env=node_env(home))
    env = node_env(home, {"PINKYBRAIN_CONFIG": str(cfg)})

    started = run_cli("serve", "--daemon", "--json", env=env)
    assert started.returncode == 0, started.stderr
    info = json.loads(started.stdout)
    pid = info["pid"]
    try:
        assert (home / "pinkybrain.pid").read_text().strip() == str(pid)
        assert (home / "pinkybrain.log").exists()
        # `serve --daemon` returns only once the API answers.
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", auth=owner_auth(home), timeout=10) as c:
            daemon = c.get("/api/daemon").json()
            assert daemon["pid"] == pid and daemon["start_mode"] == "daemon"
            assert daemon["log_file"] == str(home / "pinkybrain.log")
            c.post("/api/memory/set", json={"key": "kept", "value": "across restarts"}).raise_for_status()
        # The daemon left our session: it has its own process group.
        assert os.getpgid(pid) != os.getpgid(0)

        second = run_cli("serve", "--daemon", env=env)
        assert second.returncode != 0
        assert "already running" in second.stderr and str(pid) in second.stderr
        assert "Traceback" not in second.stderr
        foreground = subprocess.run([sys.executable, "-m", "pinkybrain.node", "serve", "--port", str(free_port())],
                                    env=env, capture_output=True, text=True, timeout=60)
        assert foreground.returncode != 0 and "already running" in foreground.stderr

        stopped = run_cli("serve", "--stop", env=env)
        assert stopped.returncode == 0, stopped.stderr
        assert f"pid {pid}" in stopped.stdout
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("daemon still alive after --stop")
    assert not (home / "pinkybrain.pid").exists()
    assert "Traceback" not in (home / "pinkybrain.log").read_text()

    again = run_cli("serve", "--stop", env=env)
    assert again.returncode != 0 and "no node is running" in again.stderr

    # What was written before the graceful stop is there after a restart.
    restarted = run_cli("serve", "--daemon", "--json", env=env)
    assert restarted.returncode == 0, restarted.stderr
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", auth=owner_auth(home), timeout=10) as c:
            assert c.get("/api/memory/kept").json()["value"] == "across restarts"
    finally:
        assert run_cli("serve", "--stop", env=env).returncode == 0


def test_daemon_start_failure_is_reported_with_the_log(tmp_path):
    home = tmp_path / "home"
    with __import__("socket").socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = write_node_config(home, host="127.0.0.1", port=port, secret="Tq7v" + os.urandom(24).hex())
        env = node_env(home, {"PINKYBRAIN_CONFIG": str(cfg)})
        result = run_cli("serve", "--daemon", env=env)
    assert result.returncode != 0
    assert "exited with status" in result.stderr and "could not listen" in result.stderr
    assert "Traceback" not in result.stderr


def test_sigterm_stops_a_foreground_node_cleanly(node):
    node.post("/api/memory/set", json={"key": "k", "value": "v"}).raise_for_status()
    code = node.stop(signal.SIGTERM)
    assert code == 0
    assert not (node.home / "pinkybrain.pid").exists()
    assert "Traceback" not in node.log()
