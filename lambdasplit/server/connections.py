"""Connection limits for the servers' HTTP sockets: a deadline for each request head, a cap on open
connections per client address and in all.

uvicorn closes a connection that stays idle between requests (`timeout_keep_alive`), but not one that
never finishes its request head: a thousand of those, held open, used up the process's file descriptors
until the attacker let go. The protocol class here (uvicorn's own HTTP protocol, subclassed; passed as
`uvicorn.Config(http=...)`) adds:

- a header deadline: a new connection's request head must be complete within `header_timeout_s`
  (after a response, within the keep-alive time plus that), or the connection is closed;
- a cap per client address (`max_per_client`) and in all (`max_connections`, WebSockets included): a
  connection beyond either gets `503` with `Retry-After` at once, and is closed half a second later
  (long enough for the answer to be read, not for the descriptor to be held).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

from uvicorn.protocols.http.auto import AutoHTTPProtocol

log = logging.getLogger("lambdasplit.server")
REFUSED_LINGER_S = 0.5  # a refused connection stays open this long after its 503, so the answer is read


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0
    max_connections: int = 1000
    max_per_client: int = 128
    keep_alive_s: float = 30.0  # uvicorn's timeout_keep_alive: the idle time allowed between requests

    def __post_init__(self):
        for name in ("header_timeout_s", "max_connections", "max_per_client", "keep_alive_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


class ClientTable:
    """The open connections of each client address (transports; those closing are pruned as it goes, since
    a connection upgraded to a WebSocket is no longer this protocol's to see closing)."""

    def __init__(self):
        self.open: dict[str, set] = {}
        self._said = 0.0
        self.refused = 0

    def count(self, host: str) -> int:
        transports = self.open.get(host)
        if not transports:
            return 0
        transports.difference_update([t for t in transports if t.is_closing()])
        if not transports:
            del self.open[host]
        return len(transports)

    def add(self, host: str, transport) -> None:
        self.open.setdefault(host, set()).add(transport)

    def discard(self, host: str, transport) -> None:
        transports = self.open.get(host)
        if transports is not None:
            transports.discard(transport)
            if not transports:
                del self.open[host]

    def note_refusal(self, why: str) -> None:
        """Count a refused connection; say so in the log at most every ten seconds."""
        self.refused += 1
        now = time.monotonic()
        if now - self._said >= 10.0:
            self._said = now
            log.warning("connection refused: %s (%d refused so far)", why, self.refused,
                        extra={"event": "connection_refused"})


def _refusal(message: str) -> bytes:
    body = json.dumps({"error": "too_many_connections", "message": message}).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
            b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def guarded_protocol(limits: ConnectionLimits, base: type = AutoHTTPProtocol) -> type:
    """uvicorn's HTTP protocol class `base` (httptools, or h11 where httptools is missing) with `limits`."""
    table = ClientTable()

    class GuardedHTTPProtocol(base):
        clients = table

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._host = (transport.get_extra_info("peername") or ("?",))[0]
            self._head_timer: asyncio.TimerHandle | None = None
            self._answered = None  # the cycle of the latest response (its request's head is done)
            self._refused = False
            total = len(self.connections) - 1  # this one is in already
            if total >= limits.max_connections:
                return self._refuse(f"the server holds its maximum of {limits.max_connections} connections")
            if table.count(self._host) >= limits.max_per_client:
                return self._refuse(f"{self._host} holds its maximum of {limits.max_per_client} connections")
            table.add(self._host, transport)
            self._arm(limits.header_timeout_s)

        def _refuse(self, why: str) -> None:
            self._refused = True
            self.connections.discard(self)  # counted by no cap while it lingers
            table.note_refusal(why)
            self.transport.write(_refusal(why + "; retry later"))
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(REFUSED_LINGER_S, self.transport.close)

        def _arm(self, seconds: float) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(seconds, self._head_late)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_late(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                table.note_refusal(f"{self._host} sent no complete request head within "
                                   f"{limits.header_timeout_s:g} s")
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return  # read and dropped: the answer is on its way, the connection closes shortly
            super().data_received(data)
            if self._head_timer is not None and self.cycle is not None and self.cycle is not self._answered:
                self._disarm()  # a request head is complete: the request itself runs as long as it needs

        def handle_websocket_upgrade(self, *args) -> None:
            self._disarm()
            super().handle_websocket_upgrade(*args)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._answered = self.cycle
            if not self.transport.is_closing():  # the next head: within the idle time and the head deadline
                self._arm(limits.keep_alive_s + limits.header_timeout_s)

        def connection_lost(self, exc) -> None:
            self._disarm()
            table.discard(self._host, self.transport)
            super().connection_lost(exc)

    return GuardedHTTPProtocol
