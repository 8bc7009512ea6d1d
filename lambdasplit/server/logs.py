"""Structured logs: one JSON object per line, with a fixed set of fields.

Only the fields listed here ever reach a log line, so a careless `extra=` cannot put a tensor, a
frame or anything a client sent into the logs. The server never sees prompts or text at all.

uvicorn's own loggers (its access log, its warnings, the tracebacks of a failed request) write through
the same formatter (`uvicorn_log_config`, given to uvicorn.Config), so every line is JSON. Session ids
are cut to a prefix in every message (the access log prints request paths, which hold them).
"""

from __future__ import annotations

import json
import logging
import re
import time
import traceback

FIELDS = ("event", "session", "client", "code", "x", "y", "positions", "reserved", "cache", "up", "down", "rows",
          "batch", "ms")


# a session id in a path (/v1/sessions/ID/..., /v1/images/ID/...): kept to its first 8 characters
_SESSION_PATH = re.compile(r"(/v1/(?:sessions|images)/)([^/\s?\"']{9,})")
PREFIX = 8


def redact(text: str) -> str:
    """`text` with every session id in a request path cut to its prefix."""
    return _SESSION_PATH.sub(lambda m: m.group(1) + m.group(2)[:PREFIX] + "…", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                 "level": record.levelname.lower(), "logger": record.name, "msg": redact(record.getMessage())}
        for name in FIELDS:
            value = getattr(record, name, None)
            if isinstance(value, (str, int, float, bool)):
                entry[name] = redact(value) if isinstance(value, str) else value
        if record.exc_info and record.exc_info[0] is not None:
            entry["error"] = redact(f"{record.exc_info[0].__name__}: {record.exc_info[1]}")
            entry["traceback"] = redact("".join(traceback.format_exception(*record.exc_info)))
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str = "warning") -> None:
    """JSON lines on stderr for lambdasplit's own loggers, at `level`."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("lambdasplit")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


def uvicorn_log_config(level: str = "warning") -> dict:
    """uvicorn's logging (its server log, its access log, and anything else that reaches the root logger) as
    JSON lines on stderr, through JsonFormatter: give it as `uvicorn.Config(log_config=...)`."""
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"json": handler},
        "loggers": {name: {"handlers": ["json"], "level": level.upper(), "propagate": False}
                    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "py.warnings")},
        "root": {"handlers": ["json"], "level": "WARNING"},
    }
