"""The bytes of a frame as an observer of the link sees them: offset, hex and printable text."""

from __future__ import annotations


def hexdump(data: bytes, limit: int = 96) -> str:
    """Up to `limit` bytes of `data`, 16 a row: offset, the bytes in hex, and the printable ASCII ('.' else)."""
    rows = []
    for off in range(0, min(len(data), limit), 16):
        chunk = data[off:off + 16]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        rows.append(f"  {off:04x}  {chunk.hex(' '):<47}  |{text}|")
    return "\n".join(rows)
