"""The one check every memory value passes, whoever wrote it: the local API or a peer's CRDT update.

A value is JSON: null, booleans, integers, finite floats, valid Unicode strings (no lone surrogates),
lists and objects with string keys, nested at most `max_depth` deep. Everything a node stores can then
be read back and sent as a JSON response by every node; a value that cannot is refused where it enters.

Depth is checked before any recursive step (json.dumps / json.loads recurse in C and raise RecursionError
on deep input), by walking the value or scanning the text iteratively.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

DEFAULT_MAX_DEPTH = 64
MAX_READ_DEPTH = 256  # reads take the deepest any configuration accepts: lowering the limit hides nothing
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


class MemoryValueError(ValueError):
    """A memory value is not storable JSON; str() says why, without echoing the value."""


def check_value(value: Any, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
    """Raise MemoryValueError unless `value` is storable JSON (see the module docstring)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if item is None or isinstance(item, (bool, int)):
            continue
        if isinstance(item, float):
            if not math.isfinite(item):
                raise MemoryValueError(f"memory value is not JSON-serialisable: {item!r} is not a finite number")
        elif isinstance(item, str):
            _check_text(item)
        elif isinstance(item, (list, tuple, dict)):
            if depth > max_depth:
                raise MemoryValueError(f"memory value is nested more than {max_depth} deep")
            if isinstance(item, dict):
                for key, child in item.items():
                    if not isinstance(key, str):
                        raise MemoryValueError(
                            f"memory value is not JSON-serialisable: an object key is a {type(key).__name__}"
                        )
                    _check_text(key)
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item)
        else:
            raise MemoryValueError(f"memory value is not JSON-serialisable: {type(item).__name__} is not JSON")


def encode_value(value: Any, max_depth: int = DEFAULT_MAX_DEPTH) -> str:
    """The canonical JSON text stored for `value` (MemoryValueError if it is not storable JSON)."""
    check_value(value, max_depth)
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:  # e.g. an int over Python's digit limit
        raise MemoryValueError(f"memory value is not JSON-serialisable: {exc}") from None


def decode_value(text: str, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """Parse stored JSON text and check it like a local write (MemoryValueError otherwise)."""
    if not isinstance(text, str):
        raise MemoryValueError(f"a stored memory value is JSON text, not {type(text).__name__}")
    _check_text(text)
    depth = text_depth(text)
    if depth > max_depth:
        raise MemoryValueError(f"memory value is nested more than {max_depth} deep")
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:
        raise MemoryValueError(f"memory value is not valid JSON: {str(exc)[:120]}") from None
    check_value(value, max_depth)  # escaped lone surrogates ("\ud800") only show up once decoded
    return value


def text_depth(text: str) -> int:
    """How deep JSON text nests (brackets outside strings), found without recursion."""
    depth = deepest = 0
    for match in _BRACKET.finditer(_STRING.sub("", text)):
        if match.group() in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise MemoryValueError("memory value holds text that is not valid Unicode (a lone surrogate)") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"number {text[:40]} is out of range (not a finite double)")
    return number
