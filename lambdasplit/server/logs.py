"""Structured logs: one JSON object per line, with a fixed set of fields.

Only the fields listed here ever reach a log line, so a careless `extra=` cannot put a tensor, a
frame or anything a client sent into the logs. The server never sees prompts or text at all.
"""

from __future__ import annotations

import json
import logging
import time

FIELDS = ("event", "session", "client", "code", "x", "y", "positions", "reserved", "cache", "up", "down", "rows",
          "batch", "ms")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                 "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        for name in FIELDS:
            value = getattr(record, name, None)
            if isinstance(value, (str, int, float, bool)):
                entry[name] = value
        if record.exc_info:
            entry["error"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str = "warning") -> None:
    """JSON lines on stderr for lambdasplit's own loggers, at `level`."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("lambdasplit")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
