"""Body sessions: one KV cache per session, and the rules a step must obey before it touches it.

A step is checked completely (kind, codec, shape, step number, position, length) before the
cache is touched, so a bad frame gets a clear error and never corrupts the session.

Rollback (speculative decoding): a step whose frame says `extra.rollback = true` may start at a
position before the session's end. The body first forgets every cached position from there on (the
draft tokens the device rejected), then runs the new rows. It rides on the next step, so it costs
no round trip of its own. Rolling back before position 0, or "back" to a position the cache never
reached, is refused like any other bad step.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ..models.llm import truncate_cache
from ..wire.codecs import Codec
from ..wire.frame import Frame


class StepError(Exception):
    """A request the server refuses; `status` is the HTTP status, `code` a short reason."""

    def __init__(self, code: str, message: str, status: int = 400, retry_after: int | None = None):
        super().__init__(message)
        self.code, self.status, self.retry_after = code, status, retry_after


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
    owner: str = ""  # hash of the token that opened it ("" on a server without tokens)
    key: str = field(default="", repr=False)  # the session key: a secret only its creator has, asked of every step
    reserved: int = 0  # bytes set aside for it in the store's budget: its KV cache, or its training graph
    pos: int = 0
    step: int = 0
    last_used: float = field(default_factory=time.monotonic)
    rolled_back: int = 0  # positions forgotten by rollbacks, over the session's life
    train: bool = False  # split fine-tuning: forward steps keep their graph until their gradient comes back
    pending: tuple | None = None  # (input, output) of the latest forward step of a training session
    lora: object = None  # a PrivateLoraContext: the device's PrivateLoRA adapters join this session's steps
    forward: object = None  # a Forwarder: this session's output goes on to the next hop (server/forward.py)
    closed: bool = False
    opened: float = field(default_factory=time.monotonic)
    browser_key_used: bool = False  # its key has opened a WebSocket as a subprotocol (once only)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def admit(self, frame: Frame, hidden_size: int) -> int:
        """Check a frame completely, then apply its rollback if it asks for one (the caller holds the lock).

        Returns the number of positions rolled back (0 for a plain step).
        """
        if self.closed:
            raise StepError("unknown_session", f"session {self.id[:8]}… is closed", 404)
        rollback = self._check(frame, hidden_size)
        if rollback:
            try:
                truncate_cache(self.cache, frame.pos)
            except NotImplementedError as exc:
                raise StepError("bad_rollback", f"this body cannot roll back: {exc}") from None
            self.pos = frame.pos
            self.rolled_back += rollback
        return rollback

    def advance(self, frame: Frame, out: torch.Tensor, seconds: float) -> Frame:
        """Record a step the body has run; return the reply frame (the caller holds the lock)."""
        pos = frame.pos if self.use_cache else 0
        if frame.kind == "hidden":
            self.pos = pos + frame.tensor.shape[0]
        self.step += 1
        self.last_used = time.monotonic()
        return Frame(frame.kind, step=frame.step, pos=pos, tensor=out, codec=self.down,
                     extra={"cloud_us": int(seconds * 1e6)})

    def release(self) -> None:
        """Free what the session holds (its KV cache, any training graph); the caller holds the lock."""
        self.cache = self.pending = None
        if self.forward is not None:  # the next hop's session: closed off the caller's thread (it is a request)
            threading.Thread(target=self.forward.close, name="lambdasplit-forward-close", daemon=True).start()
            self.forward = None

    def fail(self, exc: Exception) -> StepError:
        """The body failed mid-step: the cache may be half-updated, so this session cannot go on."""
        self.closed, self.pending = True, None
        return StepError("internal", f"body failed ({type(exc).__name__}: {exc}); session closed", 500)

    def _check(self, frame: Frame, hidden_size: int) -> int:
        """Raise StepError unless the frame is this session's next step; return how far it rolls back."""
        if frame.kind not in ("hidden", "grad"):
            raise StepError("bad_kind", f"expected a 'hidden' frame, got {frame.kind!r}")
        if frame.codec != self.up.name:
            raise StepError("bad_codec", f"this session's uplink codec is {self.up.name}, the frame is {frame.codec}")
        shape = tuple(frame.tensor.shape)
        if len(shape) != 2 or shape[1] != hidden_size:
            raise StepError("bad_shape", f"expected a hidden state of shape (L, {hidden_size}), got {list(shape)}")
        if frame.step != self.step:
            raise StepError("bad_step", f"expected step {self.step}, got {frame.step}")
        if frame.kind == "grad":
            self._check_grad(frame, shape)
            return 0
        expected_pos = self.pos if self.use_cache else 0
        rollback = frame.extra.get("rollback", False)
        if rollback not in (True, False):
            raise StepError("bad_rollback", f"'rollback' must be true or false, got {rollback!r}")
        if rollback:
            self._check_rollback(frame.pos)
        elif frame.pos != expected_pos:
            raise StepError("bad_pos", f"expected position {expected_pos}, got {frame.pos}")
        end = frame.pos + shape[0]
        if end > self.max_positions:
            raise StepError("too_long", f"the sequence would reach {end} positions; this session allows "
                                        f"{self.max_positions} (the model's context or the server's limit)", 413)
        return self.pos - frame.pos if rollback else 0

    def _check_grad(self, frame: Frame, shape: tuple[int, ...]) -> None:
        """A gradient must follow a forward step of a training session, with that step's output shape."""
        if not self.train:
            raise StepError("bad_kind", "a 'grad' frame needs a training session (open it with train: true)")
        if self.pending is None:
            raise StepError("no_forward", "a gradient answers the latest forward step, and none is waiting for "
                                          "one (each forward step takes one gradient)")
        expected = tuple(self.pending[1].shape[1:])
        if shape != expected or frame.pos != 0:
            raise StepError("bad_shape", f"the gradient must match the forward step's output {list(expected)} at "
                                         f"position 0, got {list(shape)} at {frame.pos}")

    def _check_rollback(self, pos: int) -> None:
        if not self.use_cache:
            raise StepError("bad_rollback", "this session keeps no KV cache, so there is nothing to roll back")
        if pos < 0:
            raise StepError("bad_rollback", f"cannot roll back to position {pos}: that is before the start")
        if pos > self.pos:
            raise StepError("bad_rollback", f"cannot roll back to position {pos}: the cache holds only "
                                            f"{self.pos} positions")


