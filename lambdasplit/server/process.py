"""Start a body server as a subprocess on a free loopback port (for the demo, benches and tests)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import deque

from .main import READY_LINE


class ServerProcess:
    """`lambdasplit serve … --port 0` in a child process; `url` is known once it is listening."""

    def __init__(self, model: str | None, split: str, *extra: str, host: str = "127.0.0.1",
                 env: dict | None = None, startup_timeout: float = 300.0):
        cmd = [sys.executable, "-m", "lambdasplit", "serve", "--split", split, "--host", host, "--port", "0", *extra]
        if model:
            cmd += ["--model", str(model)]
        self.cmd = cmd
        self.log: deque[str] = deque(maxlen=200)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})}, bufsize=1)
        self.url = self._wait_ready(startup_timeout)
        threading.Thread(target=self._drain, daemon=True).start()

    def _wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        for line in self.proc.stdout:
            self.log.append(line.rstrip())
            if line.startswith(READY_LINE):
                return line[len(READY_LINE):].split()[0]
            if time.monotonic() > deadline:
                break
        self.stop()
        raise RuntimeError("body server did not start:\n" + "\n".join(self.log))

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line.rstrip())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
