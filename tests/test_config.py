import json
import stat

import pytest
import yaml

from nodes import node_env, run_cli
from pinkybrain.node.core.config import ConfigError, load_config, set_values


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("PINKYBRAIN_HOME", str(home))
    monkeypatch.delenv("PINKYBRAIN_CONFIG", raising=False)
    monkeypatch.delenv("P2P_SECRET", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return home, work


def test_defaults_match_the_seed_reference(isolated):
    cfg = load_config()
    assert cfg.file is None
    assert cfg["node.port"] == 8080
    assert cfg.listen_address() == ("0.0.0.0", 8080)
    assert cfg["p2p.tracker"] == "wss://tracker.pinkybrain.ai"
    assert cfg["mesh.public"] is False and cfg["mesh.stealth"] is False
    assert cfg["sharing.cloud_models"] is False
    assert (cfg["resource_guard.cpu_threshold"], cfg["resource_guard.ram_threshold"]) == (80, 85)
    assert cfg["resource_guard.cooldown_secs"] == 300
    assert (cfg["credit.earn_per_query"], cfg["credit.initial_balance"]) == (1.0, 10.0)
    assert cfg["conversations.default_privacy"] == "private"
    assert cfg["conversations.retention_days"] == 90
    assert cfg["logging.public_mesh"] is False


def test_lookup_order(isolated, tmp_path, monkeypatch):
    home, work = isolated
    home.mkdir()
    write(home / "pinkybrain.yaml", {"node": {"name": "from-home"}})
    assert load_config()["node.name"] == "from-home"
    write(work / "pinkybrain.yaml", {"node": {"name": "from-cwd"}})
    assert load_config()["node.name"] == "from-cwd"
    env_file = write(tmp_path / "env.yaml", {"node": {"name": "from-env"}})
    monkeypatch.setenv("PINKYBRAIN_CONFIG", str(env_file))
    assert load_config()["node.name"] == "from-env"
    flag_file = write(tmp_path / "flag.yaml", {"node": {"name": "from-flag"}})
    assert load_config(str(flag_file))["node.name"] == "from-flag"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_relative_paths_are_taken_from_the_config_folder(isolated, tmp_path):
    (tmp_path / "etc").mkdir()
    f = write(tmp_path / "etc" / "pinkybrain.yaml", {})
    cfg = load_config(str(f))
    assert cfg.path("sharing.shared_models_dir") == tmp_path / "etc" / "shared_models"
    assert cfg.path("conversations.storage") == tmp_path / "etc" / "conversations"


def test_env_secret_overrides_file(isolated, tmp_path, monkeypatch):
    f = write(tmp_path / "c.yaml", {"p2p": {"secret": "from-file-" + "x" * 30}})
    assert load_config(str(f))["p2p.secret"].startswith("from-file-")
    monkeypatch.setenv("P2P_SECRET", "from-env-" + "y" * 30)
    cfg = load_config(str(f))
    assert cfg["p2p.secret"].startswith("from-env-") and cfg.secret_from_env


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"node": {"prot": 8080}}, "unknown config key 'node.prot'; did you mean 'node.port'"),
        ({"nodes": {"port": 8080}}, "unknown config key 'nodes.port'"),
        ({"node": {"port": "eighty"}}, "node.port must be a whole number"),
        ({"node": {"port": 70000}}, "node.port must be at most 65535"),
        ({"mesh": {"stealth": "yes please"}}, "mesh.stealth must be true or false"),
        ({"resource_guard": {"cpu_threshold": 150}}, "resource_guard.cpu_threshold must be at most 100"),
        ({"conversations": {"default_privacy": "secret"}}, "conversations.default_privacy must be one of"),
        ({"p2p": {"peers": "http://a:1, http://b:2", "listen": "1.2.3.4:nope"}}, "p2p.listen must be host"),
        ({"node": {"port": 9000}, "p2p": {"listen": "0.0.0.0:9001"}}, "make them agree"),
        ({"mesh": 5}, "mesh must be a section"),
    ],
)
def test_bad_config_is_a_clear_error_naming_the_key(isolated, tmp_path, data, message):
    f = write(tmp_path / "bad.yaml", data)
    with pytest.raises(ConfigError) as info:
        load_config(str(f))
    assert message in str(info.value)


