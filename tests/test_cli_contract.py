"""What an agent or a script may rely on from the `pinkybrain` command: --json on every command, errors
under --json as one JSON object on stderr, shell completion, and `config init` keeping an exported
P2P_SECRET instead of silently writing another one."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import click
import typer
import yaml

from nodes import free_port, node_env, run_cli, strong_secret

EXE = str(Path(sys.executable).with_name("pinkybrain"))


def _commands():
    from pinkybrain.cli import build_app

    def walk(command, path):
        if hasattr(command, "commands"):
            for name, sub in command.commands.items():
                yield from walk(sub, [*path, name])
        else:
            yield path, command

    return list(walk(typer.main.get_command(build_app()), []))


def test_every_command_takes_json():
    commands = _commands()
    assert len(commands) > 30  # the walk really reached the sub-apps (memory, trust, release, tracker, ...)
    missing = [" ".join(path) for path, cmd in commands
               if "--json" not in {opt for p in cmd.params for opt in getattr(p, "opts", ())}]
    assert missing == []
    assert all(isinstance(cmd, click.Command) or hasattr(cmd, "params") for _, cmd in commands)


def test_json_errors_are_one_json_object_on_stderr(tmp_path):
    env = node_env(tmp_path / "home", {"P2P_SECRET": strong_secret()})
    cases = [
        # (arguments, expected exit status, start of the error)
        (["status", "--json", "--url", f"127.0.0.1:{free_port()}"], 1, "cannot reach the node at"),
        (["identity", "show", "--json", "--config", str(tmp_path / "absent.yaml")], 2, "config file"),
        (["release", "verify", str(Path(__file__)), "--json"], 1, "the release manifest is not valid JSON"),
        (["status", "--json", "--no-such-flag"], 2, "No such option: --no-such-flag"),
    ]
    for args, code, start in cases:
        result = run_cli(*args, env=env)
        assert result.returncode == code, (args, result.stderr)
        assert result.stdout == "", args
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, (args, result.stderr)
        error = json.loads(lines[0])
        assert error["exit_code"] == code and error["error"].startswith(start), (args, error)
    # Control: without --json the same failure is the usual one-line text.
    plain = run_cli("identity", "show", "--config", str(tmp_path / "absent.yaml"), env=env)
    assert plain.returncode == 2 and plain.stderr.startswith("pinkybrain: config file")


def test_shell_completion_installs_and_completes(tmp_path):
    env = node_env(tmp_path / "home", {"HOME": str(tmp_path), "SHELL": "/bin/bash"})
    installed = run_cli("--install-completion", "bash", env=env)
    assert installed.returncode == 0, installed.stderr
    script = tmp_path / ".bash_completions" / "pinkybrain.sh"
    assert script.is_file() and str(script) in (tmp_path / ".bashrc").read_text()
    completing = dict(env, COMP_WORDS="pinkybrain memory s", COMP_CWORD="2", _PINKYBRAIN_COMPLETE="complete_bash")
    words = subprocess.run([EXE], env=completing, capture_output=True, text=True, timeout=60).stdout.split()
    assert words == ["set"]


def test_config_init_uses_the_exported_secret(tmp_path):
    secret = strong_secret()
    env = node_env(tmp_path / "home", {"P2P_SECRET": secret})
    result = run_cli("config", "init", "--no-interactive", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["secret_source"] == "P2P_SECRET"
    written = yaml.safe_load((tmp_path / "home" / "pinkybrain.yaml").read_text())["p2p"]["secret"]
    assert written == secret


def test_config_init_says_when_it_generates(tmp_path):
    env = node_env(tmp_path / "home")  # node_env drops any P2P_SECRET of the machine
    result = run_cli("config", "init", "--no-interactive", env=env)
    assert result.returncode == 0, result.stderr
    assert "newly generated secret: no --secret given and P2P_SECRET is not set" in result.stdout


def test_config_init_refuses_a_weak_exported_secret(tmp_path):
    env = node_env(tmp_path / "home", {"P2P_SECRET": "password123"})
    result = run_cli("config", "init", "--no-interactive", env=env)
    assert result.returncode == 2
    assert "(from the exported P2P_SECRET)" in result.stderr
    assert not (tmp_path / "home" / "pinkybrain.yaml").exists()


def test_tracker_serve_json_prints_where_it_listens(tmp_path):
    env = node_env(tmp_path / "home")
    proc = subprocess.Popen([EXE, "tracker", "serve", "--port", "0", "--json"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        line = proc.stdout.readline()
        ready = json.loads(line)
        assert ready["host"] == "127.0.0.1" and ready["port"] > 0 and ready["pid"] == proc.pid
        assert ready["url"] == f"ws://127.0.0.1:{ready['port']}"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
