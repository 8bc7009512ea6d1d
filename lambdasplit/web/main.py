"""Serve the page and the local API of a loaded device (the work of `lambdasplit web`)."""

from __future__ import annotations

READY_LINE = "lambdasplit web listening on"
WILDCARDS = ("0.0.0.0", "::")


def check_host(host: str, api_key: str | None = None) -> str | None:
    """Loopback needs nothing. Any other address (for an app in a container, say) needs the API key, since the
    API is then open to other machines; SystemExit without one. Returns a warning to print for such an address."""
    from ..server.main import is_loopback

    if is_loopback(host):
        return None
    if not api_key:
        raise SystemExit(f"refusing to serve the web UI on {host} without an API key: other machines could use "
                         "the model. Listen on loopback (127.0.0.1, ::1), or give a key with --api-key-file FILE "
                         "(or LAMBDASPLIT_API_KEY).")
    return (f"warning: listening on {host}: other machines reach the OpenAI-compatible API (/v1, with the API key), "
            "/health and /metrics; the page and its own API answer this machine only. There is no TLS: the key, "
            "the prompts and the answers cross that network in plain HTTP, so keep it to a host-only network "
            "(a container bridge) or a firewall.")


def serve_web(device, images=None, *, host: str = "127.0.0.1", port: int = 8480, api_key: str | None = None,
              log_level: str = "warning", open_browser: bool = False, names: tuple[str, ...] = (),
              allow_hosts: tuple[str, ...] = (), allow_origins: tuple[str, ...] = (), tab=None) -> None:
    """Serve `device` (web.device.Device) and, if given, `images` (web.images.ImageDevice) until stopped; the
    API answers to `names` (default: the model's name), for the `allow_hosts` and `allow_origins` too
    (web/guard.py). With `tab` (web.tab.TabDevice), the page can run the device itself."""
    import sys

    import uvicorn

    from ..server.logs import configure as configure_logging
    from ..server.main import listen
    from .app import create_app

    if warning := check_host(host, api_key):
        print(warning, file=sys.stderr, flush=True)
    app = create_app(device, api_key, images, names=names, allow_hosts=allow_hosts, allow_origins=allow_origins,
                     tab=tab)
    device.client(device.defaults)  # load the default split now, not on the first chat
    sock, url = listen(host, port)
    if host in WILDCARDS:  # every address: this machine's browser and apps use loopback (a Host the app answers)
        url = f"http://{'127.0.0.1' if host == '0.0.0.0' else '[::1]'}:{url.rsplit(':', 1)[1]}"
    d, name = device.defaults, (names or (device.name,))[0]
    print(f"{READY_LINE} {url} (model {name}, split {d.x}:{d.y}, wire {d.up},{d.down}; body server "
          f"{device.servers[0]}" + (f"; image server {images.server}" if images else "") + ")", flush=True)
    print(f"  open {url}/ in a browser; OpenAI-compatible API: base_url={url}/v1, model={name!r}"
          + (" (needs the API key)" if api_key else ""), flush=True)
    if tab is not None:
        x, y = tab.manifest["split"]
        print(f"  the page can run the device itself (split {x}:{y}, ONNX in the tab): the body server must allow "
              f"this origin, `lambdasplit serve ... --allow-origin {url}`", flush=True)
    if open_browser:
        import webbrowser

        webbrowser.open(f"{url}/")
    configure_logging(log_level)
    config = uvicorn.Config(app, log_level=log_level, timeout_keep_alive=30)
    uvicorn.Server(config).run(sockets=[sock])
