"""`lambdasplit bench adapters`: the two private-personalization designs, measured in one run.

Over a real body server behind the emulated link (default 100 Mbit/s, 5 ms each way):
- tuning: LoRA on the device's head and tail (split learning), and PrivateLoRA on the body (M on the
  device), on the same shipped private text, with the same epochs; held-out perplexity before and after,
  time, and traffic per training step;
- decoding: greedy, speculation off (one token per body step), the tuned adapters' prompt:
  local-only (the whole model here, no network), plain Λ-Split, Λ-Split with the LoRA adapter, and
  Λ-Split with PrivateLoRA; tokens/s, bytes per token on the link (both ways, headers included), and
  round trips per token;
- PrivateLoRA's exchange against the paper's baseline (sending every adapted projection's full input
  and output activations instead of r values each way).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..client.generate import GenerationStats, SplitClient
from ..data import PRIVATE_NOTES
from ..models.llm import resolve_split
from ..models.lora import LoraSpec
from ..models.privatelora import PrivateLoraSpec
from ..models.source import model_name
from ..net.link import LinkSpec
from ..tune.train import SplitTuner, TuneResult
from ..util.extras import check
from ..util.report import machine_meta, pyplot, write_report
from .harness import LinkedServer, client_compute, compute_meta, serve_compute

PROMPT = "Day 41. Watered the tomatoes at 7am."


@dataclass
class Row:
    path: str
    tokens_per_s: float
    bytes_up_per_token: float
    bytes_down_per_token: float
    round_trips_per_token: float
    heldout_ppl: float | None = None  # after tuning (None: no adapter)
    tune_s: float | None = None
    tune_bytes_per_step: float | None = None  # both ways, frames
    output: str = ""


def _tune(args, url: str, split, private: PrivateLoraSpec | None, lr: float, out: Path) -> tuple[TuneResult, Path]:
    spec = LoraSpec(r=args.rank)
    tuner = SplitTuner(args.model, url, (split.x, split.y), spec, seed=args.seed, private=private)
    try:
        result = tuner.train(args.text, epochs=args.epochs, lr=lr, block=128, holdout=0.1, seed=args.seed)
    finally:
        tuner.close()
    return result, tuner.adapter().save(out)


def _decode(client: SplitClient, server: LinkedServer | None, tokens: int) -> tuple[Row, GenerationStats]:
    stats = GenerationStats()
    ids = client.encode_prompt(PROMPT, chat=False)
    if server is not None:
        with server.observe() as seen:
            out = list(client.generate_ids(ids, max_new_tokens=tokens, stop_at_eos=False, stats=stats))
        up, down = seen.link_up, seen.link_down
    else:
        out = list(client.generate_ids(ids, max_new_tokens=tokens, stop_at_eos=False, stats=stats))
        up = down = 0
    exchanges = client.private_adapter.exchanges if client.private_adapter else 0
    steps = stats.traffic.steps if stats.traffic else 0
    row = Row("", stats.tokens_per_s, up / len(out), down / len(out),
              (steps + exchanges) / len(out) if server is not None else 0.0,
              output=client.tokenizer.decode(out, skip_special_tokens=True))
    return row, stats


def run_adapters_bench(args) -> list[Row]:
    check("matplotlib", "bench")  # the chart comes last: say so before the run
    folder, config, split = resolve_split(args.model, args.split)
    args.text = Path(args.data).read_text(encoding="utf-8") if args.data else PRIVATE_NOTES.read_text()
    link = LinkSpec.parse(args.link)
    out = Path(args.out)
    args.weights = args.weights or "fp32"  # the tuner (tune/train.py, on the CPU) asks the server for an fp32 body
    compute = compute_meta(args)
    print(f"bench adapters: {model_name(folder)}, split {split}, link {link}, {args.epochs} epochs of tuning, "
          f"{args.tokens} tokens of greedy decoding per row, {compute['weights']} on {compute['device']} (tuning: "
          f"head and tail on the CPU)", flush=True)
    server = LinkedServer(str(folder), f"{split.x}:{split.y}", *serve_compute(args), link=link)
    try:
        t0 = time.perf_counter()
        lora, lora_dir = _tune(args, server.url, split, None, args.lr, out / "adapter-lora")
        print(f"  LoRA (device layers): held-out perplexity {lora.heldout_ppl_before:.2f} -> {lora.heldout_ppl_after:.2f}"
              f" in {lora.seconds:.0f} s", flush=True)
        private_spec = PrivateLoraSpec(rank=args.rank, seed=args.seed)
        private, private_dir = _tune(args, server.url, split, private_spec, args.private_lr,
                                     out / "adapter-privatelora")
        print(f"  PrivateLoRA (body, M on the device): held-out perplexity {private.heldout_ppl_before:.2f} -> "
              f"{private.heldout_ppl_after:.2f} in {private.seconds:.0f} s", flush=True)
        common = dict(split=(split.x, split.y), wire="fp32", speculate="off", **client_compute(args))
        clients = {"local-only (whole model here, no network)": (SplitClient(folder, server=None, **common), None),
                   "Λ-Split, no adapter": (SplitClient(folder, server=server.url, **common), server),
                   "Λ-Split + LoRA on head and tail": (SplitClient(folder, server=server.url, adapter=lora_dir,
                                                                   **common), server),
                   "Λ-Split + PrivateLoRA on the body": (SplitClient(folder, server=server.url, adapter=private_dir,
                                                                     **common), server)}
        rows = []
        for name, (client, through) in clients.items():
            row, _ = _decode(client, through, args.tokens)
            row.path = name
            rows.append(row)
            print(f"  {name}: {row.tokens_per_s:.1f} tokens/s", flush=True)
        rows[2].heldout_ppl, rows[2].tune_s = lora.heldout_ppl_after, lora.seconds
        rows[3].heldout_ppl, rows[3].tune_s = private.heldout_ppl_after, private.seconds
        rows[2].tune_bytes_per_step = (lora.bytes_up + lora.bytes_down) / lora.steps
        rows[3].tune_bytes_per_step = (private.bytes_up + private.bytes_down) / private.steps
        seconds = time.perf_counter() - t0
    finally:
        server.stop()

    d, modules = config.hidden_size, (split.y - split.x) * len(private_spec.targets)
    exchanged = 2 * private_spec.rank * modules  # values per token: a down, M a up, per adapted projection
    full = 2 * d * modules  # the paper's baseline: each adapted projection's activations, both ways
    lines = ["| path | tokens/s | link bytes/token up | down | round trips/token | held-out ppl after tuning | "
             "tuning s | tuning bytes/step |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ppl = f"{r.heldout_ppl:.2f}" if r.heldout_ppl is not None else f"{lora.heldout_ppl_before:.2f} (untuned)"
        tune = f"{r.tune_s:.0f}" if r.tune_s is not None else "–"
        tb = f"{r.tune_bytes_per_step / 1e3:.0f} kB" if r.tune_bytes_per_step else "–"
        trips = f"{r.round_trips_per_token:.0f}" if r.round_trips_per_token else "0"
        lines.append(f"| {r.path} | {r.tokens_per_s:.1f} | {r.bytes_up_per_token:.0f} | {r.bytes_down_per_token:.0f} | "
                     f"{trips} | {ppl} | {tune} | {tb} |")
    meta = {**machine_meta(), **compute, "model": model_name(folder), "split": str(split), "link": str(link),
            "epochs": args.epochs, "rank": args.rank, "lr": args.lr, "private_lr": args.private_lr,
            "tokens": args.tokens, "seconds": round(seconds), "privatelora_values_per_token": exchanged,
            "full_activation_values_per_token": full, "lambda_split_values_per_token": 2 * d,
            "outputs": {r.path: r.output for r in rows}}
    caption = (f"{model_name(folder)}, split {split.x}:{split.y}, link {link}, fp32 wire, greedy, speculation off, "
               f"{args.tokens} tokens of \"{PROMPT}\" (no chat template); tuning: {args.epochs} epochs on the shipped "
               f"private notes, LoRA r={args.rank} on every linear of layers [0, {split.x}) and [{split.y}, "
               f"{split.n}) at lr {args.lr}, PrivateLoRA r={args.rank} on q_proj and v_proj of layers [{split.x}, "
               f"{split.y}) at lr {args.private_lr}. PrivateLoRA exchanges {exchanged} values per token (r each way "
               f"per adapted projection) where sending those projections' full activations would take {full}: "
               f"{1 - exchanged / full:.1%} less; Λ-Split's own hidden states are {2 * d} values per token. "
               f"{meta['date']}, {meta['machine']}, torch {meta['torch']}; {seconds:.0f} s.")

    def plot(path: Path) -> None:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.barh([r.path for r in rows][::-1], [r.tokens_per_s for r in rows][::-1], color="#3056d3")
        ax.set_xlabel(f"tokens/s (link {link})")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    write_report(out, "adapters", rows, "\n".join(lines), caption, meta, plot)
    return rows
