"""Start `lambdasplit web` as a subprocess on a free loopback port (for tests and benches)."""

from __future__ import annotations

import sys

from ..server.process import ChildServer
from .main import READY_LINE


class WebProcess(ChildServer):
    """`lambdasplit web --server URL … --port 0` in a child process."""

    def __init__(self, server: str, *extra: str, env: dict | None = None, startup_timeout: float = 300.0):
        cmd = [sys.executable, "-m", "lambdasplit", "web", "--server", server, "--port", "0", *extra]
        super().__init__(cmd, READY_LINE, env, startup_timeout)
