"""Bytes a TCP socket really carried, read from the kernel (Linux TCP_INFO).

`tcpi_bytes_acked` and `tcpi_bytes_received` count every payload byte of the connection:
HTTP request lines and headers, WebSocket framing, frame headers and tensor bytes alike
(TCP/IP headers themselves are not included). Elsewhere the counters read as unavailable.
"""

from __future__ import annotations

import socket
import struct

_OFFSET = 120  # struct tcp_info: tcpi_bytes_acked (u64) at 120, tcpi_bytes_received (u64) at 128 (Linux >= 4.2)
_PAIR = struct.Struct("=QQ")


def tcp_bytes(sock: socket.socket | None) -> tuple[int, int] | None:
    """(bytes sent and acknowledged, bytes received) on `sock`, or None where the OS does not say."""
    if sock is None or not hasattr(socket, "TCP_INFO"):
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except (OSError, ValueError):
        return None
    if len(raw) < _OFFSET + _PAIR.size:
        return None
    return _PAIR.unpack_from(raw, _OFFSET)


class SocketMeter:
    """Sums what a set of sockets carried, each read as a delta since it was last seen."""

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        self.available = True
        self._last: dict[int, tuple[int, int]] = {}

    def read(self, sock: socket.socket | None) -> None:
        if sock is None or sock.fileno() == -1:  # closed already: its last reading stands
            return
        counts = tcp_bytes(sock)
        if counts is None:  # not Linux, or a socket type without TCP_INFO
            self.available = False
            return
        key = id(sock)
        last = self._last.get(key, (1, 0))  # the SYN counts as one acked byte
        self.sent += counts[0] - last[0]
        self.received += counts[1] - last[1]
        self._last[key] = counts

    def forget(self, sock: socket.socket | None) -> None:
        self._last.pop(id(sock), None)
