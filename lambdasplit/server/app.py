"""The body server: FastAPI app over one loaded body and its sessions.

Session management is plain JSON over HTTP (routes/sessions.py); steps are binary frames over one
WebSocket per session, or one HTTP POST per step where WebSockets cannot pass (routes/steps.py). The
model runs on one dedicated compute thread (scheduler.py): the event loop stays free for I/O, and torch
keeps a single team of worker threads (each new calling thread would get its own OpenMP team, and idle
teams spin on the same cores).
"""

from __future__ import annotations

from fastapi import FastAPI

from .body import BodyContext, BodyRuntime
from .context import ServerSettings
from .routes.common import server_app
from .routes.sessions import sessions_router
from .routes.steps import steps_router

__all__ = ["BodyRuntime", "ServerSettings", "create_app"]


def create_app(runtime: BodyRuntime, settings: ServerSettings = ServerSettings()) -> FastAPI:
    """The body server's app: health and metrics, sessions, steps; all over one BodyContext."""
    ctx = BodyContext(runtime, settings)
    return server_app("lambdasplit body server", ctx, sessions_router(ctx), steps_router(ctx))
