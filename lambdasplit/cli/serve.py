"""`lambdasplit serve`, `token` and `fit-basis`: the cloud's side of the split."""

from __future__ import annotations

import argparse
import os
import sys

from .options import DTYPES, add_basis, add_compute, add_model, add_output, add_split


def register(sub) -> None:
    _serve_parser(sub)
    _token_parser(sub)
    _fit_basis_parser(sub)


def run(args) -> None:
    {"serve": _serve, "token": _token, "fit-basis": _fit_basis}[args.command](args)


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="run a body server (layers [X,Y) of a model, or a text-to-image U-Net)",
                       description="Serve layers [X,Y) of a model to split-inference clients over HTTP + WebSocket. "
                                   "Given a text-to-image pipeline (--model digits, the embedded one, or a diffusers "
                                   "folder of Stable Diffusion 1.x/2.x or SDXL), serve its U-Net instead, for "
                                   "lambdasplit imagine; --split does not apply then.")
    add_model(p)
    add_split(p, "1:-1")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8470, help="port to listen on; 0 picks a free one (default 8470)")
    add_compute(p, "body", compile=True)
    p.add_argument("--dtype", default=None, choices=DTYPES, help=argparse.SUPPRESS)  # the older name of --weights
    p.add_argument("--max-sessions", type=int, default=64, help="most concurrent sessions (default 64)")
    p.add_argument("--max-positions", type=int, default=None, help="longest sequence per session "
                   "(default: the model's context)")
    p.add_argument("--max-frame-mb", type=float, default=64, help="largest frame accepted, in MiB (default 64)")
    p.add_argument("--idle-ttl", type=float, default=600, help="seconds before an idle session is freed (default 600)")
    _server_security(p)
    p.add_argument("--exchange-timeout", type=float, default=5.0, metavar="S", help="seconds a step waits for the "
                   "device's answer mid-step (PrivateLoRA adapters) before it fails and the session closes (default 5)")
    p.add_argument("--max-batch", type=int, default=16, metavar="B",
                   help="decode steps of up to B concurrent sessions share one forward pass (default 16; 1 runs "
                        "every step alone)")
    p.add_argument("--kv-budget-mb", type=float, default=None, metavar="MB",
                   help="memory for all sessions' KV caches; each session reserves its maximum length when it "
                        "opens, and new sessions are refused with Retry-After when it is full (default: a quarter "
                        "of this machine's memory)")
    p.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")
    p.add_argument("--peers", default=None, metavar="URL[,URL...]",
                   help="a sharded body's next-hop servers this one may forward its output to, when a session asks "
                        "(lambdasplit generate --hops forward); no others (default: none, no forwarding). The token "
                        "presented to them comes from $LAMBDASPLIT_PEER_TOKEN")
    p.add_argument("--dishonest", type=float, default=0.0, metavar="S",
                   help="TESTING ONLY: a lying server, to show that --verify catches it: perturb every answer by "
                        "Gaussian noise of S x its RMS (default 0: honest)")
    p.add_argument("--dishonest-after", type=int, default=0, metavar="N",
                   help="TESTING ONLY: with --dishonest, lie from each session's step N on (default 0)")
    p.add_argument("--cloud-only", action="store_true",
                   help="the paper's baseline: run the whole model here and take text (POST /v1/complete); "
                        "prompts and answers then cross the network in plain text")
    add_basis(p)
    _ray_options(p)
    p.set_defaults(run=run)


def _server_security(p) -> None:
    g = p.add_argument_group("security (required beyond loopback)")
    g.add_argument("--tls-cert", default=None, metavar="PEM", help="serve HTTPS/WSS with this certificate (chain)")
    g.add_argument("--tls-key", default=None, metavar="PEM", help="the certificate's private key")
    g.add_argument("--tokens", default=None, metavar="FILE",
                   help="accept only bearer tokens whose hashes this file lists (make one with: lambdasplit token "
                        "new --file FILE); each session is bound to the token that opened it")
    g.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback address without TLS or tokens (hidden states then cross the network "
                        "unencrypted, or anyone may use the server)")
    g.add_argument("--header-timeout", type=float, default=10.0, metavar="S",
                   help="close a connection whose request head is not complete within S seconds (default 10)")
    g.add_argument("--max-connections", type=int, default=1000, metavar="N",
                   help="open connections in all; beyond them new ones get 503 (default 1000, kept below the "
                        "process's file limit)")
    g.add_argument("--max-connections-per-client", type=int, default=128, metavar="N",
                   help="open connections from one client address; beyond them new ones get 503 (default 128)")
    g.add_argument("--docs", action="store_true",
                   help="serve the API description, /openapi.json (behind the token with --tokens; no docs pages, which "
                        "would load scripts from a CDN)")
    g.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="a web page's origin (scheme://host[:port]) whose browser device may use this server: CORS "
                        "for it, and its WebSocket may carry the session key as a subprotocol (docs/browser.md); "
                        "requests from any other page are refused; repeat for more")


