"""JSON files the tools keep (assessments, profiles): written whole, read with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path

from .atomic import write_text


def write_json(path: str | Path, data: dict) -> Path:
    return write_text(path, json.dumps(data, indent=1))


def read_json(path: str | Path, what: str, error: type[Exception] = ValueError) -> dict:
    """The JSON object in `path`; `error` says which `what` (e.g. 'profile') could not be read, and why."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise error(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"the {what} {path} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"the {what} {path} holds {type(data).__name__}, not a JSON object")
    return data
