"""`pinkybrain service status`: how the operating system's service manager sees this node, the systemd
unit on Linux or the launchd job on macOS (what the node's own /api/daemon cannot say when it is down)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from pinkybrain.node.services import launchd

UNIT = "pinkybrain.service"
SYSTEMD_PROPERTIES = ("LoadState", "ActiveState", "SubState", "MainPID", "ExecMainStatus", "FragmentPath")


def systemd_status(unit: str = UNIT) -> dict:
    base = {"manager": "systemd", "unit": unit}
    if shutil.which("systemctl") is None:
        return {**base, "installed": False, "active": False, "detail": "systemctl not found"}
    done = subprocess.run(
        ["systemctl", "show", unit, "--no-pager", *(f"--property={p}" for p in SYSTEMD_PROPERTIES)],
        capture_output=True, text=True, timeout=10, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return {**base, "installed": False, "active": False, "detail": f"systemctl: {reason}"}
    return {**base, **parse_show(done.stdout)}


def parse_show(text: str) -> dict:
    props = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    pid = props.get("MainPID", "0")
    return {
        "installed": props.get("LoadState") == "loaded",
        "active": props.get("ActiveState") == "active",
        "state": f"{props.get('ActiveState', '?')} ({props.get('SubState', '?')})",
        "pid": int(pid) if pid.isdigit() and pid != "0" else None,
        "last_exit": props.get("ExecMainStatus"),
        "unit_file": props.get("FragmentPath") or None,
    }


def status() -> dict:
    if sys.platform == "darwin":
        agent = launchd.status(f"gui/{os.getuid()}")
        return agent if agent["loaded"] else {**launchd.status("system"), "agent": agent["detail"]}
    return systemd_status()


def describe(info: dict) -> str:
    name = info.get("unit") or info.get("label")
    if not (info.get("installed") or info.get("loaded")):
        return f"{name} ({info['manager']}): not installed — {info.get('detail', '')}".rstrip(" —")
    pid = f", pid {info['pid']}" if info.get("pid") else ""
    return f"{name} ({info['manager']}): {info.get('state')}{pid}, last exit status {info.get('last_exit')}"
