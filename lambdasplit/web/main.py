"""Serve the page and the local API of a loaded device on loopback (the work of `lambdasplit web`)."""

from __future__ import annotations

READY_LINE = "lambdasplit web listening on"


def check_host(host: str) -> None:
    """Refuse any address but loopback: the page shows the user's prompts and answers."""
    from ..server.main import is_loopback

    if not is_loopback(host):
        raise SystemExit(f"refusing to serve the web UI on {host}: it shows your prompts and answers, and "
                         "they must not leave this device. It listens on loopback only (127.0.0.1, ::1).")


def serve_web(device, images=None, *, host: str = "127.0.0.1", port: int = 8480, api_key: str | None = None,
              log_level: str = "warning", open_browser: bool = False) -> None:
    """Serve `device` (web.device.Device) and, if given, `images` (web.images.ImageDevice) until stopped."""
    import uvicorn

    from ..server.logs import configure as configure_logging
    from ..server.main import listen
    from .app import create_app

    check_host(host)
    device.client(device.defaults)  # load the default split now, not on the first chat
    sock, url = listen(host, port)
    d = device.defaults
    print(f"{READY_LINE} {url} (model {device.name}, split {d.x}:{d.y}, wire {d.up},{d.down}; body server "
          f"{device.servers[0]}" + (f"; image server {images.server}" if images else "") + ")", flush=True)
    print(f"  open {url}/ in a browser; OpenAI-compatible API: base_url={url}/v1, model={device.name!r}"
          + (" (needs the API key)" if api_key else ""), flush=True)
    if open_browser:
        import webbrowser

        webbrowser.open(f"{url}/")
    configure_logging(log_level)
    config = uvicorn.Config(create_app(device, api_key, images), log_level=log_level, timeout_keep_alive=30)
    uvicorn.Server(config).run(sockets=[sock])
