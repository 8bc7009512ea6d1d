"""Byte streams as a passive observer reads them: HTTP/1.1 messages, WebSocket messages, TLS records.

Each parser takes the bytes one direction of a TCP connection carried and returns what it could
read, with a note on where it stopped; none of them raises on garbage. `net.tap` builds on them.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

MAX_HEAD = 64 << 10  # bytes of an HTTP request or status line and its headers
MAX_MESSAGE = 80 << 20  # bytes of one HTTP body or WebSocket message
MAX_TLS_RECORD = (1 << 14) + 2048 + 5
_METHOD = re.compile(rb"(GET|POST|PUT|DELETE|HEAD|OPTIONS|PATCH|CONNECT|TRACE) \S+ HTTP/1\.[01]\r\n")
_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3})[^\r\n]*\r\n")
_TLS_TYPES = {20: "change_cipher_spec", 21: "alert", 22: "handshake", 23: "application_data"}


@dataclass
class HttpMessage:
    start: str  # the request line or the status line
    headers: dict[str, str]  # lower-case names
    body: bytes = b""
    complete: bool = True

    @property
    def method(self) -> str:
        return self.start.split(" ", 1)[0]

    @property
    def path(self) -> str:
        parts = self.start.split(" ")
        return parts[1] if len(parts) > 2 else ""

    @property
    def status(self) -> int:
        parts = self.start.split(" ")
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


@dataclass
class WsMessage:
    opcode: int  # 1 text, 2 binary, 8 close, 9 ping, 10 pong
    data: bytes


@dataclass
class TlsSeen:
    """TLS records in one or more streams: only their count, types and sizes can be read."""

    records: int = 0
    bytes: int = 0  # all record bytes, headers included
    ciphertext: int = 0  # bytes of encrypted payload (application_data records)
    types: Counter = field(default_factory=Counter)
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(256, dtype=np.int64))

    @property
    def entropy(self) -> float:
        """Shannon entropy of the encrypted payload in bits per byte (8 = indistinguishable from random)."""
        return byte_entropy(self.histogram)

    def add(self, other: "TlsSeen") -> None:
        self.records += other.records
        self.bytes += other.bytes
        self.ciphertext += other.ciphertext
        self.types.update(other.types)
        self.histogram += other.histogram


def parse_http(data: bytes, *, requests: bool, methods: list[str] | None = None
               ) -> tuple[list[HttpMessage], bytes, str]:
    """Split one direction of an HTTP/1.1 connection into messages.

    Returns (messages, what follows them, a problem or ""). Parsing stops after a request asking to
    upgrade or a 101 response (WebSocket bytes follow), at the end, or at bytes that are not HTTP.
    `methods` are the requests' methods, for responses (a HEAD response has no body)."""
    messages: list[HttpMessage] = []
    at = 0
    while at < len(data):
        end = data.find(b"\r\n\r\n", at, at + MAX_HEAD)
        pattern = _METHOD if requests else _STATUS
        if not pattern.match(data, at, min(len(data), at + MAX_HEAD)):
            return messages, data[at:], f"{len(data) - at} B at offset {at} are not an HTTP message"
        if end < 0:
            return messages, data[at:], f"an HTTP head at offset {at} is cut short or over {MAX_HEAD} B"
        lines = data[at:end].decode("latin-1").split("\r\n")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        msg = HttpMessage(lines[0], headers)
        at = end + 4
        if not requests and 100 <= msg.status < 200 and msg.status != 101:
            continue  # an interim response (100 Continue): the real one follows
        index = len(messages)
        messages.append(msg)
        if requests and headers.get("upgrade", "").lower() == "websocket":
            return messages, data[at:], ""
        if not requests and msg.status == 101:
            return messages, data[at:], ""
        no_body = (not requests and (msg.status in (204, 304) or msg.status < 200
                                     or (methods is not None and index < len(methods) and methods[index] == "HEAD")))
        if no_body:
            continue
        if "chunked" in headers.get("transfer-encoding", "").lower():
            msg.body, at, problem = _dechunk(data, at)
        elif "content-length" in headers:
            length = headers["content-length"]
            if not length.isdigit() or int(length) > MAX_MESSAGE:
                return messages, data[at:], f"bad or too large Content-Length {length[:20]!r}"
            msg.body, at = data[at:at + int(length)], at + int(length)
            problem = "" if len(msg.body) == int(length) else f"a body cut short ({len(msg.body)} of {length} B)"
        elif requests:
            continue  # a request without a length has no body
        else:  # a response without a length runs to the end of the connection
            msg.body, at, problem = data[at:at + MAX_MESSAGE], len(data), ""
        if problem:
            msg.complete = False
            return messages, b"", problem
    return messages, b"", ""


