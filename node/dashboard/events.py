"""The last operational log lines, kept in memory for the dashboard's events panel.

A logging handler on the `pinkybrain` logger: it costs one deque append per line whether or not a
dashboard is open, and holds at most MAX_EVENTS. Log lines are operational only (the public mesh logs
no query text), and the formatter's own escaping applies, so nothing here needs cleaning again.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque

MAX_EVENTS = 500
MAX_MESSAGE_CHARS = 500


class RecentEvents(logging.Handler):
    def __init__(self, capacity: int = MAX_EVENTS):
        super().__init__(level=logging.INFO)
        self._events: deque[dict] = deque(maxlen=capacity)
        self._seq = itertools.count(1)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad log call must never break the caller
            message = str(record.msg)
        message = "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in message[:MAX_MESSAGE_CHARS])
        self._events.append({"seq": next(self._seq), "time": record.created, "level": record.levelname,
                             "logger": record.name, "message": message})

    def since(self, seq: int, limit: int = 200) -> list[dict]:
        return [e for e in self._events if e["seq"] > seq][-limit:]


_installed: RecentEvents | None = None


def recent_events() -> RecentEvents:
    """The process's one handler, attached to the `pinkybrain` logger on first use."""
    global _installed
    if _installed is None:
        _installed = RecentEvents()
        logging.getLogger("pinkybrain").addHandler(_installed)
    return _installed
