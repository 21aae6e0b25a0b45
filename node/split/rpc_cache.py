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


def prefill(gguf_path: Path, cache: Path, fnv, layers: range | None = None) -> dict:
    """Write the large block tensors of `gguf_path` (those of `layers`, or all) into `cache` under the
    names rpc-server looks for; tensors written before are skipped. Returns what was done."""
    import numpy as np
    from gguf import GGUFReader

    folder = cache_files_folder(cache)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    index_path = cache / INDEX
    try:
        index = json.loads(index_path.read_text())
        index = index if isinstance(index, dict) else {}
    except (OSError, ValueError):
        index = {}
    done = {"written": 0, "bytes": 0, "present": 0}
    reader = GGUFReader(str(gguf_path), "r")
    for tensor in reader.tensors:
        match = _BLOCK.match(tensor.name)
        if not match or int(tensor.n_bytes) <= HASH_THRESHOLD:
            continue
        if layers is not None and int(match.group(1)) not in layers:
            continue
        name = index.get(tensor.name)
        if isinstance(name, str) and (folder / name).is_file():
            done["present"] += 1
            continue
        data = np.ascontiguousarray(tensor.data)
        name = f"{fnv(data):016x}"
        target = folder / name
        if not target.is_file():  # rpc-server may have saved it already, from a borrower's send
            tmp = folder / f"{name}.{os.getpid()}.partial"  # never a 16-hex name: rpc-server ignores it
            with open(tmp, "wb") as fh:
                fh.write(memoryview(data).cast("B"))
            os.replace(tmp, target)
            done["written"] += 1
            done["bytes"] += data.nbytes
        else:
            done["present"] += 1
        index[tensor.name] = name
    tmp = index_path.with_suffix(".partial")
    tmp.write_text(json.dumps(index))
    os.replace(tmp, index_path)
    return done
