"""`lambdasplit web`: load the device side, then serve the page and the local API on loopback."""

from __future__ import annotations

import os
import sys
from pathlib import Path

READY_LINE = "lambdasplit web listening on"


def run_web(args) -> None:
    import uvicorn

    from ..cli import client_token
    from ..client.body import Retry
    from ..models.llm import parse_split
    from ..server.logs import configure as configure_logging
    from ..server.main import is_loopback, listen
    from .app import create_app
    from .device import Device

    if not is_loopback(args.host):
        raise SystemExit(f"refusing to serve the web UI on {args.host}: it shows your prompts and answers, and "
                         "they must not leave this device. It listens on loopback only (127.0.0.1, ::1).")
    api_key, token = _api_key(args.api_key_file), client_token(args)
    server = args.server
    if args.link:  # an emulated link between this device and the body server, for the whole run
        from ..net.link import link_to

        if "," in server:
            raise SystemExit("--link emulates the link to one server: give a single --server URL")
        link = link_to(server, args.link)
        print(f"the device reaches {server} through an emulated link: {link.spec}", file=sys.stderr)
        server = link.url
    print(f"connecting to the body server at {server} and loading the device's head and tail ...",
          file=sys.stderr, flush=True)
    device = Device(args.model, server, parse_split(args.split) if args.split else None, args.wire,
                    cache=not args.no_cache,
                    token=token, ca_bundle=args.ca_bundle, transport=args.transport,
                    speculate=args.speculate, max_draft=args.max_draft, basis=args.basis,
                    retry=Retry(attempts=args.retries), assessment=args.assessment, adapter=args.adapter)
    device.client(device.defaults)  # load the default split now, not on the first chat
    images = _images(args, token)
    sock, url = listen(args.host, args.port)
    d = device.defaults
    print(f"{READY_LINE} {url} (model {device.name}, split {d.x}:{d.y}, wire {d.up},{d.down}; body server "
          f"{device.servers[0]}" + (f"; image server {images.server}" if images else "") + ")", flush=True)
    print(f"  open {url}/ in a browser; OpenAI-compatible API: base_url={url}/v1, model={device.name!r}"
          + (" (needs the API key)" if api_key else ""), flush=True)
    if args.open:
        import webbrowser

        webbrowser.open(f"{url}/")
    configure_logging(args.log_level)
    config = uvicorn.Config(create_app(device, api_key, images), log_level=args.log_level, timeout_keep_alive=30)
    uvicorn.Server(config).run(sockets=[sock])


def _images(args, token: str | None):
    """The image side, when --image-server is given: the device's text encoder and VAE, loaded now."""
    if not args.image_server:
        return None
    from .images import ImageDevice

    print(f"loading the device's text encoder and VAE of {args.image_model} for the image server at "
          f"{args.image_server} ...", file=sys.stderr, flush=True)
    images = ImageDevice(args.image_model, args.image_server, token=token, ca_bundle=args.ca_bundle)
    if images.info is None:
        print(f"warning: {images.problem}; the Image tab stays off until it answers", file=sys.stderr, flush=True)
    return images


def _api_key(path: str | None) -> str | None:
    if path:
        try:
            key = Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SystemExit(f"cannot read the API key file {path}: {exc.strerror or exc}") from None
        if not key:
            raise SystemExit(f"the API key file {path} is empty")
        return key
    return os.environ.get("LAMBDASPLIT_API_KEY") or None
