"""Bearer tokens for the body server, kept as hashes.

A token file has one line per token: `sha256:<64 hex digits>` and, optionally, a name for the
logs. The server never sees a stored token, only its hash, so the file can be read by more people
than the tokens themselves. Tokens are 256-bit random strings (`lambdasplit token new`), so one
SHA-256 is enough: there is no password to guess slowly.

    # lambdasplit tokens
    sha256:3f0a…e1  alice
    sha256:9b2c…07  laptop-of-bob

Every session is bound to the hash of the token that opened it: another token gets 404, exactly as
for a session that does not exist.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

_LINE = re.compile(r"sha256:([0-9a-f]{64})(?:\s+(\S.*))?")
TOKEN_BYTES = 32


class AuthError(Exception):
    """A request without a valid token (HTTP 401)."""


def new_token() -> str:
    """A fresh token: 256 random bits, URL-safe, prefixed so that it is recognisable in a leak scan."""
    return "lsk_" + secrets.token_urlsafe(TOKEN_BYTES)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who made a request: the hash of their token (the session owner key) and its name in the file."""
    key: str
    name: str


ANONYMOUS = Principal("", "anonymous")  # every request, on a server without a token file


class TokenBook:
    """The hashes a server accepts, read from a token file."""

    def __init__(self, entries: dict[str, str], path: Path | None = None):
        self.entries, self.path = entries, path

    @classmethod
    def load(cls, path: str | Path) -> "TokenBook":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read the token file {path}: {exc.strerror or exc}") from None
        entries = _parse(text, path)
        if not entries:
            raise ValueError(f"the token file {path} holds no token hashes: the server would refuse everyone")
        return cls(entries, path)

    def check(self, authorization: str | None) -> Principal:
        """The principal behind an `Authorization: Bearer …` header, or AuthError."""
        if not authorization:
            raise AuthError("this server needs a bearer token (Authorization: Bearer <token>)")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("the Authorization header must be 'Bearer <token>'")
        digest = token_hash(token.strip())
        for key, name in self.entries.items():  # constant time per entry: no early exit on a prefix match
            if hmac.compare_digest(key, digest):
                return Principal(key, name)
        raise AuthError("unknown token")


def _parse(text: str, path: Path) -> dict[str, str]:
    entries = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.fullmatch(line)
        if not m:
            hint = (" (this looks like a token itself: store its hash instead, see lambdasplit token hash)"
                    if line.startswith("lsk_") else "")
            raise ValueError(f"{path}:{n}: expected 'sha256:<64 lowercase hex digits> [name]'{hint}")
        entries[m.group(1)] = (m.group(2) or f"token-{m.group(1)[:8]}").strip()
    return entries


def add_token(path: str | Path, name: str | None = None) -> str:
    """Make a token, append its hash to the token file (created 0600 if new), and return the token."""
    path = Path(path)
    if name is not None and (not name.strip() or "\n" in name):
        raise ValueError("a token name is one non-empty line")
    token = new_token()
    existed = path.exists()
    if existed:
        _parse(path.read_text(encoding="utf-8"), path)  # refuse to extend a file the server could not read
    with open(path, "a", encoding="utf-8") as f:
        if not existed:
            path.chmod(0o600)
            f.write("# lambdasplit tokens: one 'sha256:<hash> [name]' per line (lambdasplit token new)\n")
        f.write(f"sha256:{token_hash(token)}" + (f"  {name.strip()}" if name else "") + "\n")
    return token
