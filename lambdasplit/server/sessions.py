"""Body sessions: one KV cache per session, and the rules a step must obey before it touches it.

A step is checked completely (kind, codec, shape, step number, position, length) before the
cache is touched, so a bad frame gets a clear error and never corrupts the session.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ..models.llm import Body
from ..wire.codecs import Codec
from ..wire.frame import Frame


class StepError(Exception):
    """A request the server refuses; `status` is the HTTP status, `code` a short reason."""

    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(message)
        self.code, self.status = code, status


@dataclass
class Session:
    id: str
    x: int
    y: int
    up: Codec
    down: Codec
    use_cache: bool
    max_positions: int
    cache: DynamicCache | None
    pos: int = 0
    step: int = 0
    last_used: float = field(default_factory=time.monotonic)
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run_step(self, frame: Frame, body: Body, hidden_size: int, dtype: torch.dtype) -> Frame:
        """Validate one uplink frame, run the body on it, and return the downlink frame."""
        with self.lock:
            if self.closed:
                raise StepError("unknown_session", f"session {self.id[:8]}… is closed", 404)
            self._check(frame, hidden_size)
            rows = frame.tensor.shape[0]
            hidden = frame.tensor.to(dtype).unsqueeze(0)
            pos = frame.pos if self.use_cache else 0
            started = time.perf_counter()
            try:
                with torch.inference_mode():
                    out = body(hidden, self.cache, pos, self.x, self.y)[0]
            except Exception as exc:  # the cache may be half-updated: this session cannot go on
                self.closed = True
                raise StepError("internal", f"body failed ({type(exc).__name__}: {exc}); session closed", 500) from exc
            self.pos = pos + rows
            self.step += 1
            self.last_used = time.monotonic()
            cloud_us = int((time.perf_counter() - started) * 1e6)
            return Frame("hidden", step=frame.step, pos=pos, tensor=out, codec=self.down, extra={"cloud_us": cloud_us})

    def _check(self, frame: Frame, hidden_size: int) -> None:
        if frame.kind != "hidden":
            raise StepError("bad_kind", f"expected a 'hidden' frame, got {frame.kind!r}")
        if frame.codec != self.up.name:
            raise StepError("bad_codec", f"this session's uplink codec is {self.up.name}, the frame is {frame.codec}")
        shape = tuple(frame.tensor.shape)
        if len(shape) != 2 or shape[1] != hidden_size:
            raise StepError("bad_shape", f"expected a hidden state of shape (L, {hidden_size}), got {list(shape)}")
        if frame.step != self.step:
            raise StepError("bad_step", f"expected step {self.step}, got {frame.step}")
        expected_pos = self.pos if self.use_cache else 0
        if frame.pos != expected_pos:
            raise StepError("bad_pos", f"expected position {expected_pos}, got {frame.pos}")
        end = expected_pos + shape[0]
        if end > self.max_positions:
            raise StepError("too_long", f"the sequence would reach {end} positions; this session allows "
                                        f"{self.max_positions} (the model's context or the server's limit)", 413)


class SessionStore:
    """All live sessions of one server, with a cap on their number and an idle timeout."""

    def __init__(self, max_sessions: int, idle_ttl_s: float):
        self.max_sessions, self.idle_ttl_s = max_sessions, idle_ttl_s
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def add(self, **fields) -> Session:
        with self._lock:
            self._expire_locked()
            if len(self._sessions) >= self.max_sessions:
                raise StepError("too_many_sessions", f"the server holds its maximum of {self.max_sessions} "
                                                     "sessions; retry later", 503)
            session = Session(id=secrets.token_urlsafe(24), **fields)
            self._sessions[session.id] = session
            return session

    def get(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None or session.closed:
            raise StepError("unknown_session", "unknown or closed session", 404)
        return session

    def close(self, session_id: str) -> None:
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is None:
            raise StepError("unknown_session", "unknown or closed session", 404)
        with session.lock:
            session.closed = True
            session.cache = None  # frees the KV memory

    def expire_idle(self) -> int:
        with self._lock:
            return self._expire_locked()

    def _expire_locked(self) -> int:
        now = time.monotonic()
        stale = [s for s in self._sessions.values() if now - s.last_used > self.idle_ttl_s or s.closed]
        expired = 0
        for session in stale:
            if not session.lock.acquire(blocking=False):
                continue  # mid-step: not idle after all
            try:
                del self._sessions[session.id]
                session.closed, session.cache = True, None
                expired += 1
            finally:
                session.lock.release()
        return expired
