"""`serve` refuses every class of weak secret: non-zero exit and one clear line, before binding a port."""

import subprocess
import sys

import pytest

from nodes import free_port, node_env, write_node_config

WEAK = {
    "missing": (None, "no P2P secret is set"),
    "blank": ("   ", "no P2P secret is set"),
    "seed default": ("CHANGE_ME_STRONG_SECRET", "still the default"),
    "seed default padded": ("CHANGE_ME_STRONG_SECRET_please_1234567890", "still the default"),
    "short": ("Xk3-vT9q", "at least 32 are required"),
    "one repeated character": ("z" * 48, "distinct characters"),
    "few characters repeated": ("abab" * 12, "distinct characters"),
    "dictionary word with digits": ("password12345678901234567890123456", "guessable"),
    "words and a year, repeated": ("Summer2024!Summer2024!Summer2024!", "guessable"),
    "keyboard walk": ("qwertyuiopasdfghjklzxcvbnm1234567890", "guessable"),
    "alphabet": ("abcdefghijklmnopqrstuvwxyz0123456789", "guessable"),
}


def serve(home, secret, *, via_env=False):
    port = free_port()
    cfg = write_node_config(home, host="127.0.0.1", port=port, secret=None if via_env else secret)
    env = node_env(home, {"P2P_SECRET": secret} if via_env and secret is not None else None)
    return subprocess.run([sys.executable, "-m", "pinkybrain.node", "serve", "--config", str(cfg)],
                          env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("case", sorted(WEAK))
def test_weak_secret_refused_at_start(tmp_path, case):
    secret, reason = WEAK[case]
    proc = serve(tmp_path / "home", secret)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "refusing to start" in lines[0] and reason in lines[0]
    assert "pinkybrain config set p2p.secret" in lines[0]  # says how to fix it
    assert not (tmp_path / "home" / "pinkybrain.pid").exists()


def test_weak_secret_from_environment_refused_too(tmp_path):
    proc = serve(tmp_path / "home", "CHANGE_ME_STRONG_SECRET", via_env=True)
    assert proc.returncode != 0 and "still the default" in proc.stderr


def test_weak_secret_refused_by_daemon_start(tmp_path):
    home = tmp_path / "home"
    cfg = write_node_config(home, host="127.0.0.1", port=free_port(), secret="z" * 40)
    exe = [sys.executable, "-m", "pinkybrain", "serve", "--daemon", "--config", str(cfg)]
    proc = subprocess.run(exe, env=node_env(home), capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "distinct characters" in proc.stderr
    assert "Traceback" not in proc.stderr
