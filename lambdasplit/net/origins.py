"""Web origins as browsers send them in the Origin header (scheme://host[:port]), for allow-lists."""

from __future__ import annotations

from urllib.parse import urlsplit


def normal_origin(origin: str) -> str:
    """An origin as browsers send it: scheme://host[:port], lower-case, no path or trailing slash."""
    parts = urlsplit(origin.strip().lower())
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
        raise ValueError(f"not an origin: {origin!r} (expected scheme://host[:port], e.g. http://localhost:3000)")
    return f"{parts.scheme}://{parts.netloc}"
