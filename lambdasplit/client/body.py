"""The body as the device sees it: a remote session over the wire, or local layers in-process.

Both have one method, `forward(hidden (L, D), pos) -> hidden (L, D)`, so the generation loop
does not care where the body runs. The local one is the unsplit baseline of the benchmarks.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from ..models.llm import Body, cached_length, truncate_cache
from ..wire.codecs import Codec
from ..wire.frame import Frame, decode_frame, encode_frame
from ..wire.protocol import SessionOpened, SessionRequest
from .transport import BodyConnection, BodyError, Traffic

T = TypeVar("T")
RECOVERABLE = {"unreachable", "disconnected", "timeout", "unknown_session", "busy", "too_many_sessions", "internal",
               "too_many_connections"}


@dataclass(frozen=True)
class Retry:
    """How a remote body rides out a server that dies, restarts or is full: `attempts` tries per step,
    waiting base x 2^k seconds (capped, with jitter) between them, moving to the next server each time.
    A full server's answer says when to come back (Retry-After): the body waits that long, without counting
    an attempt, for as long as `patience_s` allows in all (per step)."""
    attempts: int = 6
    base_s: float = 0.5
    cap_s: float = 8.0
    patience_s: float = 120.0

    def wait(self, attempt: int) -> float:
        return min(self.cap_s, self.base_s * 2 ** attempt) * random.uniform(0.75, 1.25)


class RemoteBody:
    """Layers [x, y) on a body server, reached through one session, and recovered when it is lost.

    The device keeps the states it sent up (the head's output for every position so far). When the
    server dies, restarts, or forgets the session, the body reconnects (the same URL, or the next one
    in `servers`), opens a new session, and replays that prefix with the current step in one frame:
    the new session's cache then holds what the old one did, and generation goes on.

    A step at a position before the end of what was sent is a rollback (speculative decoding: the
    drafts the device rejected): the frame says so, the server forgets those positions before it runs
    the new rows, and the replay prefix forgets them too.
    """

    def __init__(self, servers: list[str], connect: Callable[[str], BodyConnection], request: SessionRequest,
                 codecs: tuple[Codec, Codec], dtype: torch.dtype, retry: Retry = Retry(),
                 on_event: Callable[[str], None] | None = None, on_lora: Callable | None = None,
                 device: torch.device = torch.device("cpu"), rediscover: Callable[[], list[str]] | None = None):
        self.servers, self.connect, self.request, self.dtype = list(servers), connect, request, dtype
        self.rediscover = rediscover  # more servers for these layers: replicas down when the route was planned
        self.device = device  # where the answers go: the tail's device
        self.up, self.down = codecs
        self.retry, self.on_event = retry, on_event or (lambda message: None)
        self.on_lora = on_lora  # a PrivateLoRA session: the device's answers to the server's mid-step questions
        self.cloud_s = 0.0  # the server's own compute time, as it reports it in each reply
        self.recoveries = 0
        self.traffic = Traffic()  # of the connections already dropped
        self.first_frame_up = b""
        self.sent: list[torch.Tensor] = []  # uplink states so far: the prefix a new session replays
        self.end = 0  # positions the server's cache holds (with caching)
        self.connection: BodyConnection | None = None
        self.server = 0  # index into servers
        self.step = 0
        self.opened: SessionOpened = self._with_retry(lambda: self.opened)

    def forward(self, hidden: torch.Tensor, pos: int) -> torch.Tensor:
        if pos + hidden.shape[0] > self.opened.max_positions:
            raise BodyError("too_long", f"the sequence would reach {pos + hidden.shape[0]} positions; the server "
                                        f"allows {self.opened.max_positions} per session")
        rollback = self.request.cache and pos < self.end
        if self.request.cache and pos > self.end:
            raise ValueError(f"a step at position {pos} would leave a gap: the body holds {self.end} positions")
        if rollback:
            self.sent = [torch.cat(self.sent)[:pos]]

        def send() -> torch.Tensor:
            if self.request.cache and self.step == 0 and pos > 0:
                # a new session mid-generation: every state sent so far, then this step's, as one frame
                return self._send(torch.cat([*self.sent, hidden]), 0)[-hidden.shape[0]:]
            return self._send(hidden, pos, rollback)

        out = self._with_retry(send)
        if self.request.cache:
            self.sent.append(hidden)
            self.end = pos + hidden.shape[0]
        return out

    def adopt(self, prefix: torch.Tensor) -> None:
        """Take over the states another session of these layers was sent (a replica joining mid-generation):
        the next step replays them first, in one frame, as after a reconnect."""
        if self.step or self.sent:
            raise ValueError("only a session that has run no step yet can adopt a prefix")
        if self.request.cache:
            self.sent, self.end = [prefix], prefix.shape[0]

    def _send(self, hidden: torch.Tensor, pos: int, rollback: bool = False) -> torch.Tensor:
        frame = Frame("hidden", step=self.step, pos=pos, tensor=hidden.cpu(), codec=self.up,
                      extra={"rollback": True} if rollback else {})
        reply = self.connection.step(encode_frame(frame), codec=self.down, on_lora=self.on_lora)
        self.step += 1
        cloud_us = reply.extra.get("cloud_us", 0)
        self.cloud_s += cloud_us / 1e6 if isinstance(cloud_us, int) else 0.0
        return reply.tensor.to(self.device, self.dtype)

    def _with_retry(self, action: Callable[[], T]) -> T:
        """Run action() on an open session; on a recoverable failure, back off (as long as a full server's
        Retry-After asks), reconnect and run it again, within the retry's attempts and patience."""
        started, failures, tries = time.monotonic(), 0, 0
        while True:
            try:
                if self.connection is None:
                    self._open()
                    if tries:
                        self.recoveries += 1
                        self.on_event(f"reconnected to {self.servers[self.server]}: new session, replaying "
                                      f"{sum(len(t) for t in self.sent)} positions")
                return action()
            except BodyError as exc:
                self._drop()
                tries += 1
                full = exc.retry_after is not None  # up but full: it said when to come back
                failures += not full
                waited, patience = time.monotonic() - started, self.retry.patience_s
                if exc.code not in RECOVERABLE:
                    raise
                if failures >= self.retry.attempts or waited >= patience:
                    raise BodyError(exc.code, f"{str(exc).removeprefix(exc.code + ': ')} (gave up after {tries} "
                                              f"tries in {waited:.1f} s; patience {patience:g} s)",
                                    exc.retry_after) from exc
                wait = min(exc.retry_after * random.uniform(1.0, 1.1) if full else self.retry.wait(failures - 1),
                           patience - waited)
                self.on_event(f"{self.servers[self.server]}: {exc}; retrying in {wait:.1f} s")
                if not full and self.rediscover is not None:
                    self.servers += [url for url in self.rediscover() if url not in self.servers]
                self.server = (self.server + 1) % len(self.servers)
                time.sleep(wait)

    def _open(self) -> None:
        self.connection = self.connect(self.servers[self.server])
        self.opened = self.connection.open_session(self.request)
        self.step = 0

    def _drop(self) -> None:
        if self.connection is None:
            return
        try:
            self.connection.close()  # closes the session too, so its goodbye is counted below
        except (BodyError, OSError):  # already broken: nothing left to tidy
            pass
        add_traffic(self.traffic, self.connection.measured())
        self.first_frame_up = self.first_frame_up or self.connection.first_frame_up
        self.connection = None

    @property
    def last_frames(self) -> tuple[bytes, bytes]:
        """The latest step's frames, up and down, as they crossed the wire (empty once the session is closed)."""
        return self.connection.last_frames if self.connection is not None else (b"", b"")

    @property
    def rollback(self) -> bool:
        """Whether the server takes rollbacks (speculative decoding's rejected drafts)."""
        return self.opened.rollback

    @property
    def url(self) -> str:
        """The server this body talks to now."""
        return self.servers[self.server]

    def measured(self) -> Traffic:
        """The traffic of every connection this body has used so far."""
        total = Traffic(**vars(self.traffic))
        if self.connection is not None:
            add_traffic(total, self.connection.measured())
        return total

    def close(self) -> None:
        """End the session and the connection; `measured()` still tells what they carried."""
        self._drop()


def add_traffic(total: Traffic, more: Traffic) -> None:
    """Add what `more` counted to `total`."""
    for name in ("socket_up", "socket_down", "frame_up", "frame_down", "steps"):
        setattr(total, name, getattr(total, name) + getattr(more, name))
    total.counted_at_socket = total.counted_at_socket and more.counted_at_socket


class LocalBody:
    """Layers [x, y) in this process, with their own cache: no network.

    With `codecs` (up, down), each hidden state still goes through real frames, encoded and
    decoded in-process: what the wire would do to it, minus the sockets (the codec benchmarks).
    """

    def __init__(self, body: Body, use_cache: bool = True, codecs: tuple[Codec, Codec] | None = None):
        self.body, self.codecs = body, codecs
        self.cache = body.layers.new_cache() if use_cache else None
        self.cloud_s = 0.0
        self.steps = 0

    def forward(self, hidden: torch.Tensor, pos: int) -> torch.Tensor:
        if self.cache is not None and pos < cached_length(self.cache):
            truncate_cache(self.cache, pos)  # a rollback: forget the rejected drafts
        hidden = self._wire(hidden, pos, 0)
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.body(hidden.unsqueeze(0), self.cache, pos)[0]
        self.cloud_s += time.perf_counter() - started
        out = self._wire(out, pos, 1)
        self.steps += 1
        return out

    def _wire(self, hidden: torch.Tensor, pos: int, direction: int) -> torch.Tensor:
        if self.codecs is None:
            return hidden
        codec = self.codecs[direction]
        data = encode_frame(Frame("hidden", step=self.steps, pos=pos, tensor=hidden, codec=codec))
        return decode_frame(data, codec=codec).tensor.to(hidden.dtype)

    def close(self) -> None:
        self.cache = None
