"""`lambdasplit assess` and `eavesdrop`: what an attacker recovers at each split point, and off the link."""

from __future__ import annotations

import sys

from ..data import PRIVATE_PROMPT
from ..wire.spec import DEFAULT_WIRE
from .options import add_model, add_output, add_split, client_token, wire_arg


def register(sub) -> None:
    _assess_parser(sub)
    _eavesdrop_parser(sub)


def run(args) -> None:
    {"assess": _assess, "eavesdrop": _eavesdrop}[args.command](args)


def _assess_parser(sub) -> None:
    p = sub.add_parser(
        "assess", help="measure how many tokens an attacker recovers from the hidden states at every split point",
        description="The model assessment: run four attacks (nearest-embedding match, logit lens, a linear and "
                    "an MLP probe trained on public text) on the hidden state entering every layer, score them on "
                    "held-out text for the input token (what the uplink carries) and the next token (what the "
                    "downlink reveals), and say which split points keep the recovery under a threshold, for an "
                    "attacker with the public weights and one without. Writes assess.md, .csv, .json and .png, "
                    "and keeps the assessment and the trained probes in the cache, where `plan`, `eavesdrop` and "
                    "`web` find them. Every figure is a lower bound. About 12 minutes for the embedded model on "
                    "two cores (the first run also has the model answer the probe prompts, once).")
    add_model(p)
    p.add_argument("--layers", default=None, metavar="L[,L-M...]",
                   help="which split points to assess, e.g. 0-4,15,28-30 (default: all, 0..N)")
    p.add_argument("--attacks", default="nearest-embedding,logit-lens,linear-probe,mlp-probe", metavar="LIST",
                   help="comma-separated attacks (default: all four)")
    p.add_argument("--threshold", type=float, default=0.1, metavar="RATE",
                   help="the most recovery a split point may allow, as a fraction (default 0.1)")
    p.add_argument("--metric", choices=("top1", "top5", "exact"), default="top1",
                   help="top1: the attack's best guess is right; top5: among its five; exact: whole sequences "
                        "(default top1)")
    p.add_argument("--noise", type=float, default=0.0, metavar="S",
                   help="assess states carrying the noise defence: Gaussian noise of S x each state's RMS (the "
                        "attacker trains on noisy states too); kept apart from the plain assessment")
    p.add_argument("--prompts", type=int, default=None, metavar="N",
                   help="use only the first N probe prompts and prose paragraphs (quick, weaker runs; default all)")
    p.add_argument("--answer-tokens", type=int, default=80, metavar="N",
                   help="tokens of the model's answer to each probe prompt (default 80)")
    p.add_argument("--retrain", action="store_true", help="train the probes again instead of loading cached ones")
    p.add_argument("--mlp-hidden", type=int, default=512, help="width of the MLP probe's hidden layer (default 512)")
    p.add_argument("--mlp-epochs", type=int, default=6, help="epochs of MLP probe training (default 6)")
    add_output(p)
    p.set_defaults(run=run)


def _eavesdrop_parser(sub) -> None:
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
    add_model(p)
    add_split(p, "1:-1")
    p.add_argument("--mode", choices=("split", "cloud-only", "both"), default="both",
                   help="what crosses the link: Λ-Split frames, cloud-only text, or one after the other "
                        "(default both)")
    p.add_argument("--wire", type=wire_arg, default=DEFAULT_WIRE, metavar="CODEC[,CODEC]",
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
    p.set_defaults(run=run)


def _eavesdrop(args) -> None:
    from ..privacy.eavesdrop import run_eavesdrop

    run_eavesdrop(args, token=client_token(args))


def parse_layers(text: str | None, n: int) -> list[int] | None:
    """'0-4,8,28-30' -> [0, 1, 2, 3, 4, 8, 28, 29, 30]; None or 'all' -> None (every layer 0..n)."""
    if text in (None, "", "all"):
        return None
    layers = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            lo_i = int(lo)
            hi_i = int(hi) if hi else lo_i
            if hi_i < lo_i:
                raise ValueError
            layers.update(range(lo_i, hi_i + 1))
    except ValueError:
        raise ValueError(f"--layers takes numbers and ranges such as 0-4,8,28-30, got {text!r}") from None
    if bad := sorted(L for L in layers if not 0 <= L <= n):
        raise ValueError(f"--layers {bad} are outside 0..{n} (a {n}-layer model has split points 0..{n})")
    return sorted(layers)



def _assess(args) -> None:
    from pathlib import Path

    from ..models.llm import load_config
    from ..models.source import resolve_model
    from ..privacy.assess import ProbeSettings, run_assessment
    from ..privacy.report import caption, layer_rows, markdown, plot, summary
    from ..privacy.results import ATTACKS, Assessment, default_assessment_path
    from ..util.report import write_report

    if not 0 <= args.threshold <= 1:
        raise ValueError(f"--threshold is a fraction between 0 and 1, got {args.threshold}")
    attacks = tuple(a.strip() for a in args.attacks.split(",") if a.strip())
    if unknown := [a for a in attacks if a not in ATTACKS]:
        raise ValueError(f"unknown attack(s) {', '.join(unknown)}; choose from {', '.join(ATTACKS)}")
    folder = resolve_model(args.model)
    layers = parse_layers(args.layers, load_config(folder).num_hidden_layers)
    log = lambda msg: print(f"[lambdasplit] {msg}", file=sys.stderr)  # noqa: E731
    settings = ProbeSettings(mlp_hidden=args.mlp_hidden, mlp_epochs=args.mlp_epochs)
    if args.prompts is not None and args.prompts < 4:
        raise ValueError(f"--prompts must be at least 4 (every fourth prompt is held out), got {args.prompts}")
    if not 1 <= args.answer_tokens <= 1024:
        raise ValueError(f"--answer-tokens must be between 1 and 1024, got {args.answer_tokens}")
    result = run_assessment(folder, layers, attacks=attacks, noise=args.noise, settings=settings,
                            answer_tokens=args.answer_tokens, prompts=args.prompts, retrain=args.retrain, log=log)
    # the cached assessment gathers every layer measured so far (a run over some layers updates those)
    path = default_assessment_path(folder)
    if args.noise:
        path = path.with_name(f"assessment-noise{args.noise:g}.json")
    merged = result
    if path.is_file():
        try:
            merged = Assessment.load(path).merged(result)
        except ValueError as exc:
            log(f"replacing the cached assessment {path}: {exc}")
    merged.save(path)
    write_report(Path(args.out), "assess", layer_rows(result, args.metric), markdown(result, args.metric),
                 caption(result, args.metric), {**result.meta, "noise": result.noise},
                 plot=lambda png: plot(result, png, args.threshold, args.metric))
    result.save(Path(args.out) / "assessment.json")
    print()
    print(summary(merged, args.threshold, args.metric))
    print(f"\nthe assessment is kept in {path} (lambdasplit plan and eavesdrop read it)")