def _ray_options(p) -> None:
    g = p.add_argument_group("Ray Serve (scale out; needs: pip install 'lambdasplit[ray]')")
    g.add_argument("--ray", action="store_true",
                   help="serve the body from Ray Serve replicas behind Serve's HTTP proxy on --host/--port (same "
                        "protocol; each session's steps go to the replica that holds its KV cache)")
    g.add_argument("--replicas", type=int, default=None, metavar="N", help="with --ray: body replicas (default 2)")
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="with --ray: an existing Ray cluster (e.g. 10.0.0.5:6379); default: a new local Ray instance")
    g.add_argument("--ray-cpus-per-replica", type=float, default=None, metavar="C",
                   help="with --ray: Ray CPUs each replica reserves, and its torch threads (default 1)")


def _token_parser(sub) -> None:
    p = sub.add_parser("token", help="make bearer tokens for a body server (stores only their hashes)",
                       description="Tokens for `serve --tokens FILE`. The file keeps SHA-256 hashes, never the tokens.")
    tok = p.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    t = tok.add_parser("new", help="make a token, append its hash to FILE, print the token once",
                       description="Make a random 256-bit token, append 'sha256:<hash> NAME' to FILE (created with "
                                   "mode 0600), and print the token on stdout. Give the token to the client (as a "
                                   "--token-file or LAMBDASPLIT_TOKEN); it cannot be recovered from FILE.")
    t.add_argument("--file", required=True, metavar="FILE", help="the server's token file")
    t.add_argument("--name", default=None, help="a name for the server's logs, e.g. alice-laptop")
    t = tok.add_parser("hash", help="print the token-file line for a token read from stdin",
                       description="Read a token from stdin and print the line a token file needs for it.")
    t.add_argument("--name", default=None, help="a name for the server's logs")
    p.set_defaults(run=run)


def _fit_basis_parser(sub) -> None:
    p = sub.add_parser("fit-basis", help="fit the PCA basis that pca:R wire codecs use",
                       description="Collect the hidden states at the split points on calibration text (the shipped "
                                   "text by default), fit a PCA basis per point, and write it as a safetensors "
                                   "file. Give the same file to the server (serve --basis) and to the client "
                                   "(--basis); sessions check its sha256.")
    add_model(p)
    add_split(p, "1:-1")
    p.add_argument("--points", default=None, metavar="P[,P...]",
                   help="split points to fit (default: X and Y of --split); the uplink uses X, the downlink Y")
    p.add_argument("--rank", type=int, default=256, help="largest rank kept (default 256; sessions may use less)")
    p.add_argument("--text", default=None, metavar="FILE", help="calibration text, paragraphs separated by blank "
                   "lines (default: the shipped lambdasplit/data/calibration.txt)")
    add_output(p, "where to write the basis (.safetensors)", metavar="FILE", required=True)
    p.set_defaults(run=run)


def _server_settings(args):
    from ..net.origins import normal_origin
    from ..server.app import ServerSettings
    from ..server.auth import TokenBook

    peers = tuple(u.strip().rstrip("/") for u in args.peers.split(",") if u.strip()) if args.peers else ()
    return ServerSettings(max_sessions=args.max_sessions, idle_ttl_s=args.idle_ttl,
                          max_frame_bytes=int(args.max_frame_mb * (1 << 20)), max_positions=args.max_positions,
                          kv_budget_bytes=int(args.kv_budget_mb * (1 << 20)) if args.kv_budget_mb else None,
                          tokens=TokenBook.load(args.tokens) if args.tokens else None, max_batch=args.max_batch,
                          peers=peers, peer_token=os.environ.get("LAMBDASPLIT_PEER_TOKEN") or None,
                          dishonest=args.dishonest, dishonest_after=args.dishonest_after, device=args.device,
                          compile=args.compile,
                          exchange_timeout_s=args.exchange_timeout,
                          header_timeout_s=args.header_timeout, max_connections=args.max_connections,
                          max_connections_per_client=args.max_connections_per_client, docs=args.docs,
                          allow_origins=tuple(normal_origin(o) for o in args.allow_origin))


