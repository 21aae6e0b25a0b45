"""Installed names are not generic, and the seed's spellings of the command work."""

import subprocess
import sys
import zipfile
from pathlib import Path

from nodes import node_env, run_cli

ROOT = Path(__file__).parents[1]


def test_wheel_installs_only_under_the_pinkybrain_namespace(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("pinkybrain-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"pinkybrain"}
    for module in ("pinkybrain/node/api/app.py", "pinkybrain/node/core/config.py", "pinkybrain/skill/cli.py",
                   "pinkybrain/v5.py"):
        assert module in names
    # every folder of node/ and skill/ holding Python code made it into the wheel
    for folder in ("node", "skill"):
        for py in (ROOT / folder).rglob("*.py"):
            assert f"pinkybrain/{py.relative_to(ROOT)}" in names, py


def test_seed_spellings(tmp_path):
    env = node_env(tmp_path)
    v5 = subprocess.run([sys.executable, "-m", "pinkybrain.v5", "--help"], env=env, capture_output=True, text=True)
    assert v5.returncode == 0 and "identity" in v5.stdout and "query" in v5.stdout
    script = run_cli("--help", env=env)
    assert script.returncode == 0 and script.stdout == v5.stdout
    version = run_cli("--version", env=env)
    assert version.returncode == 0 and version.stdout.strip()[0].isdigit()


def test_no_generic_top_level_modules_are_importable(tmp_path):
    probe = "import importlib.util as u; print(u.find_spec('node'), u.find_spec('skill'))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None None"
