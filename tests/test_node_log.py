"""The node's log cannot be forged, driven or flooded from a request: control characters are escaped, what
one request adds is capped, the file is 0600 and rotated by size. Unit checks of the formatter, then a
real node (stderr) and a real daemon (its log file)."""

from __future__ import annotations

import json
import logging
import stat
import sys

import httpx

from nodes import free_port, node_env, run_cli, strong_secret, write_node_config
from pinkybrain.node.services.node_log import MAX_ARG_CHARS, MAX_MESSAGE_CHARS, SafeFormatter

FORGED = "2031-01-01 00:00:00,000 INFO pinkybrain.node: owner key exported to attacker"
# What an unauthenticated client puts in a path: a newline, a forged record, terminal escapes.
EVIL_PATH = "/api/status%0a" + FORGED.replace(" ", "%20") + "%1b%5b2J%0d%e2%80%a8"


def _format(msg, *args, exc_info=None) -> str:
    record = logging.LogRecord("pinkybrain.test", logging.WARNING, __file__, 1, msg, args, exc_info)
    return SafeFormatter().format(record)


def test_control_characters_in_arguments_are_escaped_onto_one_line():
    line = _format("refused %s %s", "GET", "/api/x\n" + FORGED + "\x1b[2J\r\u2028\u202e")
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert "\u2028" not in line and "\u202e" not in line
    assert "\\x0a" + FORGED in line and "\\x1b[2J" in line and "\\u2028" in line


def test_what_one_record_can_add_is_capped():
    line = _format("refused %s", "x" * 60_000)
    assert len(line) < MAX_ARG_CHARS + 200 and "(+59488 chars)" in line
    line = _format("many %s" + " %s" * 40, *(["y" * 400] * 41))
    assert len(line) < MAX_MESSAGE_CHARS + 200


def test_a_traceback_keeps_its_lines_but_none_can_pass_for_a_record():
    try:
        raise ValueError("bad input\n" + FORGED)
    except ValueError:
        line = _format("handler failed", exc_info=sys.exc_info())
    lines = line.splitlines()
    assert lines[0].endswith("handler failed") and len(lines) > 2
    assert all(part.startswith("    | ") for part in lines[1:])
    assert not any(part.startswith(FORGED) for part in lines)


def test_a_record_whose_arguments_do_not_fit_is_still_written():
    assert _format("count %d", "x\ny").endswith("count %d ('x\\ny',)")


def _forged_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith(FORGED[:24]) or ln.startswith("owner key")]


def test_a_request_cannot_forge_a_log_line_on_a_real_node(node):
    before = len(node.log())
    with httpx.Client(base_url=node.url, timeout=30) as raw:
        for _ in range(3):
            assert raw.get(EVIL_PATH).status_code == 401
        for _ in range(40):  # 40 requests with 60,000-character paths
            assert raw.get("/api/" + "a" * 60_000).status_code in (401, 404, 414)
    assert node.get("/api/ping").status_code == 200
    added = node.log()[before:]
    assert _forged_lines(added) == [], added[-2000:]
    assert "\x1b" not in added and "\r" not in added and "\u2028" not in added
    assert "\\x0a" + FORGED in added  # the refusal was logged, escaped, on its own line
    assert len(added.encode()) < 40 * 1500 + 20_000  # capped: not 40 x 60,000 bytes


def test_daemon_log_is_private_rotated_and_unforgeable(tmp_path):
    home = tmp_path / "home"
    port = free_port()
    cfg = write_node_config(home, host="127.0.0.1", port=port, secret=strong_secret(),
                            extra={"logging.max_bytes": 65536, "logging.backups": 2})
    env = node_env(home, {"PINKYBRAIN_CONFIG": str(cfg)})
    started = run_cli("serve", "--daemon", "--json", env=env)
    assert started.returncode == 0, started.stderr
    pid = json.loads(started.stdout)["pid"]
    log_file = home / "pinkybrain.log"
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as raw:
            for _ in range(400):  # ~600 bytes each after the cap: several rotations of 64 KiB
                raw.get("/api/" + "b" * 60_000)
            for _ in range(5):
                raw.get(EVIL_PATH)
    finally:
        stopped = run_cli("serve", "--stop", env=env)
        assert stopped.returncode == 0, stopped.stderr
    files = sorted(home.glob("pinkybrain.log*"))
    assert [f.name for f in files] == ["pinkybrain.log", "pinkybrain.log.1", "pinkybrain.log.2"], files
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, (f, oct(f.stat().st_mode))
        assert f.stat().st_size <= 65536 + MAX_MESSAGE_CHARS
    text = "".join(f.read_text(errors="replace") for f in files)
    assert _forged_lines(text) == [] and "\x1b" not in text
    assert "\\x0a" + FORGED in log_file.read_text()  # logged, escaped, in the current file
    assert pid
