"""What a body server's handlers share: its settings, its session table, its counters, and who may call.

Each app (the LLM body, app.py; the U-Net, images.py) builds one context over its loaded model and hands
it to its routers (routes/): nothing lives in module globals, so two apps in one process share nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import psutil
from fastapi import FastAPI

from ..wire.frame import Limits
from .auth import ANONYMOUS, AuthError, Principal, TokenBook
from .metrics import Metrics
from .sessions import SessionStore, StepError

log = logging.getLogger("lambdasplit.server")


@dataclass(frozen=True)
class ServerSettings:
    max_sessions: int = 64
    idle_ttl_s: float = 600.0
    max_frame_bytes: int = 64 << 20
    max_positions: int | None = None  # default: the model's context length
    kv_budget_bytes: int | None = None  # default: a quarter of this machine's memory
    tokens: TokenBook | None = None  # None: no authentication (loopback only, unless --insecure)
    max_batch: int = 16  # decode steps of concurrent sessions that share one forward pass (1: no batching)
    session_prefix: str = ""  # what every session id starts with (a Ray Serve replica's routing key)
    dishonest: float = 0.0  # TESTING ONLY: perturb every answer by this x its RMS (serve --dishonest)
    dishonest_after: int = 0  # ... from each session's step N on
    peers: tuple[str, ...] = ()  # servers a session may ask this one to forward its output to (a sharded body)
    peer_token: str | None = None  # the bearer token this server presents to its peers
    device: str = "auto"  # where the body computes: auto, cpu, cuda, cuda:N, mps (models/device.py)
    compile: bool = False  # one compiled graph for single-position steps (models/compiled.py), compiled at start
    exchange_timeout_s: float = 5.0  # how long a step waits for its device mid-step (PrivateLoRA) before it fails
    header_timeout_s: float = 10.0  # a connection's request head must arrive within this (server/connections.py)
    max_connections: int = 1000  # open connections in all; beyond it new ones get 503 and are closed
    max_connections_per_client: int = 128  # open connections from one client address
    docs: bool = False  # serve /docs, /redoc and /openapi.json (behind the token on a token server)
    allow_origins: tuple[str, ...] = ()  # browser pages (scheme://host[:port]) that may use this server

    def __post_init__(self):
        for name in ("max_sessions", "idle_ttl_s", "max_frame_bytes", "max_batch", "header_timeout_s",
                     "exchange_timeout_s", "max_connections", "max_connections_per_client"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("max_positions", "kv_budget_bytes"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def kv_budget(self) -> int:
        return self.kv_budget_bytes or psutil.virtual_memory().total // 4


class ServerContext:
    """The state every route of one server needs. Subclasses add their model's, set their gauges, and
    stop their compute thread in close()."""

    def __init__(self, settings: ServerSettings, store: SessionStore):
        self.settings, self.store = settings, store
        self.metrics = Metrics()
        self.limits = Limits(max_frame_bytes=settings.max_frame_bytes)

    def who(self, headers) -> Principal:
        """The caller, from the Authorization header; every request but /health needs it on a token server."""
        if self.settings.tokens is None:
            return ANONYMOUS
        try:
            return self.settings.tokens.check(headers.get("authorization"))
        except AuthError as exc:
            self.metrics.inc("unauthorized_total")
            raise StepError("unauthorized", str(exc), 401) from None

    def close(self) -> None:
        """Stop the compute thread (the app is shutting down)."""

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI):
        """The app's lifespan: expire idle sessions every few seconds; at shutdown, stop the compute thread."""
        task = asyncio.create_task(self._reap())
        yield
        task.cancel()
        self.close()

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(min(5.0, self.settings.idle_ttl_s / 2))
            if n := self.store.expire_idle():
                log.info("expired %d idle session(s)", n)
