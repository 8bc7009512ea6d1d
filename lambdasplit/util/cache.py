"""Where lambdasplit keeps what it makes once: converted models, digests, profiles."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The user cache folder: $LAMBDASPLIT_CACHE, else $XDG_CACHE_HOME/lambdasplit, else ~/.cache/lambdasplit."""
    if env := os.environ.get("LAMBDASPLIT_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lambdasplit"
