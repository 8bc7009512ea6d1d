"""`lambdasplit eavesdrop`: the command line of the eavesdropper's view (torch-free at import)."""

from __future__ import annotations

PRIVATE_PROMPT = "My bank PIN is 4721 and my doctor says I have diabetes. What should I eat?"


def register(sub) -> None:
    from ..cli import _model_arg, _split_arg
    from ..wire.spec import DEFAULT_WIRE

    p = sub.add_parser(
        "eavesdrop", help="show what a passive observer of the link reads: cloud-only text vs Λ-Split frames",
        description="Generate an answer through a recording proxy on the link to a body server (started here "
                    "on a free loopback port unless --server is given), then play the eavesdropper: parse "
                    "the raw bytes the link carried (HTTP, WebSocket, session JSON, LSPL frames, TLS records), "
                    "decode every frame's hidden states, run the strongest measured attack on them (or the "
                    "ones that need only the public weights) and print the reconstruction beside the truth. "
                    "In cloud-only mode the observer reads the prompt and the answer; with --tls it gets "
                    "ciphertext only.")
    p.add_argument("prompt", nargs="?", default=PRIVATE_PROMPT, help=f"the user's private prompt (default: "
                   f"{PRIVATE_PROMPT!r})")
    _model_arg(p)
    _split_arg(p, "1:-1")
    p.add_argument("--mode", choices=("split", "cloud-only", "both"), default="both",
                   help="what crosses the link: Λ-Split frames, cloud-only text, or one after the other "
                        "(default both)")
    p.add_argument("--wire", default=DEFAULT_WIRE, metavar="CODEC[,CODEC]",
                   help="codec of the hidden states on the wire, or UP,DOWN (see `lambdasplit generate --help`; "
                        f"default {DEFAULT_WIRE})")
    p.add_argument("--basis", default=None, metavar="FILE",
                   help="PCA basis file for pca:R codecs (the observer is assumed to hold it too)")
    p.add_argument("--transport", choices=("ws", "http"), default="ws",
                   help="steps over one WebSocket (default) or one HTTP POST each")
    p.add_argument("--max-new-tokens", type=int, default=40, help="length of the answer, greedy (default 40)")
    p.add_argument("--no-chat", action="store_true", help="send the prompt without the chat template")
    p.add_argument("--link", default=None, metavar="RATE,DELAY",
                   help="also emulate a link, e.g. 1000mbit,5ms (the recording proxy is always there)")
    p.add_argument("--tls", action="store_true",
                   help="serve over TLS with a throwaway CA and certificate (split mode): the observer then "
                        "gets ciphertext")
    p.add_argument("--server", default=None, metavar="URL",
                   help="a running body server (http://HOST:PORT) instead of starting one")
    p.add_argument("--cloud-server", default=None, metavar="URL",
                   help="a running `serve --cloud-only` server instead of starting one")
    p.add_argument("--token-file", default=None, metavar="FILE",
                   help="bearer token for --server, read from this file (or set LAMBDASPLIT_TOKEN)")
    p.add_argument("--dump", default=None, metavar="DIR",
                   help="also write the raw bytes of every connection to DIR/<mode>/conn<i>.up|.down")
    p.set_defaults(run=_run)


def _run(args) -> None:
    from .eavesdrop import run_eavesdrop

    run_eavesdrop(args)
