"""Capabilities report: real values from this machine, GPU parsing, and the nvidia-smi path end to end."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
import sys
import textwrap
from pathlib import Path

import pytest

from pinkybrain.node.services import capabilities as caps

NVIDIA_SMI_OUTPUT = textwrap.dedent("""\
    NVIDIA H100 80GB HBM3, 81559, 550.54.15
    NVIDIA GeForce RTX 4090, 24564, 550.54.15
""")


@pytest.fixture(autouse=True)
def _fresh_cache():
    caps.clear_cache()
    yield
    caps.clear_cache()


def _fake_tool(bin_dir: Path, name: str, script_body: str) -> Path:
    """An executable on PATH named like the vendor tool; it records its argv so the call can be checked."""
    path = bin_dir / name
    path.write_text(f"#!{sys.executable}\n{script_body}", encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def test_real_machine_values(tmp_path):
    report = caps.collect_capabilities(tmp_path)
    json.dumps(report)  # the API returns it as JSON: it must serialise as is

    cpu = report["cpu"]
    assert cpu["logical_cores"] >= 1
    assert cpu["physical_cores"] is None or 1 <= cpu["physical_cores"] <= cpu["logical_cores"]
    assert cpu["usable_cores"] is None or 1 <= cpu["usable_cores"] <= cpu["logical_cores"]
    if sys.platform.startswith("linux") and "model name" in Path("/proc/cpuinfo").read_text():
        assert cpu["model"], "x86 Linux has a model name in /proc/cpuinfo"

    mem = report["memory"]
    assert mem["total_bytes"] > 0
    assert 0 < mem["available_bytes"] <= mem["total_bytes"]

    disk = report["disk"]
    usage = shutil.disk_usage(tmp_path)
    assert disk["total_bytes"] == usage.total
    assert 0 < disk["free_bytes"] <= disk["total_bytes"]

    assert report["os"]["system"]
    assert report["os"]["python"].count(".") == 2
    assert isinstance(report["gpus"], list)
    for gpu in report["gpus"]:
        assert gpu["vendor"] in {"nvidia", "amd", "apple"} and gpu["name"]


def test_gpu_list_matches_this_machine():
    gpus = caps.detect_gpus()
    if shutil.which("nvidia-smi") is None and shutil.which("rocm-smi") is None and sys.platform != "darwin":
        assert gpus == [], "no vendor tool is installed, so no GPU can be claimed"
    else:
        assert all(g["name"] for g in gpus)


def test_disk_of_missing_data_dir_uses_the_filesystem_it_would_be_created_on(tmp_path):
    report = caps.collect_capabilities(tmp_path / "not" / "yet" / "created")
    assert report["disk"]["free_bytes"] > 0
    assert report["disk"]["path"].endswith("created")


def test_llama_cpp_block_consistent_with_importability(tmp_path):
    block = caps.collect_capabilities(tmp_path)["llama_cpp"]
    importable = importlib.util.find_spec("llama_cpp") is not None
    assert block["available"] is importable
    if not importable:
        assert "ModuleNotFoundError" in block["reason"]
        return
    import llama_cpp

    assert block["version"] == llama_cpp.__version__
    assert block["gpu_offload"] is bool(llama_cpp.llama_supports_gpu_offload())
    assert "CPU" in block["backends"], block  # every llama.cpp build has the CPU backend
    assert any(d["backend"] == "CPU" for d in block["devices"]) or not block["devices"]
    assert block["system_info"] and "CPU" in block["system_info"]
    if not block["gpu_offload"]:
        assert set(block["backends"]) <= {"CPU", "BLAS", "RPC", "AMX"}, block


def test_llama_cpp_probe_is_cached(tmp_path, monkeypatch):
    first = caps.llama_cpp_info()
    monkeypatch.setattr(caps, "_probe_llama_cpp", lambda: pytest.fail("probe ran twice"))
    assert caps.llama_cpp_info() == first
    first["mutated"] = True  # callers get copies: the cache must not change
    assert "mutated" not in caps.llama_cpp_info()


def test_llama_cpp_absent_is_reported_not_raised(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` raise ImportError
    info = caps._probe_llama_cpp()
    assert info["available"] is False and "llama_cpp" in info["reason"]


def test_parse_system_info_backends():
    text = (
        "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | OPENMP = 1 | "
        "REPACK = 1 | CUDA : ARCHS = 890 | USE_GRAPHS = 1 | PEER_MAX_BATCH_SIZE = 128 | "
    )
    assert caps.parse_system_info_backends(text) == ["CPU", "CUDA"]
    assert caps.parse_system_info_backends("") == []


def test_parse_nvidia_smi():
    gpus = caps.parse_nvidia_smi(NVIDIA_SMI_OUTPUT + "\n")
    assert gpus == [
        {
            "vendor": "nvidia",
            "index": 0,
            "name": "NVIDIA H100 80GB HBM3",
            "memory_total_bytes": 81559 * 1024 * 1024,
            "driver_version": "550.54.15",
        },
        {
            "vendor": "nvidia",
            "index": 1,
            "name": "NVIDIA GeForce RTX 4090",
            "memory_total_bytes": 24564 * 1024 * 1024,
            "driver_version": "550.54.15",
        },
    ]


def test_parse_nvidia_smi_odd_rows():
    gpus = caps.parse_nvidia_smi("Tesla T4, [N/A], [N/A]\ngarbage line\n\nA, weird, name, 15360, 535.1\n")
    assert gpus[0] == {
        "vendor": "nvidia",
        "index": 0,
        "name": "Tesla T4",
        "memory_total_bytes": None,
        "driver_version": None,
    }
    assert gpus[1]["name"] == "A, weird, name" and gpus[1]["memory_total_bytes"] == 15360 * 1024 * 1024
    assert len(gpus) == 2
    assert caps.parse_nvidia_smi("") == []


def test_parse_rocm_smi():
    product = json.dumps(
        {
            "card0": {"Card Series": "AMD Instinct MI210", "Card Model": "0x740f", "GFX Version": "gfx90a"},
            "card1": {"Card series": "Radeon RX 7900 XTX", "Card model": "0x744c"},
            "system": {"Driver version": "6.7.0"},
        }
    )
    meminfo = json.dumps(
        {"card0": {"VRAM Total Memory (B)": "68702699520", "VRAM Total Used Memory (B)": "10960896"}}
    )
    gpus = caps.parse_rocm_smi(product, meminfo)
    assert [(g["name"], g["memory_total_bytes"]) for g in gpus] == [
        ("AMD Instinct MI210", 68702699520),
        ("Radeon RX 7900 XTX", None),
    ]
    assert gpus[0]["gfx_version"] == "gfx90a" and all(g["vendor"] == "amd" for g in gpus)
    assert caps.parse_rocm_smi("not json") == []


def test_fake_nvidia_smi_on_path_end_to_end(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    argv_log = tmp_path / "argv.json"
    _fake_tool(
        bin_dir,
        "nvidia-smi",
        textwrap.dedent(f"""\
        import json, sys
        open({str(argv_log)!r}, "w").write(json.dumps(sys.argv[1:]))
        sys.stdout.write({NVIDIA_SMI_OUTPUT!r})
    """),
    )
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")

    gpus = caps.detect_gpus()
    nvidia = [g for g in gpus if g["vendor"] == "nvidia"]
    assert [g["name"] for g in nvidia] == ["NVIDIA H100 80GB HBM3", "NVIDIA GeForce RTX 4090"]
    assert json.loads(argv_log.read_text()) == [
        "--query-gpu=name,memory.total,driver_version",
        "--format=csv,noheader,nounits",
    ]
    # and through the full report, which is what the API serves
    report = caps.collect_capabilities(tmp_path)
    assert [g["name"] for g in report["gpus"] if g["vendor"] == "nvidia"] == [g["name"] for g in nvidia]


def test_failing_or_hanging_nvidia_smi_never_raises(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    _fake_tool(bin_dir, "nvidia-smi", "import sys\nsys.stderr.write('NVIDIA-SMI has failed')\nsys.exit(9)\n")
    assert [g for g in caps.detect_gpus() if g["vendor"] == "nvidia"] == []

    _fake_tool(bin_dir, "nvidia-smi", "import time\ntime.sleep(30)\n")
    monkeypatch.setattr(caps, "SUBPROCESS_TIMEOUT_SECS", 0.5)
    assert [g for g in caps.detect_gpus() if g["vendor"] == "nvidia"] == []


def test_gpu_probe_is_cached_between_requests(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(caps, "detect_gpus", lambda: calls.append(1) or [])
    caps.collect_capabilities(tmp_path)
    caps.collect_capabilities(tmp_path)
    assert len(calls) == 1
