"""Start the body server: load the body, bind the socket, run uvicorn."""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys

import uvicorn

from ..models.source import resolve_model
from .app import BodyRuntime, ServerSettings, create_app

READY_LINE = "lambdasplit body server listening on"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(model: str | None, x: int, y: int, host: str = "127.0.0.1", port: int = 8470,
          dtype: str = "float32", settings: ServerSettings = ServerSettings(), insecure: bool = False,
          log_level: str = "warning", basis: str | None = None, cloud_only: bool = False) -> None:
    """Load layers [x, y) of `model` and serve them until interrupted."""
    if not is_loopback(host) and not insecure:
        raise SystemExit(
            f"refusing to listen on {host} in plain HTTP: hidden states would cross the network unencrypted "
            "and unauthenticated. Listen on 127.0.0.1, or pass --insecure if you really mean it."
        )
    if not is_loopback(host):
        print(f"WARNING: serving plain HTTP without authentication on {host} (--insecure)", file=sys.stderr)
    folder = resolve_model(model)
    if cloud_only:
        from .cloud import create_cloud_app

        app = create_cloud_app(folder)
        what = "cloud-only: the whole model, text in and out"
    else:
        runtime = BodyRuntime(folder, x, y, dtype, basis=basis)
        app = create_app(runtime, settings)
        report = runtime.model.parameter_report()["body"]
        what = (f"model {runtime.name}, layers [{runtime.split.x}, {runtime.split.y}) of {runtime.split.n}, "
                f"{report['params'] / 1e6:.1f} M parameters")

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)  # connections queue from here on, before uvicorn starts accepting
    bound = sock.getsockname()[1]
    print(f"{READY_LINE} http://{host if family == socket.AF_INET else f'[{host}]'}:{bound} ({what})", flush=True)
    logging.basicConfig(level=log_level.upper())
    config = uvicorn.Config(app, log_level=log_level, ws_max_size=settings.max_frame_bytes + 4096,
                            ws_per_message_deflate=False, timeout_keep_alive=30)
    uvicorn.Server(config).run(sockets=[sock])