class SessionStore:
    """All live sessions of one server: a cap on their number, a memory budget for their KV caches
    (each session reserves its worst case when it opens, so a running session never runs out), and
    an idle timeout."""

    def __init__(self, max_sessions: int, idle_ttl_s: float, kv_budget_bytes: int | None = None,
                 id_prefix: str = ""):
        self.max_sessions, self.idle_ttl_s = max_sessions, idle_ttl_s
        self.kv_budget_bytes = kv_budget_bytes
        # put before each session id (a replica's name on Ray Serve, so its router can send the session's steps
        # back to the replica that holds its cache); the random part stays unguessable
        self.id_prefix = id_prefix
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def reserved(self) -> int:
        return sum(s.reserved for s in list(self._sessions.values()))

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def add(self, reserve: int = 0, factory: type = Session, **fields):
        """A new session (`factory(id=..., reserved=..., **fields)`: any class with the fields the store
        uses: id, owner, reserved, last_used, closed, lock and release())."""
        with self._lock:
            self._expire_locked()
            if len(self._sessions) >= self.max_sessions:
                raise StepError("too_many_sessions", f"the server holds its maximum of {self.max_sessions} "
                                                     "sessions; retry later", 503, retry_after=self._retry_after())
            if self.kv_budget_bytes is not None:
                if reserve > self.kv_budget_bytes:
                    raise StepError("too_long", f"a session of this length needs {reserve / 2**20:.1f} MiB (KV "
                                                f"cache, or a training step's graph), more than this server's whole "
                                                f"budget of {self.kv_budget_bytes / 2**20:.1f} MiB; ask for fewer "
                                                "positions", 413)
                used = sum(s.reserved for s in self._sessions.values())
                if used + reserve > self.kv_budget_bytes:
                    raise StepError("busy", f"the KV-cache budget is full ({used / 2**20:.1f} of "
                                            f"{self.kv_budget_bytes / 2**20:.1f} MiB reserved for KV caches and "
                                            f"training graphs; this session needs "
                                            f"{reserve / 2**20:.1f}); retry later", 503,
                                    retry_after=self._retry_after())
            session = factory(id=self.id_prefix + secrets.token_urlsafe(24), reserved=reserve, **fields)
            self._sessions[session.id] = session
            return session

    def drop(self, session: Session) -> None:
        """Forget a session whose client has gone (its WebSocket closed) and free what it holds and reserves;
        a step in flight finishes first (call it off the event loop)."""
        with self._lock:
            if self._sessions.get(session.id) is session:
                del self._sessions[session.id]
        with session.lock:
            session.closed = True
            session.release()

    def _retry_after(self) -> int:
        """Seconds until the next idle session would expire (1..60): a hint, not a promise."""
        now = time.monotonic()
        waits = [self.idle_ttl_s - (now - s.last_used) for s in self._sessions.values()]
        return int(min(max(min(waits, default=1.0), 1.0), 60.0))

    def get(self, session_id: str, owner: str = "", session_key: str | None = None) -> Session:
        """The session, if `owner` opened it and `session_key` is its key (a session opened with a key needs it,
        token or not); anything else answers exactly like a missing session: no oracle for valid ids."""
        session = self._sessions.get(session_id)
        key = getattr(session, "key", "")
        if session is None or session.closed or not hmac.compare_digest(session.owner, owner) or \
                (key and not hmac.compare_digest(key.encode(), (session_key or "").encode())):
            raise StepError("unknown_session", "unknown or closed session", 404)
        return session

    def get_by_key(self, session_id: str, session_key: str, within_s: float) -> Session:
        """A browser device's session, by its key alone (a page's WebSocket cannot send the token): only within
        `within_s` of its opening, and only once; anything else answers like a missing session."""
        session = self._sessions.get(session_id)
        key = getattr(session, "key", "")
        if session is None or session.closed or not key or session.browser_key_used or \
                time.monotonic() - session.opened > within_s or \
                not hmac.compare_digest(key.encode(), session_key.encode()):
            raise StepError("unknown_session", "unknown or closed session (a key sent as a WebSocket subprotocol "
                                               f"opens its session once, within {within_s:g} s of its opening)", 404)
        session.browser_key_used = True
        return session

    def close(self, session_id: str, owner: str = "", session_key: str | None = None) -> None:
        self.get(session_id, owner, session_key)
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is None:
            raise StepError("unknown_session", "unknown or closed session", 404)
        with session.lock:
            session.closed = True
            session.release()  # frees the KV memory and any training graph

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
                session.closed = True
                session.release()
                expired += 1
            finally:
                session.lock.release()
        return expired
