"""`serve` refuses every class of weak secret: non-zero exit and one clear line, before binding a port."""

import hashlib
import secrets
import string
import subprocess
import sys

import pytest
import yaml

from nodes import free_port, node_env, strong_secret, write_node_config
from pinkybrain.node.core.config import ConfigError, load_config
from pinkybrain.node.core.secrets import MIN_LENGTH, WeakSecretError, check_secret, generate_secret

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


# -- normalised comparisons, well-known strings, the config file, no echo ------------------------------
WELL_KNOWN = [
    "The quick brown fox jumps over the lazy dog",
    "the-quick-brown-fox-jumps-over-the-lazy-dog",
    "THE_QUICK_BROWN_FOX_JUMPS_OVER_THE_LAZY_DOG_1",
    "Pack my box with five dozen liquor jugs!!",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit",
    "lorem-ipsum-dolor-sit-amet-consectetur",
    "Duis aute irure dolor in reprehenderit in voluptate",
    "correct-horse-battery-staple-correct-horse",
    "123e4567-e89b-12d3-a456-426614174000",
    "123E4567E89B12D3A456426614174000",
    "550e8400-e29b-41d4-a716-446655440000",
    "f47ac10b-58cc-4372-a567-0e02b2c3d479",
    "6ba7b810-9dad-11d1-80b4-00c04fd430c8",
    "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
    "00000000-0000-0000-0000-000000000000",
    hashlib.sha256(b"").hexdigest(),
    hashlib.sha256(b"").hexdigest().upper(),
    hashlib.md5(b"").hexdigest(),  # noqa: S324 (a well-known value, not a use of MD5)
    hashlib.sha1(b"").hexdigest(),  # noqa: S324
    hashlib.md5(b"password").hexdigest(),  # noqa: S324
    "CHANGE-ME-STRONG-SECRET-CHANGE-ME",
    "change_me_strong_secret_change_me",
    "Change Me Strong Secret 2024 please now",
    "changeme-changeme-changeme-changeme",
    "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "sk_test_4eC39HqLyjWDarjtT1zdp7dc",
    "192b9bdd22ab9ed4d12e236c78afcb9a393ec15f71bbf5dc987d54727823bcbf",
]


def test_the_27_well_known_strings_are_refused():
    assert len(WELL_KNOWN) == 27 and all(len(s) >= MIN_LENGTH for s in WELL_KNOWN)  # not refused for length
    for secret in WELL_KNOWN:
        with pytest.raises(WeakSecretError) as info:
            check_secret(secret)
        message = str(info.value)
        assert secret not in message and secret.lower() not in message.lower(), message
        assert "at least 32 are required" not in message


@pytest.mark.parametrize("variant", ["CHANGE-ME-STRONG-SECRET-CHANGE-ME", "change me strong secret 123456789012",
                                     "Change.Me.Strong.Secret/xK9#mQ2$vL7@pR4", "cHaNgE_mE_sTrOnG_sEcReT_7xQ2mW9vK3pL"])
def test_seed_default_is_recognised_whatever_its_case_and_separators(variant):
    with pytest.raises(WeakSecretError, match="still the default"):
        check_secret(variant)


def test_a_well_known_string_with_a_strong_random_part_is_judged_by_that_part():
    check_secret("the-quick-brown-fox-" + secrets.token_urlsafe(32))  # the random part alone is strong
    with pytest.raises(WeakSecretError, match="well-known"):
        check_secret("the-quick-brown-fox-jumps-over-the-lazy-dog-" + "2024")


def test_strong_random_secrets_are_accepted():
    alphabet = string.ascii_letters + string.digits + string.punctuation
    for _ in range(10):
        for secret in (generate_secret(), secrets.token_hex(32), secrets.token_urlsafe(48),
                       "".join(secrets.choice(alphabet) for _ in range(MIN_LENGTH))):
            check_secret(secret)


def test_a_config_file_others_can_read_is_refused_without_echoing_the_secret(tmp_path):
    home = tmp_path / "home"
    secret = strong_secret()
    cfg = write_node_config(home, host="127.0.0.1", port=free_port(), secret=secret)
    cfg.chmod(0o644)
    proc = subprocess.run([sys.executable, "-m", "pinkybrain.node", "serve", "--config", str(cfg)],
                          env=node_env(home), capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "refusing to start" in lines[0] and f"chmod 600 {cfg}" in lines[0], proc.stderr
    assert secret not in proc.stderr + proc.stdout
    assert not (home / "pinkybrain.pid").exists()


def test_group_readable_config_warns_and_private_one_is_quiet(tmp_path):
    home = tmp_path / "home"
    cfg_file = write_node_config(home, host="127.0.0.1", port=free_port(), secret=strong_secret())
    env = node_env(home)
    assert load_config(str(cfg_file), env=env).secret_file_problem() is None  # 0600
    cfg_file.chmod(0o640)
    message, refuse = load_config(str(cfg_file), env=env).secret_file_problem()
    assert not refuse and "its group" in message and "chmod 600" in message
    cfg_file.chmod(0o604)
    assert load_config(str(cfg_file), env=env).secret_file_problem()[1] is True


@pytest.mark.parametrize("shape", ["list", "mapping", "bool-list", "short form mapping"])
def test_a_secret_of_the_wrong_yaml_type_is_never_echoed(tmp_path, shape):
    home = tmp_path / "home"
    secret = strong_secret()
    cfg = write_node_config(home, host="127.0.0.1", port=free_port(), secret=None)
    data = yaml.safe_load(cfg.read_text())
    value = {"list": [secret], "mapping": {"value": secret}, "bool-list": [True, secret],
             "short form mapping": None}[shape]
    if shape == "short form mapping":  # the seed's top-level `secret:`, holding a mapping
        data["secret"] = {secret: 1}
    else:
        data["p2p"]["secret"] = value
    cfg.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_config(str(cfg), env=node_env(home))
    assert "p2p.secret" in str(info.value) and secret not in str(info.value)
    proc = subprocess.run([sys.executable, "-m", "pinkybrain.node", "serve", "--config", str(cfg)],
                          env=node_env(home), capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "p2p.secret" in proc.stderr
    assert secret not in proc.stderr + proc.stdout
