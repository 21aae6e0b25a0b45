"""The node's log: one record is one line, and nothing a request carries can forge a line, drive a
terminal or fill the disk.

Done once, where the process configures logging, instead of at each call site:
- `SafeFormatter` escapes control characters (newlines, ESC sequences, C1 codes, Unicode line separators
  and bidi overrides) in every message, so a path holding `%0a` or `\\x1b[2J` shows as `\\x0a` / `\\x1b`;
  a traceback keeps its lines but each one after the first is indented, so none can pass for a record;
- each interpolated string is cut at MAX_ARG_CHARS and a whole message at MAX_MESSAGE_CHARS, which bounds
  what one request (one refusal line, say) can add;
- a log file is created and kept at mode 0600 and rotated by size (`PrivateRotatingFileHandler`).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping
from logging.handlers import RotatingFileHandler
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MAX_ARG_CHARS = 512
MAX_MESSAGE_CHARS = 4096
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_BACKUPS = 3

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_UNSAFE_KEEP_NEWLINE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape_char(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """Control and line-breaking characters as visible escapes: the text stays on one line."""
    return _UNSAFE.sub(_escape_char, text)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}...(+{len(text) - limit} chars)"


def _short(value):
    if isinstance(value, str):
        return _cut(value, MAX_ARG_CHARS)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value[:MAX_ARG_CHARS])
    return value


def safe_message(record: logging.LogRecord) -> str:
    """The record's message with each string argument cut, control characters escaped, the whole capped."""
    msg = str(record.msg)
    args = record.args
    if args:
        if isinstance(args, Mapping):
            args = {k: _short(v) for k, v in args.items()}
        else:
            args = tuple(_short(a) for a in args)
        try:
            msg = msg % args
        except (TypeError, ValueError, KeyError):
            msg = f"{msg} {args!r}"
    return _cut(escape(msg), MAX_MESSAGE_CHARS)


class SafeFormatter(logging.Formatter):
    def __init__(self, fmt: str = FORMAT, datefmt: str | None = None):
        super().__init__(fmt, datefmt)

    def format(self, record: logging.LogRecord) -> str:
        record.message = safe_message(record)
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        extra = []
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            extra.append(record.exc_text)
        if record.stack_info:
            extra.append(self.formatStack(record.stack_info))
        for text in extra:
            # Tracebacks keep their lines, each indented: no line of one can look like a record.
            text = _cut(_UNSAFE_KEEP_NEWLINE.sub(_escape_char, text), 8 * MAX_MESSAGE_CHARS)
            line += "".join(f"\n    | {part}" for part in text.splitlines())
        return line


class PrivateRotatingFileHandler(RotatingFileHandler):
    """A size-rotated log file that is mode 0600 from its first byte (and its rotated copies, by rename).
    With `own_stdio`, stdout and stderr follow the current file, so stray output (a C library's, an
    uncaught error's) lands in the log and rotates with it."""

    def __init__(self, filename: Path, *, max_bytes: int, backups: int, own_stdio: bool = False):
        self.own_stdio = own_stdio
        super().__init__(filename, maxBytes=max_bytes, backupCount=backups, encoding="utf-8", delay=False)

    def _open(self):
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)  # an existing file from an older version may be 0644
        if self.own_stdio:
            for std in (1, 2):
                os.dup2(fd, std)
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)


def configure(level: str, *, file: Path | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
              backups: int = DEFAULT_BACKUPS, own_stdio: bool = False) -> logging.Handler:
    """Replace the root handlers with one safe handler: the file (rotated, 0600) or stderr."""
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = PrivateRotatingFileHandler(file, max_bytes=max_bytes, backups=backups,
                                                              own_stdio=own_stdio)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SafeFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    return handler
