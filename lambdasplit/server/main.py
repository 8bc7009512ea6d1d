"""Start the body server: load the body, bind the socket, run uvicorn."""

from __future__ import annotations

import gc
import ipaddress
import logging
import resource
import socket
import sys
from pathlib import Path

import uvicorn

from ..models.source import model_name, resolve_model
from ..net.ports import bind, bound_url, listen  # noqa: F401  (listen: the web app's too)
from ..util.threads import hand_over
from .app import BodyRuntime, ServerSettings, create_app
from .connections import ConnectionLimits, guarded_protocol
from .logs import configure as configure_logging
from .logs import uvicorn_log_config

READY_LINE = "lambdasplit body server listening on"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, tls: bool, tokens: bool, insecure: bool) -> str | None:
    """Refuse (SystemExit) to listen beyond loopback without TLS and tokens, unless `insecure`; return a
    warning to print when `insecure` lets it through."""
    if is_loopback(host):
        return None
    missing = [what for what, ok in (("TLS (--tls-cert, --tls-key)", tls), ("tokens (--tokens FILE)", tokens))
               if not ok]
    if not missing:
        return None
    if not insecure:
        raise SystemExit(
            f"refusing to listen on {host} without {' and '.join(missing)}: hidden states would cross the network "
            "unencrypted or anyone could use the server. Listen on 127.0.0.1, add them, or pass --insecure if you "
            "really mean it.")
    return f"WARNING: serving on {host} without {' and '.join(missing)} (--insecure)"


def serve(model: str | None, x: int, y: int, host: str = "127.0.0.1", port: int = 8470,
          dtype: str = "float32", settings: ServerSettings = ServerSettings(), insecure: bool = False,
          log_level: str = "warning", basis: str | None = None, cloud_only: bool = False,
          tls_cert: str | None = None, tls_key: str | None = None, image: bool = False,
          sock: socket.socket | None = None) -> None:
    """Load layers [x, y) of `model` (or, with `image`, the U-Net of a text-to-image pipeline folder) and serve
    them until interrupted. `sock`: a socket already bound to host:port (net/ports.py: bind), else one is bound
    here, before the load, so that a port in use fails at once."""
    if bool(tls_cert) != bool(tls_key):
        raise SystemExit("TLS needs both --tls-cert and --tls-key")
    tls = _tls_context(tls_cert, tls_key) if tls_cert else None
    if cloud_only and settings.tokens is not None:
        raise SystemExit("--cloud-only is the paper's baseline for benchmarks and checks no tokens: serve it on "
                         "loopback, without --tokens")
    hand_over()  # the body computes on its own thread: the main thread keeps to one (util/threads.py)
    warning = check_exposure(host, tls is not None, settings.tokens is not None, insecure)
    if warning:
        print(warning, file=sys.stderr)
    if sock is None:
        sock = bind(host, port)  # a port in use fails now, not after the load
    url = bound_url(sock, host, "https" if tls else "http")
    folder = Path(model) if image else resolve_model(model)
    print(f"loading {_what_loads(folder, x, y, image, cloud_only)} ({dtype}) on {settings.device} ...",
          file=sys.stderr, flush=True)
    if image:
        from ..models.diffusion import PipelineFacts
        from .images import ImageRuntime, create_image_app

        runtime = ImageRuntime(PipelineFacts.read(folder), dtype, settings.device)
        app = create_image_app(runtime, settings)
        what = (f"text-to-image model {runtime.name}: its U-Net, {runtime.body.parameters()[0] / 1e6:.1f} M "
                f"parameters, {runtime.describe()}")
    elif cloud_only:
        from .cloud import create_cloud_app

        app = create_cloud_app(folder, settings.device, dtype)
        what = "cloud-only: the whole model, text in and out"
    else:
        runtime = BodyRuntime(folder, x, y, dtype, basis=basis, device=settings.device)
        if settings.compile:
            print("compiling the body's decode step (once; about 40 s for 28 layers on 2 cores) ...", file=sys.stderr,
                  flush=True)
            print(f"compiled in {runtime.compile():.1f} s", file=sys.stderr, flush=True)
        app = create_app(runtime, settings)
        report = runtime.model.parameter_report()["body"]
        what = (f"model {runtime.name}, layers [{runtime.split.x}, {runtime.split.y}) of {runtime.split.n}, "
                f"{report['params'] / 1e6:.1f} M parameters, {runtime.weights.describe()} on {runtime.device}")

    sock.listen(2048)
    print(f"{READY_LINE} {url} ({what})", flush=True)
    configure_logging(log_level)
    logging.captureWarnings(True)  # Python warnings go to the py.warnings logger: JSON too (uvicorn_log_config)
    limits = connection_limits(settings)
    config = uvicorn.Config(app, log_level=log_level, ws_max_size=settings.max_frame_bytes + 4096, ws_max_queue=1,
                            ws_per_message_deflate=False, timeout_keep_alive=limits.keep_alive_s,
                            http=guarded_protocol(limits), log_config=uvicorn_log_config(log_level),
                            ssl_certfile=tls_cert, ssl_keyfile=tls_key,
                            ssl_context_factory=_without_session_tickets if tls_cert else None)
    # the loaded body is ~400k long-lived objects: a full collection over them paused every request for
    # 0.3-0.4 s; frozen, the collector walks only what requests allocate
    gc.collect()
    gc.freeze()
    uvicorn.Server(config).run(sockets=[sock])


def connection_limits(settings: ServerSettings, keep_alive_s: float = 30.0) -> ConnectionLimits:
    """The settings' connection limits, with this process's file limit raised as far as it may go and the
    total cap kept below it (room for the model's files, the listening socket and the logs)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = settings.max_connections + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        soft = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        except (ValueError, OSError):
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    cap = settings.max_connections if soft == resource.RLIM_INFINITY else min(settings.max_connections,
                                                                                max(soft - 256, 16))
    return ConnectionLimits(settings.header_timeout_s, cap, min(settings.max_connections_per_client, cap),
                            keep_alive_s)


def _what_loads(folder: Path, x: int, y: int, image: bool, cloud_only: bool) -> str:
    if image:
        return f"the U-Net of {folder.name}"
    name = model_name(folder)
    return f"all of {name}" if cloud_only else f"layers [{x}, {y}) of {name}"


def _without_session_tickets(config, default):
    """uvicorn's TLS context, sending no TLS 1.3 session tickets.

    A TLS 1.3 server sends its tickets just after the handshake. A WebSocket client whose reader thread
    already waits on the socket (websockets' sync client) then reads them while its main thread writes
    the upgrade request: one SSL object read and written from two threads at once, which OpenSSL does
    not support, and which stalled a handshake until its timeout now and then. The clients here never
    resume a TLS session, so the tickets were of no use to them anyway.
    """
    context = default()
    context.num_tickets = 0
    return context


def _tls_context(cert: str, key: str):
    """Load the certificate and key once up front, so that a bad file fails here with its name."""
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise SystemExit(f"cannot load the TLS certificate {cert} with key {key}: {exc}") from None
    return context