def _dechunk(data: bytes, at: int) -> tuple[bytes, int, str]:
    """A chunked body starting at `at`: (body, offset after it, problem)."""
    parts, total = [], 0
    while True:
        eol = data.find(b"\r\n", at, at + 1024)
        size_text = data[at:eol].split(b";", 1)[0].strip() if eol >= 0 else b""
        try:
            size = int(size_text, 16)
        except ValueError:
            return b"".join(parts), len(data), f"a chunk size that is not hex at offset {at} (or cut short)"
        at = eol + 2
        if size == 0:
            end = data.find(b"\r\n\r\n", at - 2)  # trailers, if any, end with an empty line
            return b"".join(parts), (end + 4 if end >= 0 else len(data)), ""
        total += size
        if total > MAX_MESSAGE:
            return b"".join(parts), len(data), f"a chunked body over {MAX_MESSAGE} B"
        parts.append(data[at:at + size])
        if at + size + 2 > len(data):
            return b"".join(parts), len(data), "a chunked body cut short"
        at += size + 2


# ---- WebSocket (RFC 6455) ------------------------------------------------------------------------

def parse_websocket(data: bytes, masked: bool) -> tuple[list[WsMessage], str]:
    """Messages of one direction of a WebSocket: frames unmasked, fragments joined, control frames kept.

    `masked`: whether this direction's frames must be masked (client -> server) or not."""
    messages: list[WsMessage] = []
    opcode, parts, size = 0, [], 0
    at = 0
    while at < len(data):
        if at + 2 > len(data):
            return messages, "a frame header cut short"
        b0, b1 = data[at], data[at + 1]
        fin, rsv, op, is_masked, length = b0 & 0x80, b0 & 0x70, b0 & 0x0F, b1 & 0x80, b1 & 0x7F
        at += 2
        if length >= 126:
            n = 2 if length == 126 else 8
            if at + n > len(data):
                return messages, "a frame length cut short"
            length = int.from_bytes(data[at:at + n], "big")
            at += n
        if bool(is_masked) != masked:
            return messages, f"a frame {'without' if masked else 'with'} a mask at offset {at}: not a WebSocket"
        if rsv:
            return messages, "a compressed or extended frame (RSV bits set), not decoded"
        if op not in (0, 1, 2, 8, 9, 10) or (op >= 8 and (not fin or length > 125)):
            return messages, f"an invalid frame (opcode {op}, length {length}) at offset {at}"
        if size + length > MAX_MESSAGE:
            return messages, f"a message over {MAX_MESSAGE} B"
        key = data[at:at + 4] if is_masked else b""
        at += len(key)
        if at + length > len(data):
            return messages, f"a frame cut short ({len(data) - at} of {length} B)"
        payload = _unmask(data[at:at + length], key) if key else data[at:at + length]
        at += length
        if op >= 8:
            messages.append(WsMessage(op, payload))
            continue
        if op == 0 and not parts and not opcode:
            return messages, "a continuation frame with no message to continue"
        if op and opcode:
            return messages, "a new message began before the last one ended"
        opcode = opcode or op
        parts.append(payload)
        size += length
        if fin:
            messages.append(WsMessage(opcode, b"".join(parts)))
            opcode, parts, size = 0, [], 0
    if parts:
        return messages, "the last message is cut short"
    return messages, ""


def http_request_start(data: bytes) -> bool:
    """Whether the bytes begin with an HTTP/1.x request line."""
    return _METHOD.match(data) is not None


def _unmask(payload: bytes, key: bytes) -> bytes:
    if not payload:
        return b""
    mask = np.resize(np.frombuffer(key, dtype=np.uint8), len(payload))
    return (np.frombuffer(payload, dtype=np.uint8) ^ mask).tobytes()


# ---- TLS -----------------------------------------------------------------------------------------

def looks_tls(data: bytes) -> bool:
    return len(data) >= 5 and data[0] in _TLS_TYPES and data[1] == 3 and data[2] <= 4


def parse_tls(data: bytes) -> tuple[TlsSeen, str]:
    """Walk one direction's TLS records: how many, of which types, how many bytes; nothing inside."""
    seen, at = TlsSeen(), 0
    while at < len(data):
        if not looks_tls(data[at:at + 5]):
            return seen, f"{len(data) - at} B at offset {at} are not a TLS record"
        ctype, length = data[at], int.from_bytes(data[at + 3:at + 5], "big")
        if length > MAX_TLS_RECORD:
            return seen, f"a TLS record of {length} B, over the protocol's limit"
        body = data[at + 5:at + 5 + length]
        seen.records += 1
        seen.bytes += 5 + len(body)
        seen.types[_TLS_TYPES[ctype]] += 1
        if ctype == 23:
            seen.ciphertext += len(body)
            seen.histogram += np.bincount(np.frombuffer(body, dtype=np.uint8), minlength=256)
        at += 5 + length
        if len(body) < length:
            return seen, "the last TLS record is cut short"
    return seen, ""


def byte_entropy(data: bytes | np.ndarray) -> float:
    """Shannon entropy in bits per byte, of bytes or of a 256-bin histogram."""
    counts = data if isinstance(data, np.ndarray) else np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
    total = int(counts.sum())
    if not total:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())
