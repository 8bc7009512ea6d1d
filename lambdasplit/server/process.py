"""Start a body server (or the web app) as a subprocess on a free loopback port (for the demo, benches and tests)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import deque

from .main import READY_LINE


class ChildServer:
    """A lambdasplit command that serves on a free port in a child process; `url` is known once it listens
    (it prints `ready_line` and the URL)."""

    def __init__(self, cmd: list[str], ready_line: str, env: dict | None = None, startup_timeout: float = 300.0):
        self.cmd, self.ready_line = cmd, ready_line
        self.log: deque[str] = deque(maxlen=200)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})}, bufsize=1)
        self.url = self._wait_ready(startup_timeout)
        threading.Thread(target=self._drain, daemon=True).start()

    def _wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        for line in self.proc.stdout:
            self.log.append(line.rstrip())
            if line.startswith(self.ready_line):
                return line[len(self.ready_line):].split()[0]
            if time.monotonic() > deadline:
                break
        self.stop()
        raise RuntimeError(f"{' '.join(self.cmd[2:4])} did not start:\n" + "\n".join(self.log))

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

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class ServerProcess(ChildServer):
    """`lambdasplit serve … --port 0` in a child process."""

    def __init__(self, model: str | None, split: str, *extra: str, host: str = "127.0.0.1",
                 env: dict | None = None, startup_timeout: float = 300.0):
        cmd = [sys.executable, "-m", "lambdasplit", "serve", "--split", split, "--host", host, "--port", "0", *extra]
        if model:
            cmd += ["--model", str(model)]
        super().__init__(cmd, READY_LINE, env, startup_timeout)
