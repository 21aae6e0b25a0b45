"""A lender's RPC weight cache, filled from its own copy of the model, so a borrower's large tensors need
not cross the link.

How llama.cpp's RPC backend (ggml-rpc.cpp, the version install.sh builds) uses `rpc-server --cache`: before
sending a weight tensor larger than HASH_THRESHOLD, the client sends RPC_CMD_SET_TENSOR_HASH with the
FNV-1a 64 hash of the tensor's bytes; rpc-server looks for `$LLAMA_CACHE/rpc/<hash as 16 hex digits>` and,
if it is there, loads the tensor from it and the bytes are never sent. Otherwise the client sends the
tensor and rpc-server saves it under that name. The client hashes the bytes it would send: with the
model mmapped (llama-server's default) a whole tensor at once, exactly the bytes of the GGUF file. So a
lender holding the same file (same SHA-256, checked by its own share entry) can write those files itself.

The name is the hash of what we write, so a file here is never wrong for its name; a temporary name and a
rename mean rpc-server never reads a half-written one. Only blocks (blk.N.*) are written: the tensors a
split keeps on the borrower (embeddings, output) never go to a lender.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
from pathlib import Path

log = logging.getLogger("pinkybrain.split")

HASH_THRESHOLD = 10 * 1024 * 1024  # ggml-rpc.cpp: only tensors above this are asked for by hash
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
HELPER = "libfnv1a64.so"  # node/split/fnv1a64.c, built by install.sh beside the RPC tools
INDEX = "prefilled.json"  # tensor name -> cache file name, for the tensors written already
_BLOCK = re.compile(r"blk\.(\d+)\.")


def fnv1a64_py(data: bytes, value: int = FNV_OFFSET) -> int:
    """The reference (slow: for tests and small inputs)."""
    for byte in data:
        value = ((value ^ byte) * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return value


def load_fnv(folder: Path):
    """fnv(buffer) -> int from the C helper in `folder`, or None when it is not built."""
    path = folder / HELPER
    if not path.is_file():
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        log.warning("the FNV helper %s cannot be loaded: %s", path, exc)
        return None
    fn = lib.pinkybrain_fnv1a64
    fn.restype = ctypes.c_uint64
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint64]

    def fnv(array) -> int:  # a C-contiguous numpy array (a GGUF tensor's mmapped bytes)
        return int(fn(array.ctypes.data, array.nbytes, FNV_OFFSET))

    return fnv


def cache_files_folder(cache: Path) -> Path:
    """Where rpc-server, run with LLAMA_CACHE=`cache`, reads and writes its files (rpc-server.cpp)."""
    return cache / "rpc"


_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def tensor_infos(buf) -> list[tuple[str, int, int]]:
    """(name, offset in the file, bytes) of each tensor of a GGUF file's bytes (an mmap). Reads only what
    locates the tensors: gguf's GGUFReader builds an object per vocabulary entry, which takes tens of
    seconds for a 262k-token vocabulary on a loaded machine; a tunnel's opening waits for this."""
    import struct

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if bytes(buf[:4]) != b"GGUF":
        raise ValueError("not a GGUF file")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version < 2:
        raise ValueError(f"GGUF version {version} is not supported")
    pos = 24
    alignment = 32

    def string() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", buf, pos)
        pos += 8 + n
        return bytes(buf[pos - n:pos]).decode("utf-8", "replace")

    def skip(kind: int):
        nonlocal pos
        if kind == 8:
            return string()
        if kind == 9:
            inner, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if inner == 8:
                for _ in range(count):
                    (n,) = struct.unpack_from("<Q", buf, pos)
                    pos += 8 + n
            else:
                pos += count * struct.calcsize("<" + _SCALAR[inner])
            return None
        (value,) = struct.unpack_from("<" + _SCALAR[kind], buf, pos)
        pos += struct.calcsize("<" + _SCALAR[kind])
        return value

    for _ in range(n_kv):
        key = string()
        (kind,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        value = skip(kind)
        if key == "general.alignment" and isinstance(value, int) and value > 0:
            alignment = value
    infos = []
    for _ in range(n_tensors):
        name = string()
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        pos += 4 + 8 * n_dims
        qtype, offset = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        count = 1
        for d in dims:
            count *= d
        infos.append((name, offset, count // block * size))
    start = (pos + alignment - 1) // alignment * alignment
    return [(name, start + offset, n) for name, offset, n in infos]


def prefill(gguf_path: Path, cache: Path, fnv, layers: range | None = None) -> dict:
    """Write the large block tensors of `gguf_path` (those of `layers`, or all) into `cache` under the
    names rpc-server looks for; tensors written before are skipped. Returns what was done."""
    import mmap

    import numpy as np

    folder = cache_files_folder(cache)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    index_path = cache / INDEX
    try:
        index = json.loads(index_path.read_text())
        index = index if isinstance(index, dict) else {}
    except (OSError, ValueError):
        index = {}
    done = {"written": 0, "bytes": 0, "present": 0}
    from pinkybrain.node.services.models import open_model

    # open_model: no symlink followed, a regular file with one link (the mesh reads only shared_models/)
    with open_model(gguf_path) as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for tensor, offset, size in tensor_infos(buf):
            match = _BLOCK.match(tensor)
            if not match or size <= HASH_THRESHOLD or (layers is not None and int(match.group(1)) not in layers):
                continue
            name = index.get(tensor)
            if isinstance(name, str) and (folder / name).is_file():
                done["present"] += 1
                continue
            data = np.frombuffer(buf, dtype=np.uint8, count=size, offset=offset)
            index[tensor] = _write(folder, data, fnv, done)
            del data  # the mmap cannot close while a view of it lives
    tmp = index_path.with_suffix(".partial")
    tmp.write_text(json.dumps(index))
    os.replace(tmp, index_path)
    return done


def _write(folder: Path, data, fnv, done: dict) -> str:
    name = f"{fnv(data):016x}"
    target = folder / name
    if not target.is_file():  # rpc-server may have saved it already, from a borrower's send
        tmp = folder / f"{name}.{os.getpid()}.partial"  # never a 16-hex name: rpc-server ignores it
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
        done["written"] += 1
        done["bytes"] += data.nbytes
    else:
        done["present"] += 1
    return name
