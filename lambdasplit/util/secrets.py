"""Secrets a command reads from a file or an environment variable, never from its command line."""

from __future__ import annotations

import os
from pathlib import Path


def read_secret(path: str | os.PathLike | None, env: str, what: str) -> str | None:
    """The secret in `path` (stripped), else the environment variable `env`, else None.

    `what` names the secret in errors ("token", "API key"); an unreadable or empty file is an error
    (ValueError), not a silent fallback to no secret at all.
    """
    if path:
        try:
            secret = Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"cannot read the {what} file {path}: {exc.strerror or exc}") from None
        if not secret:
            raise ValueError(f"the {what} file {path} is empty")
        return secret
    return os.environ.get(env) or None
