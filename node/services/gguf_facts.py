"""Facts about a GGUF file, read from its header with the `gguf` package, cached by (size, mtime).

Parsing a header reads the whole tokenizer vocabulary (seconds for large vocabularies), so results
are kept in a small JSON cache in the node's home and recomputed only when the file changes.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

_lock = threading.Lock()


def read_gguf_facts(path: Path) -> dict:
    from gguf import GGUFReader, LlamaFileType

    reader = GGUFReader(str(path), "r")

    def field(name: str, default=None):
        f = reader.fields.get(name)
        if f is None:
            return default
        try:
            return f.contents()
        except (ValueError, IndexError, TypeError):
            return default

    arch = field("general.architecture", "unknown")
    file_type = field("general.file_type")
    try:
        quant = LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_") if file_type is not None else None
    except ValueError:
        quant = f"type-{file_type}"
    return {
        "architecture": arch,
        "model_name": field("general.name"),
        "size_label": field("general.size_label"),
        "parameters": int(sum(int(t.n_elements) for t in reader.tensors)),
        "quantization": quant,
        "context_length": field(f"{arch}.context_length"),
        "block_count": field(f"{arch}.block_count"),
        "embedding_length": field(f"{arch}.embedding_length"),
        "head_count_kv": field(f"{arch}.attention.head_count_kv"),
        "key_length": field(f"{arch}.attention.key_length"),
        "value_length": field(f"{arch}.attention.value_length"),
        "has_chat_template": "tokenizer.chat_template" in reader.fields,
        "license": field("general.license"),
    }


class GgufFactsCache:
    def __init__(self, cache_file: Path):
        self.cache_file = cache_file
        try:
            self._data: dict = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            self._data = {}
        self._parsing: dict[str, threading.Lock] = {}

    def get(self, path: Path) -> dict:
        key = str(path.resolve())
        with _lock:
            file_lock = self._parsing.setdefault(key, threading.Lock())
        # One parse per file at a time: a share and the start-up scan asking together wait for one result.
        with file_lock:
            st = path.stat()
            stamp = [st.st_size, st.st_mtime_ns]
            with _lock:
                hit = self._data.get(key)
                if hit and hit.get("stamp") == stamp:
                    return hit["facts"]
            facts = read_gguf_facts(path)
            self._store(key, stamp, facts)
            return facts

    def _store(self, key: str, stamp: list, facts: dict) -> None:
        with _lock:
            self._data[key] = {"stamp": stamp, "facts": facts}
            tmp = self.cache_file.with_name(self.cache_file.name + ".tmp")
            tmp.write_text(json.dumps(self._data))
            os.replace(tmp, self.cache_file)

    def peek(self, path: Path) -> dict | None:
        """Cached facts if still valid, without parsing (for fast listings)."""
        try:
            st = path.stat()
        except OSError:
            return None
        hit = self._data.get(str(path.resolve()))
        if hit and hit.get("stamp") == [st.st_size, st.st_mtime_ns]:
            return hit["facts"]
        return None
