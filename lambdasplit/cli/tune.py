"""`lambdasplit tune`: train LoRA adapters on this device's layers through a body server."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .options import add_connection, add_model, add_output, client_token, wire_arg


def register(sub) -> None:
    p = sub.add_parser("tune", help="fine-tune LoRA adapters on the device's layers through a body server",
                       description="Split fine-tuning: LoRA adapters on the head's layers [0, X) and the tail's "
                                   "[Y, N), trained on your text. The text, the tokens, the loss and the adapters "
                                   "stay on this device; the body server gets the head's hidden states and the "
                                   "gradient at its output, answers with the gradient at its input, and never "
                                   "holds or updates the adapters. Part of the text is held out to measure the "
                                   "perplexity before and after. Writes the adapter in PEFT's format (load it with "
                                   "generate/web --adapter DIR, or with peft onto the unsplit model), "
                                   "training.json and loss.png.")
    p.add_argument("--server", required=True, metavar="URL", help="the body server (it must serve the split)")
    p.add_argument("--data", required=True, metavar="FILE", help="your training text (UTF-8 plain text)")
    add_output(p, "where to write the adapter", required=True)
    add_model(p)
    p.add_argument("--split", default=None, metavar="X:Y",
                   help="split points; LoRA adapters go on layers [0, X) and [Y, N), PrivateLoRA ones on the body's "
                        "[X, Y) (default: the server's range)")
    p.add_argument("--mode", choices=("lora", "privatelora"), default="lora",
                   help="lora (default): LoRA on the device's own layers, trained by split learning. privatelora: "
                        "PrivateLoRA on the body's attention projections, W x + B M A x, with A and B fixed random "
                        "matrices on the server and only M (rank x rank per projection) on the device; every body "
                        "step then asks the device for M a at each adapted projection (a round trip each)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; the update is scaled by alpha / r "
                   "(default 16)")
    p.add_argument("--targets", default=None, metavar="LIST",
                   help="linear layers to adapt in each layer (lora default: all of them, q_proj,k_proj,v_proj,o_proj,"
                        "gate_proj,up_proj,down_proj; "
                        "privatelora default: q_proj,v_proj, of q_proj,k_proj,v_proj,o_proj)")
    p.add_argument("--epochs", type=int, default=2, help="passes over the training blocks (default 2)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 3e-3 for lora, 1e-2 for "
                   "privatelora, whose M starts at zero between two fixed random matrices)")
    p.add_argument("--block", type=int, default=128, help="tokens per training block (default 128)")
    p.add_argument("--holdout", type=float, default=0.1, help="share of blocks held out for the perplexity "
                   "(default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed for the initial adapters and the block order")
    p.add_argument("--wire", type=wire_arg, default="fp32", metavar="CODEC",
                   help="codec of hidden states and gradients on the wire (default fp32; quantized gradients "
                        "train, but less exactly)")
    add_connection(p, retries=False)
    p.set_defaults(run=run)


def run(args) -> None:
    from tqdm import tqdm

    from ..client.transport import BodyConnection
    from ..models.llm import parse_split
    from ..models.lora import DEFAULT_TARGETS, LoraSpec
    from ..models.privatelora import PrivateLoraSpec
    from ..tune.train import SplitTuner
    from ..util.extras import check

    check("matplotlib", "tune")  # the loss curve comes at the end: say so before training, not after
    checks = [(args.rank >= 1, f"--rank must be at least 1, got {args.rank}"),
              (args.epochs >= 1, f"--epochs must be at least 1, got {args.epochs}"),
              (args.block >= 16, f"--block must be at least 16 tokens, got {args.block}"),
              (0 <= args.holdout < 1, f"--holdout must be in [0, 1), got {args.holdout}"),
              (args.lr is None or args.lr > 0, f"--lr must be positive, got {args.lr}")]
    lr = args.lr or (1e-2 if args.mode == "privatelora" else 3e-3)
    for ok, message in checks:
        if not ok:
            raise SystemExit(message)
    try:
        text = Path(args.data).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SystemExit(f"cannot read the training text {args.data}: {exc}") from None
    default = "q_proj,v_proj" if args.mode == "privatelora" else ",".join(DEFAULT_TARGETS)
    targets = tuple(t.strip() for t in (args.targets or default).split(",") if t.strip())
    token = client_token(args)
    if args.split:
        split = parse_split(args.split)
    else:
        with BodyConnection(args.server, transport="http", token=token, ca_bundle=args.ca_bundle) as conn:
            info = conn.info()
        split = (info.x, info.y)
    private = PrivateLoraSpec(args.rank, targets, args.seed) if args.mode == "privatelora" else None
    tuner = SplitTuner(args.model, args.server, split, LoraSpec(args.rank, args.alpha, targets), wire=args.wire,
                       seed=args.seed, token=token, ca_bundle=args.ca_bundle, private=private, rows=args.block)
    s = tuner.model.split
    if private is None:
        print(f"tune: {len(tuner.modules)} LoRA modules (r={args.rank}) on layers "
              f"{sorted({layer for layer, _ in tuner.modules})} of {s.n}; the body server runs layers [{s.x}, {s.y}) "
              "and sees hidden states and gradients only", file=sys.stderr, flush=True)
    else:
        print(f"tune: PrivateLoRA, {len(tuner.private.m)} M matrices ({args.rank} x {args.rank}) for "
              f"{', '.join(targets)} of the body's layers [{s.x}, {s.y}); the server holds A and B, this device M",
              file=sys.stderr, flush=True)
    try:
        result = tuner.train(text, epochs=args.epochs, lr=lr, block=args.block, holdout=args.holdout,
                             seed=args.seed,
                             progress=lambda steps, n: tqdm(steps, total=n, desc="tune", unit="step", file=sys.stderr))
    finally:
        tuner.close()
    out = tuner.adapter().save(args.out)
    (out / "training.json").write_text(json.dumps(result.__dict__, indent=1))
    _plot(result, out / "loss.png")
    print(f"held-out perplexity: {result.heldout_ppl_before:.2f} before, {result.heldout_ppl_after:.2f} after "
          f"({result.heldout_blocks} held-out blocks); {result.steps} steps in {result.seconds:.0f} s "
          f"(body server {result.cloud_s:.0f} s); wire: {result.bytes_up / 1e6:.1f} MB up, "
          f"{result.bytes_down / 1e6:.1f} MB down\nadapter written to {out} "
          f"({'PEFT format' if private is None else 'PrivateLoRA: the M matrices'}), with training.json and "
          f"loss.png; use it with: lambdasplit generate --adapter {out} ...")


def _plot(result, path: Path) -> None:
    from ..util.report import pyplot

    plt = pyplot("tune")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(result.losses) + 1), result.losses, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"split LoRA: held-out perplexity {result.heldout_ppl_before:.1f} -> {result.heldout_ppl_after:.1f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
