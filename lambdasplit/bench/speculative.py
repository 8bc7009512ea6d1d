"""`lambdasplit bench speculative`: tokens/s with and without speculation, through an emulated link.

For each round-trip time, a real server process runs behind the link proxy (half the RTT added
each way). The device's head and tail run here. Each prompt is generated greedily with every mode:
plain (one token per round trip), prompt-lookup drafts ("ngram", the default "auto"), and the
early-exit self-draft ("self"), and the bridge draft ("bridge"). Rows report tokens/s and the speed-up over plain, the acceptance
rate, tokens per round trip, bytes per token on the link (both ways, counted by the proxy, headers
included), and whether the tokens are identical to plain greedy decoding.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..client.generate import GenerationStats, SplitClient
from ..data import PAPER_PROMPT
from ..models.source import cache_root, model_name, resolve_model
from ..net.link import LinkSpec
from ..util.extras import check
from ..util.report import machine_meta, pyplot, write_report
from .harness import LinkedServer, client_compute, compute_meta, serve_compute

PROMPTS = {
    "paper": PAPER_PROMPT,
    "code": "Write a Python function that returns the squares of the numbers 1 to 10, with a docstring and an "
            "example.",
    "list": "List the days of the week, one per line, each with its number.",
    "story": "Tell me a short story about a robot who learns to paint.",
}
MODES = ("off", "ngram", "self", "bridge")


@dataclass
class Row:
    rtt_ms: float
    prompt: str
    mode: str
    tokens: int
    tokens_per_s: float
    speedup: float  # over plain decoding at the same RTT, same prompt
    acceptance: float  # accepted / drafted
    tokens_per_round_trip: float
    round_trips: int
    up_bytes_per_token: float  # on the link, HTTP/WebSocket headers included
    down_bytes_per_token: float
    extra_traffic: float  # (bytes both ways) / plain's - 1
    identical: bool  # the same tokens as plain greedy decoding


def run_speculative_bench(args) -> list[Row]:
    check("matplotlib", "bench")  # the chart comes last: say so before the run
    folder = resolve_model(args.model)
    started = time.time()
    if args.threads:  # device and cloud share this machine: each gets its own cores, as two machines would
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    rtts = [float(v) for v in args.rtts.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    prompts = {name: PROMPTS[name] for name in (p.strip() for p in args.prompts.split(","))}
    if bad := [m for m in modes if m not in MODES]:
        raise ValueError(f"unknown mode(s) {bad}; known: {', '.join(MODES)}")
    rows: list[Row] = []
    agreement, compute = None, compute_meta(args)
    print(f"bench speculative: {compute['weights']} on {compute['device']}", flush=True)
    if "bridge" in modes:
        x, y = (int(v) for v in args.split.split(":"))
        agreement = first_draft_agreement(folder, x, y)
        print(f"first draft = the full model's next token (CPU, fp32), {agreement['positions']} held-out corpus "
              f"positions: bridge {agreement['bridge']:.1%}, early exit {agreement['early exit']:.1%}", flush=True)
    bar = tqdm(total=len(rtts) * len(prompts) * len(modes), desc="speculative bench", unit="run")
    for rtt in rtts:
        link = LinkSpec.parse(f"{args.rate},{rtt / 2:g}ms")
        with LinkedServer(str(folder), args.split, *serve_compute(args), link=link) as server:
            client = SplitClient(folder, server=server.url, wire=args.wire, max_draft=args.max_draft,
                                 **client_compute(args))
            client.generate(PAPER_PROMPT, max_new_tokens=4, stop_at_eos=False, speculate="off")  # warm-up
            for name, prompt in prompts.items():
                ids = client.encode_prompt(prompt)
                plain = None
                for mode in modes:
                    bar.set_postfix_str(f"{rtt:g} ms, {name}, {mode}")
                    stats, tokens, (up, down) = _run(client, server, ids, args.tokens, mode)
                    row = _row(rtt, name, mode, stats, tokens, up, down, plain)
                    if mode == "off":
                        plain = row, tokens
                    rows.append(row)
                    bar.update()
    bar.close()
    for row in rows:  # speed-ups and extra traffic need plain's row, which may come later in --modes
        base = next((r for r in rows if r.rtt_ms == row.rtt_ms and r.prompt == row.prompt and r.mode == "off"), None)
        if base is not None:
            row.speedup = round(row.tokens_per_s / base.tokens_per_s, 2)
            row.extra_traffic = round((row.up_bytes_per_token + row.down_bytes_per_token)
                                      / (base.up_bytes_per_token + base.down_bytes_per_token) - 1, 3)
    meta = {"model": model_name(folder), "split": args.split, "wire": args.wire, "rate": args.rate,
            "tokens": args.tokens, "max_draft": args.max_draft, "threads": torch.get_num_threads(),
            "first_draft_agreement": agreement,
            **machine_meta(), **compute, "cores": os.cpu_count(), "seconds": round(time.time() - started)}
    write_report(Path(args.out), "speculative", rows, markdown(rows), caption(meta), meta,
                 plot=lambda path: _plot(rows, path))
    return rows


@torch.inference_mode()
def first_draft_agreement(folder: Path, x: int, y: int, sequences: int = 12) -> dict:
    """How often the bridge's and the early exit's first draft is the full model's next token, on the
    held-out part of the privacy corpus (the context before each position is exact, as in generation)."""
    from ..client.bridge import load_or_fit
    from ..models.corpus import load_corpus
    from ..models.llm import load_split

    model = load_split(folder, x, y, parts=("head", "body", "tail"))
    bridge = load_or_fit(folder, x, y, model.body_fingerprint())
    corpus = load_corpus(folder, cache_root() / "privacy" / model_name(folder).replace("/", "_"), progress=False)
    hits, positions = {"bridge": 0, "early exit": 0}, 0
    for seq in [s for s in corpus if s.part == "test"][:sequences]:
        head = model.head(torch.tensor([seq.ids]), None, 0)[0]
        body = model.body(head.unsqueeze(0), None, 0)[0]
        truth = model.tail(body.unsqueeze(0), None, 0, last_only=False)[0].argmax(-1)
        for pos in range(1, len(seq.ids) - 1):
            for name, guess in (("bridge", bridge.predict(head[pos:pos + 1], body[pos - 1:pos])),
                                ("early exit", head[pos:pos + 1])):
                cache = model.tail.layers.new_cache()
                model.tail.layers(body[:pos].unsqueeze(0), cache, 0)
                hits[name] += int(model.tail(guess.unsqueeze(0), cache, pos)[0, -1].argmax()) == int(truth[pos])
            positions += 1
    return {name: round(n / positions, 4) for name, n in hits.items()} | {"positions": positions}


def _run(client: SplitClient, server: LinkedServer, ids: list[int], n: int, mode: str):
    stats = GenerationStats()
    with server.observe() as seen:
        tokens = list(client.generate_ids(ids, max_new_tokens=n, stop_at_eos=False, stats=stats, speculate=mode))
    return stats, tokens, (seen.link_up, seen.link_down)


def _row(rtt, name, mode, stats: GenerationStats, tokens, up, down, plain) -> Row:
    spec = stats.speculation
    identical = plain is None or tokens == plain[1]
    return Row(rtt, name, mode, len(tokens), round(stats.tokens_per_s, 2), 1.0, round(spec.acceptance, 3),
               round(stats.tokens_per_round_trip, 2), stats.decode_rounds, round(up / len(tokens), 1),
               round(down / len(tokens), 1), 0.0, identical)


def markdown(rows: list[Row]) -> str:
    lines = ["| RTT | prompt | drafts | tokens/s | speed-up | acceptance | tokens / round trip | "
             "bytes/token up | bytes/token down | extra traffic | same tokens |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|:-:|"]
    for r in rows:
        label = {"off": "none (plain)", "ngram": "prompt lookup (auto)", "self": "early exit",
                 "bridge": "bridge"}.get(r.mode, r.mode)
        lines.append(f"| {r.rtt_ms:g} ms | {r.prompt} | {label} | {r.tokens_per_s:.1f} | {r.speedup:.2f}x | "
                     f"{'-' if r.mode == 'off' else f'{r.acceptance:.0%}'} | {r.tokens_per_round_trip:.2f} | "
                     f"{r.up_bytes_per_token:,.0f} | {r.down_bytes_per_token:,.0f} | "
                     f"{'-' if r.mode == 'off' else f'{r.extra_traffic:+.0%}'} | {'yes' if r.identical else 'NO'} |")
    return "\n".join(lines)


def caption(meta: dict) -> str:
    return (f"Speculative decoding across the split, {meta['model']} at split {meta['split']}, {meta['wire']} wire, "
            f"link {meta['rate']} each way with the RTT shown (a loopback proxy adds half of it each way). Greedy, "
            f"{meta['tokens']} tokens per prompt, drafts of up to {meta['max_draft']} tokens (the length chosen each "
            f"round from the measured acceptance and round time). Device and server process {meta['threads']} "
            f"thread(s) each, on one machine. Bytes counted by the proxy, headers included. "
            + (f"The first draft was the full model's next token at {a['bridge']:.1%} (bridge) and "
               f"{a['early exit']:.1%} (early exit) of {a['positions']} held-out corpus positions. "
               if (a := meta.get("first_draft_agreement")) else "")
            + f"Measured "
            f"{meta['date']} on {meta['cores']} cores, torch {meta['torch']}, in {meta['seconds']} s.")


def _plot(rows: list[Row], path: Path) -> None:
    plt = pyplot()
    prompts = list(dict.fromkeys(r.prompt for r in rows))
    fig, axes = plt.subplots(1, len(prompts), figsize=(3.2 * len(prompts), 3.4), sharey=True, squeeze=False)
    for ax, prompt in zip(axes[0], prompts):
        for mode in dict.fromkeys(r.mode for r in rows):
            pts = [(r.rtt_ms, r.tokens_per_s) for r in rows if r.prompt == prompt and r.mode == mode]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mode)
        ax.set_title(prompt)
        ax.set_xlabel("round trip (ms)")
    axes[0][0].set_ylabel("tokens/s")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