def _check_compute(args) -> None:
    """Resolve --device and --weights (or the older --dtype) before anything loads; a bad one exits clearly."""
    from ..models.device import DeviceError, resolve_device
    from ..models.formats import WeightFormatError, check_format, choose_format

    try:
        device = resolve_device(args.device)
        fmt = choose_format(args.weights or args.dtype, device)
        check_format(fmt, device)
    except (DeviceError, WeightFormatError) as exc:
        raise SystemExit(f"lambdasplit serve: error: {exc}") from None
    args.explicit_weights = args.weights or args.dtype  # an image model has its own default (fp16 on CUDA)
    args.device, args.weights, args.weights_format = str(device), fmt.name, fmt


def _serve(args) -> None:
    ray = args.ray or args.replicas is not None or args.ray_address or args.ray_cpus_per_replica is not None
    # take the port before anything loads (seconds of imports and weights): a port in use fails at once
    sock = None if ray else _bind(args.host, args.port)
    from ..models.llm import resolve_split
    from ..models.source import is_image_model, resolve_image_model
    from ..server.main import serve
    from ..util.threads import hand_over

    hand_over()  # before the format's probe: the body will compute on a thread of its own (util/threads.py)
    _check_compute(args)
    settings = _server_settings(args)
    if args.dishonest:
        print(f"WARNING: a DISHONEST server (testing only): answers perturbed by {args.dishonest:g} x their RMS",
              file=sys.stderr)
    if ray:
        from ..server.ray_serve import serve_from_args

        return serve_from_args(args, settings)
    if is_image_model(args.model):  # a text-to-image pipeline: the body is its U-Net, and --split does not apply
        if args.cloud_only or args.basis:
            raise SystemExit("--cloud-only and --basis are for language models")
        folder, split = resolve_image_model(args.model), None
    else:
        folder, _, split = resolve_split(args.model, args.split, storage=args.weights_format.storage)
    weights = args.weights if split is not None else args.explicit_weights
    serve(str(folder), split.x if split else 0, split.y if split else 0, args.host, args.port, weights, settings,
          args.insecure, args.log_level, image=split is None,
          basis=args.basis, cloud_only=args.cloud_only, tls_cert=args.tls_cert, tls_key=args.tls_key, sock=sock)


def _bind(host: str, port: int):
    from ..net.ports import bind

    return bind(host, port)


def _token(args) -> None:
    from ..server.auth import add_token, token_hash

    if args.token_command == "new":
        token = add_token(args.file, args.name)
        print(token)
        print(f"added its hash to {args.file}; this is the only time the token is shown", file=sys.stderr)
    else:
        token = sys.stdin.readline().strip()
        if not token:
            raise SystemExit("give the token on stdin")
        print(f"sha256:{token_hash(token)}" + (f"  {args.name}" if args.name else ""))


def _fit_basis(args) -> None:
    from pathlib import Path

    from ..models.calibrate import fit_basis
    from ..models.llm import resolve_split
    from ..wire.lowrank import Basis

    folder, _, split = resolve_split(args.model, args.split)
    try:
        points = [int(p) for p in args.points.split(",")] if args.points else [split.x, split.y]
    except ValueError:
        raise SystemExit(f"--points takes comma-separated layer numbers, got {args.points!r}") from None
    text = Path(args.text).read_text(encoding="utf-8") if args.text else None
    path = fit_basis(folder, points, args.rank, Path(args.out), text=text)
    basis = Basis.load(path)
    kept = ", ".join(f"point {p}: rank 64 keeps {basis.explained(p, min(64, args.rank)):.1%} of the variance"
                     for p in basis.points)
    print(f"wrote {path} (sha256 {basis.sha256[:16]}…); {kept}")
