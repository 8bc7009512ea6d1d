"""Listening sockets for the servers: bind first (so that a port in use fails before a model loads), listen
once ready. Torch-free, so that the CLI can take its port before it imports the server."""

from __future__ import annotations

import errno
import socket


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (0: any free port), not listening yet: the port is this process's from
    here on, and clients are refused until it listens. A port in use is a SystemExit that says so and how to
    pick another."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        hint = ""
        if exc.errno == errno.EADDRINUSE:
            hint = ("; another server (perhaps another lambdasplit serve) is listening there: stop it, choose "
                    "another --port, or --port 0 for a free one (the ready line prints it)")
        raise SystemExit(f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}") from None
    return sock


def bound_url(sock: socket.socket, host: str, scheme: str = "http") -> str:
    """The URL of a socket bound on `host`, with the port it got (the one picked, for port 0)."""
    port = sock.getsockname()[1]
    return f"{scheme}://{host if sock.family == socket.AF_INET else f'[{host}]'}:{port}"


def listen(host: str, port: int, scheme: str = "http") -> tuple[socket.socket, str]:
    """A listening socket on host:port (0: any free port) and its URL; connections queue from here on,
    before uvicorn starts accepting, so a process can print its URL as soon as this returns."""
    sock = bind(host, port)
    sock.listen(2048)
    return sock, bound_url(sock, host, scheme)