def test_invalid_yaml_names_the_line(isolated, tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("node:\n  name: a\n   port: [\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d"):
        load_config(str(f))


def test_seed_short_form_at_top_level_and_in_set(isolated, tmp_path):
    f = write(tmp_path / "c.yaml", {"stealth": True})
    assert load_config(str(f))["mesh.stealth"] is True
    set_values(f, [("stealth", "false"), ("resource_guard.cpu_threshold", "55"), ("peers", "http://a:1,http://b:2")])
    cfg = load_config(str(f))
    assert cfg["mesh.stealth"] is False
    assert cfg["resource_guard.cpu_threshold"] == 55.0
    assert cfg["p2p.peers"] == ["http://a:1", "http://b:2"]
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    with pytest.raises(ConfigError, match="mesh.public must be true or false"):
        set_values(f, [("public", "maybe")])
    assert load_config(str(f))["mesh.public"] is False  # a refused edit leaves the file as it was


def test_cli_config_init_set_show(tmp_path):
    home = tmp_path / "home"
    env = node_env(home)
    init = run_cli("config", "init", "--name", "lab-1", "--port", "8181", "--stealth", env=env)
    assert init.returncode == 0, init.stderr
    path = home / "pinkybrain.yaml"
    secret = yaml.safe_load(path.read_text())["p2p"]["secret"]
    assert len(secret) >= 32
    again = run_cli("config", "init", env=env)
    assert again.returncode != 0 and "exists" in again.stderr
    weak = run_cli("config", "init", "--force", "--secret", "password123", env=env)
    assert weak.returncode != 0 and "at least 32" in weak.stderr

    set_short = run_cli("config", "set", "stealth", "false", env=env)
    assert set_short.returncode == 0, set_short.stderr
    set_dotted = run_cli("config", "set", "resource_guard.ram_threshold", "70", env=env)
    assert set_dotted.returncode == 0
    unknown = run_cli("config", "set", "resource_guard.ram_treshold", "70", env=env)
    assert unknown.returncode != 0
    assert "unknown config key 'resource_guard.ram_treshold'" in unknown.stderr
    wrong_type = run_cli("config", "set", "node.port", "abc", env=env)
    assert wrong_type.returncode != 0 and "node.port must be a whole number" in wrong_type.stderr
    assert "Traceback" not in unknown.stderr + wrong_type.stderr

    shown = run_cli("config", "show", "--json", env=env)
    assert shown.returncode == 0
    data = json.loads(shown.stdout)
    assert data["config"]["node"] == {"name": "lab-1", "port": 8181}
    assert data["config"]["mesh"]["stealth"] is False
    assert data["config"]["resource_guard"]["ram_threshold"] == 70.0
    assert secret not in shown.stdout
    human = run_cli("config", "show", env=env)
    assert secret not in human.stdout and "hidden" in human.stdout
    env_secret = dict(env, P2P_SECRET="e" * 10 + secret)
    assert env_secret["P2P_SECRET"] not in run_cli("config", "show", env=env_secret).stdout


def test_config_init_asks_on_a_terminal(tmp_path):
    """On a TTY, `config init` asks; an empty secret answer generates a strong one."""
    import os
    import pty
    import select
    import subprocess
    import sys

    home = tmp_path / "home"
    master, slave = pty.openpty()
    exe = [str(__import__("pathlib").Path(sys.executable).with_name("pinkybrain")), "config", "init"]
    import fcntl
    import termios

    def own_terminal():  # a real session: the pty becomes the controlling terminal (getpass needs it)
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(exe, stdin=slave, stdout=slave, stderr=slave, env=node_env(home), close_fds=True,
                            preexec_fn=own_terminal)
    os.close(slave)
    answers = [("Node name", "attic-box"), ("API port", "8282"), ("Network secret", ""),
               ("public mesh", "n"), ("Stealth", "y")]
    seen = ""
    pending = None  # getpass flushes input typed before it switches echo off: resend until the next prompt
    try:
        for prompt, answer in answers:
            waited = 0.0
            while prompt not in seen:
                ready, _, _ = select.select([master], [], [], 0.5)
                waited += 0.5
                assert waited < 30, f"no prompt {prompt!r}; got {seen!r}"
                if ready:
                    seen += os.read(master, 4096).decode(errors="replace")
                elif pending is not None:
                    os.write(master, pending)
            seen = seen[seen.index(prompt):]
            pending = (answer + "\n").encode() if prompt == "Network secret" else None
            os.write(master, (answer + "\n").encode())
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        os.close(master)
    data = yaml.safe_load((home / "pinkybrain.yaml").read_text())
    assert data["node"] == {"name": "attic-box", "port": 8282}
    assert data["mesh"] == {"public": False, "stealth": True}
    assert len(data["p2p"]["secret"]) >= 32
