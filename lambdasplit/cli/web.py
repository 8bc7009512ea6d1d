"""`lambdasplit web`: the device's head and tail here, a page and an OpenAI-compatible API on loopback (other
hosts and origins only when named)."""

from __future__ import annotations

import sys

from .options import (
    add_adapter,
    add_compute,
    add_connection,
    add_model,
    add_split,
    add_wire,
    client_token,
    compute_options,
    retry_policy,
    wire_pair,
)


def register(sub) -> None:
    p = sub.add_parser("web", help="the web UI and an OpenAI-compatible API on this device, over a body server",
                       description="Run the head and tail here and serve, on loopback by default, a page to chat "
                                   "through the split model (tokens stream in; the split, the codecs and sampling are "
                                   "settable) that shows what the network sees: bytes each way, the time split into "
                                   "device, network and cloud, the latest frames in hex with a heatmap of the "
                                   "transmitted state, what a cloud-only request would have carried, and the "
                                   "leakage `lambdasplit assess` measured for the split. The same process serves "
                                   "an OpenAI-compatible API (POST /v1/chat/completions, /v1/completions, GET "
                                   "/v1/models) for existing apps, and /health, /healthz and /metrics. With "
                                   "--image-server, an Image tab makes pictures through a "
                                   "diffusion U-Net there, showing the image as it denoises and the noise each "
                                   "step carries. Nothing is fetched from the internet; nothing but hidden states "
                                   "(for images: the prompt's embeddings, the initial latent and the noise) "
                                   "crosses the network.")
    p.add_argument("--server", required=True, metavar="URL[,URL...]",
                   help="body server URL, e.g. http://127.0.0.1:8470 (several, comma-separated, are tried in turn)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1). Any non-loopback address (0.0.0.0, a container "
                        "bridge such as 172.17.0.1) needs --api-key-file, and opens only /v1, /health and /metrics to "
                        "other machines, in plain HTTP")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests whose Host is NAME, e.g. host.docker.internal for an app in a "
                        "container (repeatable; default: loopback names only, against DNS rebinding)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="let pages of ORIGIN (e.g. http://localhost:3000) call the OpenAI-compatible API from a "
                        "browser: CORS preflights are answered and answers carry Access-Control-Allow-Origin "
                        "(repeatable; default: none)")
    p.add_argument("--served-model-name", action="append", default=[], nargs="+", metavar="NAME",
                   help="the model name(s) the API answers to and lists, the first first (repeatable; default: the "
                        "model folder's name)")
    p.add_argument("--port", type=int, default=8480, help="port to listen on (default 8480; 0 picks a free one)")
    p.add_argument("--api-key-file", default=None, metavar="FILE",
                   help="require this key (Authorization: Bearer KEY) on the OpenAI-compatible API; also "
                        "LAMBDASPLIT_API_KEY (default: none, loopback only)")
    p.add_argument("--assessment", default=None, metavar="FILE",
                   help="the privacy assessment whose leakage the page shows (default: the one `lambdasplit assess` "
                        "keeps for this model, if any)")
    add_adapter(p)
    p.add_argument("--image-server", default=None, metavar="URL",
                   help="a body server that serves a text-to-image U-Net (lambdasplit serve --model digits): turns "
                        "on the Image tab, where the prompt is encoded and the image decoded on this device")
    p.add_argument("--image-model", default="digits", metavar="M",
                   help="this device's copy of the image pipeline (text encoder, VAE): a diffusers folder or "
                        "'digits', the embedded model (default)")
    p.add_argument("--in-browser", nargs="?", const="auto", default=None, metavar="DIR",
                   help="also run the device in the page itself: the tab runs the tokenizer, head and tail (ONNX "
                        "Runtime Web) and talks to the body server directly, so that the prompt and the answer never "
                        "leave the browser. DIR: a folder `lambdasplit export-web` wrote; without it, the split is "
                        "exported once into the cache. The body server must allow this app's origin (serve "
                        "--allow-origin http://127.0.0.1:PORT). Needs the 'browser' extra and the page's runtimes "
                        "(docs/browser.md)")
    p.add_argument("--open", action="store_true", help="open the page in the default browser")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    add_connection(p)
    add_model(p)
    add_split(p, None)
    add_wire(p)
    add_compute(p, "head and tail", body_weights=True, compile=True)
    p.set_defaults(run=run)


def run(args) -> None:
    from ..models.llm import parse_split
    from ..net.origins import normal_origin
    from ..util.secrets import read_secret
    from ..util.threads import hand_over
    from ..web.device import Device
    from ..web.main import check_host, serve_web

    api_key = read_secret(args.api_key_file, "LAMBDASPLIT_API_KEY", "API key")
    check_host(args.host, api_key)
    names = tuple(name for group in args.served_model_name for name in group)
    try:
        origins = tuple(normal_origin(o) for o in args.allow_origin)
    except ValueError as exc:
        raise SystemExit(f"--allow-origin: {exc}") from None
    hand_over()  # generations run on threads of their own (util/threads.py)
    token, retry = client_token(args), retry_policy(args)
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
    device = Device(args.model, server, parse_split(args.split) if args.split else None, wire_pair(args),
                    cache=not args.no_cache, token=token, ca_bundle=args.ca_bundle, transport=args.transport,
                    speculate=args.speculate, max_draft=args.max_draft, basis=args.basis, retry=retry,
                    assessment=args.assessment, adapter=args.adapter, compute=compute_options(args))
    serve_web(device, _images(args, token), host=args.host, port=args.port, api_key=api_key,
              log_level=args.log_level, open_browser=args.open, names=names, allow_hosts=tuple(args.allow_host),
              allow_origins=origins, tab=_tab(args, device, token))


def _tab(args, device, token: str | None):
    """The device in the page, when --in-browser is given: the export it runs (made now if needed)."""
    if args.in_browser is None:
        return None
    from pathlib import Path

    from ..browser.page import runtime_dir
    from ..util.extras import check
    from ..web.tab import TabDevice, prepare_export

    runtime_dir()  # the page's runtimes are missing: said before any export
    if args.in_browser == "auto":
        check("onnx", "browser")
        folder = prepare_export(device.folder, device.defaults.x, device.defaults.y,
                                log=lambda m: print(m, file=sys.stderr, flush=True))
    else:
        folder = Path(args.in_browser)
    return TabDevice(folder, device.servers, device.server, token=token, ca_bundle=args.ca_bundle)


def _images(args, token: str | None):
    """The image side, when --image-server is given: the device's text encoder and VAE, loaded now."""
    if not args.image_server:
        return None
    from ..web.images import ImageDevice

    print(f"loading the device's text encoder and VAE of {args.image_model} for the image server at "
          f"{args.image_server} ...", file=sys.stderr, flush=True)
    images = ImageDevice(args.image_model, args.image_server, token=token, ca_bundle=args.ca_bundle,
                         device=args.device)
    if images.info is None:
        print(f"warning: {images.problem}; the Image tab stays off until it answers", file=sys.stderr, flush=True)
    return images
