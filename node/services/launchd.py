"""macOS launchd: the job install.sh installs from systemd/ai.pinkybrain.node.plist, and its status.

    python -m pinkybrain.node.services.launchd render --template T --install-dir D --home H --out F
        [--system --user NAME]

render fills the template's paths (the program in the install's .venv, PINKYBRAIN_HOME, the working
directory and the two log files) for a per-user LaunchAgent, or with --system for a LaunchDaemon that runs
as NAME; install.sh then bootstraps it with launchctl.
"""

from __future__ import annotations

import argparse
import plistlib
import re
import subprocess
import sys
from pathlib import Path

LABEL = "ai.pinkybrain.node"


class LaunchdError(ValueError):
    pass


def render(template: bytes, *, install_dir: Path, home: Path, system: bool = False, user: str | None = None) -> bytes:
    for name, path in (("install dir", install_dir), ("home", home)):
        if not path.is_absolute():
            raise LaunchdError(f"the {name} must be an absolute path (launchd resolves nothing): {path}")
    if system and not user:
        raise LaunchdError("a LaunchDaemon (--system) needs the user it runs as (--user)")
    job = plistlib.loads(template)
    if job.get("Label") != LABEL:
        raise LaunchdError(f"the template's Label is {job.get('Label')!r}, not {LABEL}")
    job["ProgramArguments"] = [str(install_dir / ".venv" / "bin" / "pinkybrain"), "serve"]
    job["EnvironmentVariables"] = {**job.get("EnvironmentVariables", {}), "PINKYBRAIN_HOME": str(home),
                                   "PINKYBRAIN_START_MODE": "launchd"}
    job["WorkingDirectory"] = str(home)
    job["StandardOutPath"] = str(home / "node.log")
    job["StandardErrorPath"] = str(home / "node.err.log")
    if system:
        job["UserName"] = user
    else:
        job.pop("UserName", None)
    text = plistlib.dumps(job, sort_keys=False)
    if b"USERNAME" in text:
        raise LaunchdError("a placeholder of the template (USERNAME) was left in the job")
    return text


def job_path(system: bool, user_home: Path) -> Path:
    folder = Path("/Library/LaunchDaemons") if system else user_home / "Library" / "LaunchAgents"
    return folder / f"{LABEL}.plist"


def status(domain: str) -> dict:
    """`launchctl print DOMAIN/LABEL`: whether the job is loaded, its state and pid."""
    try:
        done = subprocess.run(["launchctl", "print", f"{domain}/{LABEL}"], capture_output=True, text=True,
                              timeout=10, check=False)
    except OSError as exc:
        return {"manager": "launchd", "label": LABEL, "loaded": False, "detail": f"launchctl: {exc.strerror}"}
    if done.returncode != 0:
        return {"manager": "launchd", "label": LABEL, "loaded": False, "domain": domain,
                "detail": f"{LABEL} is not loaded in {domain}"}
    return {"manager": "launchd", "label": LABEL, "domain": domain, "loaded": True, **parse_print(done.stdout)}


def parse_print(text: str) -> dict:
    """The few fields of `launchctl print` that say how the job runs (its format is for humans; only
    `key = value` lines at the job's top level are read)."""
    fields = dict(re.findall(r"(?m)^\t(state|pid|last exit code|program) = (.+)$", text))
    pid = fields.get("pid", "")
    return {
        "state": fields.get("state"),
        "active": fields.get("state") == "running",
        "pid": int(pid) if pid.isdigit() else None,
        "last_exit": fields.get("last exit code"),
        "program": fields.get("program"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pinkybrain.node.services.launchd")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("render", help="fill the plist template for this install")
    r.add_argument("--template", type=Path, required=True)
    r.add_argument("--install-dir", type=Path, required=True)
    r.add_argument("--home", type=Path, required=True)
    r.add_argument("--system", action="store_true", help="a LaunchDaemon (boot, no login) instead of an agent")
    r.add_argument("--user", help="with --system: the user the daemon runs as")
    r.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        text = render(args.template.read_bytes(), install_dir=args.install_dir, home=args.home,
                      system=args.system, user=args.user)
    except (LaunchdError, OSError, plistlib.InvalidFileException) as exc:
        print(f"launchd: {exc}", file=sys.stderr)
        return 1
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_bytes(text)
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
