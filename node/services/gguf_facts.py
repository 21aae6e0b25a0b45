"""Facts about a GGUF file, read from its header with the `gguf` package, cached by the file's stamp.

Parsing a header reads the whole tokenizer vocabulary (seconds for large vocabularies), so results
are kept in a small JSON cache in the node's home and recomputed only when the file changes (size,
mtime, inode or ctime). A file that fails to parse is remembered the same way, so a listing does not
parse a broken file again until it changes.

The file is opened through `open_model` (no symlink followed, no FIFO or device waited on; the opened
inode is checked) and the parser reads that open file, never the path again. The parse runs in a
daemon thread with a deadline: a pathological file costs at most PARSE_TIMEOUT_SECS and never keeps the
process from exiting.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import BinaryIO

from pinkybrain.node.services.models import ModelNotFound, file_stamp, open_model

_lock = threading.Lock()
PARSE_TIMEOUT_SECS = 300.0  # a large vocabulary takes minutes on a loaded machine; a deadline, not a target


class GgufUnreadable(ValueError):
    """The file's GGUF header cannot be read; remembered until the file changes."""


def read_gguf_facts(source: Path | BinaryIO) -> dict:
    """Facts from a GGUF header; `source` is a path or a file opened for reading (the parser maps it)."""
    from gguf import GGUFReader, LlamaFileType

    reader = GGUFReader(source, "r")

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


def parse_with_deadline(fh: BinaryIO, timeout: float = PARSE_TIMEOUT_SECS) -> dict:
    """read_gguf_facts on an open file in a daemon thread; the thread closes the file when it ends. Raises
    GgufUnreadable for a damaged header or one that takes longer than `timeout`."""
    result: dict = {}

    def run() -> None:
        try:
            result["facts"] = read_gguf_facts(fh)
        except Exception as exc:  # noqa: BLE001 (the parser raises many kinds on a damaged file: all mean unreadable)
            result["error"] = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            fh.close()

    worker = threading.Thread(target=run, name="gguf-parse", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise GgufUnreadable(f"parsing the header took longer than {timeout:g}s")
    if "error" in result:
        raise GgufUnreadable(result["error"])
    return result["facts"]


class GgufFactsCache:
    def __init__(self, cache_file: Path, *, timeout: float = PARSE_TIMEOUT_SECS):
        self.cache_file = cache_file
        self.timeout = timeout
        try:
            self._data: dict = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            self._data = {}
        if not isinstance(self._data, dict):
            self._data = {}
        self._parsing: dict[str, threading.Lock] = {}

    def get(self, path: Path) -> dict:
        """Facts for a path already confined to shared_models/ (resolve_shared); raises GgufUnreadable
        (a ValueError) for a file that does not parse, from memory while the file is unchanged."""
        key = str(path)
        with _lock:
            file_lock = self._parsing.setdefault(key, threading.Lock())
        # One parse per file at a time: a share and the start-up scan asking together wait for one result.
        with file_lock:
            try:
                fh = open_model(path)
            except ModelNotFound as exc:  # gone since it was resolved: nothing to remember
                raise GgufUnreadable(str(exc)) from None
            try:
                stamp = file_stamp(os.fstat(fh.fileno()))
                with _lock:
                    hit = self._data.get(key)
                if isinstance(hit, dict) and hit.get("stamp") == stamp:
                    if "error" in hit:
                        raise GgufUnreadable(hit["error"])
                    return hit["facts"]
            except BaseException:
                fh.close()
                raise
            try:
                facts = parse_with_deadline(fh, self.timeout)  # closes fh
            except GgufUnreadable as exc:
                self._store(key, {"stamp": stamp, "error": str(exc)})
                raise
            self._store(key, {"stamp": stamp, "facts": facts})
            return facts

    def _store(self, key: str, record: dict) -> None:
        with _lock:
            self._data[key] = record
            tmp = self.cache_file.with_name(self.cache_file.name + ".tmp")
            try:
                tmp.write_text(json.dumps(self._data))
                os.replace(tmp, self.cache_file)
            except OSError:
                pass  # only a cache: the next start parses again

    def peek(self, path: Path) -> dict | None:
        """Cached facts if still valid, without opening the file for a parse (for fast listings)."""
        try:
            st = path.lstat()
        except OSError:
            return None
        hit = self._data.get(str(path))
        if isinstance(hit, dict) and hit.get("stamp") == file_stamp(st) and "facts" in hit:
            return hit["facts"]
        return None
