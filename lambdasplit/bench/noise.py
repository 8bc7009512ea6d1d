"""`lambdasplit bench noise`: what the noise defence buys in privacy, and what it costs in quality.

For each noise scale S (Gaussian noise of S x each state's RMS, added by the sender: the `noise:S`
wire codec part), at one split (X, Y), with the noise on the uplink only or on both directions:

  recovery     the best attack's top-1 token recovery on noisy states (the attacker trains its probes on
               noisy states too, so it knows the defence), at X for the uplink, and at Y too for both
  agree        teacher-forced greedy agreement with the noiseless fp32 split on several prompts
  free run     greedy tokens on the paper's prompt with the noise in the loop, equal to the noiseless run's
  ppl          perplexity of the shipped held-out text

Noise on the downlink guards only against eavesdroppers: the cloud computed that state itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..data import PAPER_PROMPT
from ..models.llm import load_split, resolve_split
from ..models.source import model_name
from ..privacy.assess import ProbeSettings, prepare_states, run_assessment
from ..util.extras import check
from ..util.report import machine_meta, pyplot, write_report
from ..wire.codecs import make_codec
from .codecs import OTHER_PROMPTS, SEED, CodecBench, _agreement, _perplexity
from .harness import reference_compute


@dataclass
class Row:
    noise: float
    direction: str  # "up" (uplink only) or "both"
    recovery_with_weights: float  # best top-1 over the attacks, at the noisy points
    recovery_without_weights: float
    best_attack: str
    agree_forced: float
    agree_free: float
    first_divergence: int | None
    ppl: float
    ppl_clean: float


def run_noise_bench(args) -> list[Row]:
    check("matplotlib", "bench")  # the chart comes last: say so before the run
    from transformers import AutoTokenizer

    folder, _, split = resolve_split(args.model, args.split)
    try:
        scales = sorted({float(s) for s in args.scales.split(",")})
    except ValueError:
        raise ValueError(f"--scales takes comma-separated numbers, e.g. 0,0.1,0.5, got {args.scales!r}") from None
    if any(s < 0 or s > 10 for s in scales):
        raise ValueError("noise scales must be between 0 and 10")
    started = time.time()
    print(f"bench noise: {model_name(folder)}, split {split}, scales {scales}", flush=True)
    compute = reference_compute(args, "noise", "agreement and perplexity are measured against the noiseless fp32 "
                                "split, and the attacks read fp32 states")
    states = prepare_states(folder, sorted({split.x, split.y}), answer_tokens=args.answer_tokens,
                            prompts=args.prompts)
    settings = ProbeSettings(mlp_hidden=args.mlp_hidden, mlp_epochs=args.mlp_epochs)
    recovery = {}
    for s in tqdm(scales, desc="attacks on noisy states", unit="scale"):
        recovery[s] = run_assessment(folder, sorted({split.x, split.y}), noise=s, settings=settings, progress=False,
                                     states=states, answer_tokens=args.answer_tokens, prompts=args.prompts,
                                     log=lambda m: None)

    model = load_split(folder, split.x, split.y, parts=("head", "body", "tail"), **compute)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    bench = CodecBench(model, None, args.tokens, tokenizer)
    texts = bench.references([PAPER_PROMPT, *OTHER_PROMPTS], progress=False)
    heldout = bench.heldout(args.ppl_tokens)
    all_states = {t.name: bench.states(t.ids + t.continuation) for t in [*texts, heldout]}
    clean = make_codec("fp32")
    ppl_clean = _perplexity(bench.forced(heldout, all_states[heldout.name], clean, None)[0],
                            heldout.ids + heldout.continuation)
    rows = []
    for s in tqdm(scales, desc="quality with noise", unit="scale"):
        codec = make_codec(f"noise:{s:g}+fp32" if s else "fp32", seed=SEED)
        torch.manual_seed(SEED)
        for direction in ("up", "both"):
            up, down = codec, (codec if direction == "both" else None)
            agree = [_agreement(bench.forced(t, all_states[t.name], up, down)[0], t) for t in texts]
            ppl = _perplexity(bench.forced(heldout, all_states[heldout.name], up, down)[0],
                              heldout.ids + heldout.continuation)
            got = bench.free_run(texts[0].ids, (up, down or clean))
            same = [a == b for a, b in zip(got, texts[0].continuation)]
            a = recovery[s]
            points = [split.x] if direction == "up" else [split.x, split.y]
            best = max((a.best(p, "with-weights") for p in points), key=lambda b: b.top1)
            without = max(a.recovery(p, "without-weights") for p in points)
            rows.append(Row(s, direction, best.top1, without, f"{best.attack} ({best.target}, layer {best.layer})",
                            sum(agree) / len(agree), sum(same) / len(same),
                            same.index(False) if False in same else None, ppl, ppl_clean))
    meta = {"model": model_name(folder), "split": str(split), "tokens": args.tokens, "prompts": len(texts),
            "heldout_tokens": len(heldout.ids) + len(heldout.continuation), **machine_meta(), **compute,
            "seconds": round(time.time() - started)}
    write_report(Path(args.out), "noise", rows, markdown(rows), caption(meta), meta,
                 plot=lambda path: _plot(rows, meta, path))
    return rows


def markdown(rows: list[Row]) -> str:
    lines = ["| noise (x RMS) | on | recovery, with the weights | best attack | recovery, without | "
             "agree, teacher-forced | agree, free run | ppl |",
             "|---:|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        first = "" if r.first_divergence is None else f" (first miss at {r.first_divergence})"
        lines.append(f"| {r.noise:g} | {'uplink' if r.direction == 'up' else 'both'} | {r.recovery_with_weights:.1%} | "
                     f"{r.best_attack} | {r.recovery_without_weights:.1%} | {r.agree_forced:.1%} | "
                     f"{r.agree_free:.1%}{first} | {r.ppl:.2f} |")
    return "\n".join(lines)


def caption(meta: dict) -> str:
    return (f"The noise defence at split {meta['split']} of {meta['model']}: Gaussian noise of S x each state's RMS "
            f"added by the sender ('uplink': only the device's state at X is noisy; 'both': the server's reply at "
            f"Y too, which guards only against eavesdroppers). Recovery: the best attack's top-1 on noisy held-out "
            f"states, the attacker's probes trained on noisy states (a lower bound). Agreement: greedy tokens "
            f"against the noiseless split, teacher-forced on {meta['prompts']} prompts and free-running "
            f"{meta['tokens']} tokens on the paper's prompt. Perplexity on {meta['heldout_tokens']} held-out tokens. "
            f"Measured {meta['date']} on {meta['cores']} cores, torch {meta['torch']}, in {meta['seconds']} s.")


def _plot(rows: list[Row], meta: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for direction, style in (("up", "-o"), ("both", "--s")):
        rs = [r for r in rows if r.direction == direction]
        xs = [r.noise for r in rs]
        label = "uplink noise" if direction == "up" else "both directions"
        axes[0].plot(xs, [100 * r.recovery_with_weights for r in rs], style, label=f"recovery, {label}")
        axes[0].plot(xs, [100 * r.agree_forced for r in rs], style, alpha=0.6, label=f"agreement, {label}")
        axes[1].plot(xs, [r.ppl for r in rs], style, label=label)
    axes[0].set_xscale("symlog", linthresh=0.01)
    axes[1].set_xscale("symlog", linthresh=0.01)
    axes[0].set_ylabel("%")
    axes[0].set_title("tokens recovered (best attack) vs greedy agreement")
    axes[1].set_title("held-out perplexity")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("noise scale S (x RMS of the state)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"The noise defence at split {meta['split']} of {meta['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
