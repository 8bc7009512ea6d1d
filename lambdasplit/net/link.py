"""An emulated network link: a loopback TCP proxy with a one-way delay and a rate limit per direction.

The kernel's netem is not available everywhere (not in containers without CAP_NET_ADMIN), so the
link lives in the project. Each direction is a queue: a chunk read from one side occupies the link
for len * 8 / rate seconds after the previous one, then arrives `delay` later, like a packet on a
wire of that bandwidth and length. Reading goes on while earlier chunks are in flight, so the delay
is a propagation delay, not a stall. The proxy counts the bytes it forwards in each direction.

With `record=True` it also keeps the raw bytes each connection carried each way, as a passive tap on
the wire would see them (`recordings`), up to `record_limit` bytes in all; what comes after the limit
is counted, not kept. `lambdasplit.net.tap` parses such recordings as an eavesdropper would.

    LinkSpec.parse("1000mbit,5ms")  ->  1 Gbit/s each way, 5 ms one way (10 ms round trip)
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from dataclasses import dataclass, field

_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_CHUNK = 64 << 10
RECORD_LIMIT = 64 << 20  # bytes kept in all connections' recordings, by default


class LinkError(ValueError):
    pass


@dataclass(frozen=True)
class LinkSpec:
    rate_bps: float | None = None  # bits per second each way; None: unlimited
    delay_s: float = 0.0  # one-way

    @classmethod
    def parse(cls, text: str) -> "LinkSpec":
        """'1000mbit,5ms', '10mbit', '20ms', '1gbit,500us': a rate (bit, kbit, mbit, gbit) and/or a one-way delay."""
        rate, delay = None, 0.0
        parts = [p.strip().lower() for p in str(text).split(",") if p.strip()]
        if not parts or len(parts) > 2:
            raise LinkError(f"a link is RATE,DELAY (for example 1000mbit,5ms), got {text!r}")
        for part in parts:
            m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]+)", part)
            if not m or m.group(2) not in {**_RATE_UNITS, **_TIME_UNITS}:
                raise LinkError(f"{part!r} in {text!r} is neither a rate (e.g. 1000mbit, 10kbit, 1gbit) "
                                "nor a delay (e.g. 5ms, 500us, 0.1s)")
            value, unit = float(m.group(1)), m.group(2)
            if unit in _RATE_UNITS:
                if rate is not None or value <= 0:
                    raise LinkError(f"{text!r}: give one positive rate")
                rate = value * _RATE_UNITS[unit]
            else:
                if delay or value * _TIME_UNITS[unit] > 60:
                    raise LinkError(f"{text!r}: give one delay of at most 60 s")
                delay = value * _TIME_UNITS[unit]
        return cls(rate, delay)

    def __str__(self) -> str:
        rate = "unlimited" if self.rate_bps is None else f"{self.rate_bps / 1e6:g} Mbit/s"
        return f"{rate}, {self.delay_s * 1e3:g} ms one way"


class _Direction:
    """One direction of the link: the time the wire is busy until, and the bytes it carried."""

    def __init__(self, spec: LinkSpec):
        self.spec, self.busy_until, self.bytes = spec, 0.0, 0

    def schedule(self, nbytes: int, now: float) -> float:
        """When a chunk of nbytes read now arrives at the other end."""
        start = max(now, self.busy_until)
        self.busy_until = start + (nbytes * 8 / self.spec.rate_bps if self.spec.rate_bps else 0.0)
        self.bytes += nbytes
        return self.busy_until + self.spec.delay_s


@dataclass
class Recording:
    """The raw bytes one proxied connection carried, in order: `up` client -> server, `down` server -> client.

    `dropped_up` / `dropped_down` count the bytes past the proxy's record limit, which were forwarded
    but not kept (the kept bytes are then a prefix of the stream)."""

    up: bytes = b""
    down: bytes = b""
    dropped_up: int = 0
    dropped_down: int = 0

    @property
    def complete(self) -> bool:
        return not (self.dropped_up or self.dropped_down)


@dataclass
class _Tape:
    """One connection's recording while it runs (appended to by the proxy's thread only)."""

    up: bytearray = field(default_factory=bytearray)
    down: bytearray = field(default_factory=bytearray)
    dropped_up: int = 0
    dropped_down: int = 0


class LinkProxy:
    """Listen on a loopback port and forward every connection to (host, port) through the emulated link.

    >>> with LinkProxy("127.0.0.1", 8470, LinkSpec.parse("1000mbit,5ms")) as link:
    ...     url = link.url   # talk to the body server through this

    `record=True` keeps what every connection carried (see `recordings`), at most `record_limit` bytes.
    """

    def __init__(self, host: str, port: int, spec: LinkSpec = LinkSpec(), listen_host: str = "127.0.0.1", *,
                 record: bool = False, record_limit: int = RECORD_LIMIT):
        if record_limit < 0:
            raise LinkError(f"record_limit must be a byte count of at least 0, got {record_limit}")
        self.target, self.spec, self.listen_host = (host, port), spec, listen_host
        self.up, self.down = _Direction(spec), _Direction(spec)  # shared by all connections, like one wire
        self.record, self.record_limit = record, record_limit
        self._tapes: list[_Tape] = []
        self._recorded = 0
        self._tape_lock = threading.Lock()
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None

    @property
    def url(self) -> str:
        return f"http://{self.listen_host}:{self.port}"

    @property
    def bytes_up(self) -> int:
        return self.up.bytes

    @property
    def bytes_down(self) -> int:
        return self.down.bytes

    @property
    def recordings(self) -> list[Recording]:
        """What each connection carried so far, in the order they were opened (empty unless record=True)."""
        with self._tape_lock:
            return [Recording(bytes(t.up), bytes(t.down), t.dropped_up, t.dropped_down) for t in self._tapes]

    def _keep(self, tape: _Tape, upward: bool, data: bytes) -> None:
        """Append a chunk to a connection's recording, within the proxy's record limit."""
        with self._tape_lock:
            room = max(0, self.record_limit - self._recorded)
            kept = data[:room]
            self._recorded += len(kept)
            (tape.up if upward else tape.down).extend(kept)
            if len(kept) < len(data):
                if upward:
                    tape.dropped_up += len(data) - len(kept)
                else:
                    tape.dropped_down += len(data) - len(kept)

    def start(self) -> "LinkProxy":
        ready = threading.Event()
        errors: list[BaseException] = []

        def run():
            self._loop = asyncio.new_event_loop()
            try:
                self._server = self._loop.run_until_complete(
                    asyncio.start_server(self._handle, self.listen_host, 0))
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # reported to start()'s caller
                errors.append(exc)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="lambdasplit-link", daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors or not self.port:
            raise LinkError(f"the link proxy could not start: {errors[0] if errors else 'timeout'}")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        loop = self._loop

        async def close():
            self._server.close()
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            if tasks:  # let the cancelled connections end here, rather than be destroyed pending
                await asyncio.wait(tasks, timeout=2)

        asyncio.run_coroutine_threadsafe(close(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(5)
        self._loop = None

    def __enter__(self) -> "LinkProxy":
        return self if self._loop is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    async def _handle(self, client_reader, client_writer) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        tape = None
        if self.record:
            tape = _Tape()
            with self._tape_lock:
                self._tapes.append(tape)
        try:
            await asyncio.gather(self._pump(client_reader, server_writer, self.up, tape, True),
                                 self._pump(server_reader, client_writer, self.down, tape, False),
                                 return_exceptions=True)
        except asyncio.CancelledError:  # stop() with connections open: end quietly (asyncio logs a cancelled handler)
            pass
        for writer in (client_writer, server_writer):
            writer.close()

    async def _pump(self, reader, writer, direction: _Direction, tape: _Tape | None = None,
                    upward: bool = True) -> None:
        """Read as fast as the sender writes; deliver each chunk when the emulated link would (and record
        it on the connection's tape, if any, as it enters the wire)."""
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver():
            while True:
                at, data = await queue.get()
                if data is None:
                    break
                wait = at - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():  # a half-close passes through as one: the other way stays open
                writer.write_eof()
            else:
                writer.close()

        sender = asyncio.create_task(deliver())
        try:
            while data := await reader.read(_CHUNK):
                if tape is not None:
                    self._keep(tape, upward, data)
                queue.put_nowait((direction.schedule(len(data), time.monotonic()), data))
        except (ConnectionError, OSError):
            pass
        finally:
            queue.put_nowait((0.0, None))  # the other side sees the close after the data in flight
            try:
                await sender
            except (ConnectionError, OSError):
                pass


def link_to(url: str, spec: str | LinkSpec, *, record: bool = False, record_limit: int = RECORD_LIMIT) -> LinkProxy:
    """A started LinkProxy in front of a body server's http:// URL (stop it when done)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or not parts.port:
        raise LinkError(f"--link needs the server as http://HOST:PORT, got {url!r}")
    return LinkProxy(parts.hostname, parts.port, spec if isinstance(spec, LinkSpec) else LinkSpec.parse(spec),
                     record=record, record_limit=record_limit).start()
