"""`lambdasplit bench plan`: the planner's predictions against measured decode speed.

The planner predicts tokens/s for every (X, Y) from profiles and the link. This bench makes the same
plan, then measures the recommended split and others through the table1 machinery: a real server
process behind the emulated link, the device's head and tail in this process, emulated as K times
slower (`--device-slowdown`). It reports predicted and measured tokens/s side by side, and the
ratio; the target is to be within 25%.

Both sides are without speculative decoding: the client runs with `speculate="off"` and the plan
assumes no drafts (`PlanRequest(speculate="off")`), so each step is one round trip for one token
and the figures compare the cost model itself, not an assumed acceptance rate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..client.generate import GenerationStats, SplitClient
from ..data import PAPER_PROMPT
from ..models.llm import Split
from ..models.source import model_name, resolve_model
from ..net.link import LinkSpec
from ..plan.planner import PrivacyTarget, make_plan
from ..plan.scenario import PlanRequest, build_scenario, find_assessment
from ..util.extras import check
from ..util.report import machine_meta, pyplot, write_report
from ..wire.spec import parse_wire
from .harness import LinkedServer, client_compute, reference_compute, serve_compute

TOLERANCE = 0.25


@dataclass
class Row:
    split: str
    role: str  # "recommended" or "also measured"
    predicted_tokens_per_s: float
    measured_tokens_per_s: float
    ratio: float  # measured / predicted
    within: bool
    predicted_device_ms: float
    measured_device_ms: float
    predicted_cloud_ms: float
    measured_cloud_ms: float
    predicted_network_ms: float
    measured_network_ms: float


def run_plan_check(args) -> list[Row]:
    check("matplotlib", "bench")  # the chart comes last: say so before the run
    import os

    import torch

    folder = resolve_model(args.model)
    started = time.time()
    compute = reference_compute(args, "plan", "the planner predicts from this machine's CPU fp32 profile")
    if args.threads:  # device and cloud share this machine: give each its own cores, as two machines would have
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the server processes started below
    target = PrivacyTarget(args.max_recovery)
    request = PlanRequest(folder, device_slowdown=args.device_slowdown, link=args.link, wire=args.wire,
                          speculate="off")  # as the client below
    scenario, _ = build_scenario(request)
    assessment, line = find_assessment(folder, None)
    print(line, flush=True)
    plan = make_plan(scenario, assessment, target)
    n = scenario.num_layers
    chosen = []
    if plan.recommended is not None:
        chosen.append((plan.recommended.prediction.x, plan.recommended.prediction.y, "recommended"))
    for text in args.splits.split(","):
        s = Split.parse(text.strip(), n)
        if (s.x, s.y) not in [(x, y) for x, y, _ in chosen]:
            chosen.append((s.x, s.y, "also measured"))
    predictions = {(c.prediction.x, c.prediction.y): c.prediction for c in plan.splits}
    prompt_ids = None
    rows = []
    for x, y, role in tqdm(chosen, desc="measured splits", unit="split"):
        p = predictions[(x, y)]
        with LinkedServer(str(folder), f"{x}:{y}", *serve_compute(args), link=LinkSpec.parse(args.link)) as server:
            client = SplitClient(folder, server=server.url, split=(x, y), wire=parse_wire(args.wire),
                                 device_slowdown=args.device_slowdown, speculate="off", **client_compute(args))
            prompt_ids = prompt_ids or client.encode_prompt(PAPER_PROMPT)
            client.generate(PAPER_PROMPT, max_new_tokens=4, stop_at_eos=False)  # warm-up
            best = None
            for _ in range(args.repeats):
                stats = GenerationStats()
                for _token in client.generate_ids(prompt_ids, max_new_tokens=args.tokens, stop_at_eos=False,
                                                  stats=stats):
                    pass
                if best is None or stats.tokens_per_s > best.tokens_per_s:
                    best = stats
        steps = max(1, best.new_tokens - 1)  # decode steps after the prompt's
        measured = best.tokens_per_s
        ratio = measured / p.tokens_per_s
        rows.append(Row(f"{x}:{y}", role, round(p.tokens_per_s, 2), round(measured, 2), round(ratio, 3),
                        abs(ratio - 1) <= TOLERANCE, round(p.device_s * 1e3, 1), _per_step(best.device_s, steps),
                        round(p.cloud_s * 1e3, 1), _per_step(best.cloud_s, steps),
                        round(p.network_s * 1e3, 1), _per_step(best.network_s, steps)))
    meta = {"model": model_name(folder), "link": args.link, "threads": torch.get_num_threads(), "device_slowdown": args.device_slowdown,
            "wire": args.wire, "tokens": args.tokens, "repeats": args.repeats,
            "max_recovery": args.max_recovery, **machine_meta(), **compute, "cores": os.cpu_count(),
            "seconds": round(time.time() - started)}
    write_report(Path(args.out), "plan-check", rows, markdown(rows), caption(meta), meta,
                 plot=lambda path: _plot(rows, meta, path))
    return rows


def _per_step(total_s: float, steps: int) -> float:
    """Milliseconds per step of a whole generation's time (the prompt's step counted as one more)."""
    return round(total_s / (steps + 1) * 1e3, 1)


def markdown(rows: list[Row]) -> str:
    lines = ["| split | | predicted tokens/s | measured tokens/s | measured / predicted | within 25% | "
             "device ms (pred. / meas.) | cloud ms | network ms |",
             "|---|---|---:|---:|---:|:-:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.split} | {r.role} | {r.predicted_tokens_per_s:.2f} | {r.measured_tokens_per_s:.2f} | "
                     f"{r.ratio:.2f} | {'yes' if r.within else 'NO'} | {r.predicted_device_ms:.0f} / "
                     f"{r.measured_device_ms:.0f} | {r.predicted_cloud_ms:.0f} / {r.measured_cloud_ms:.0f} | "
                     f"{r.predicted_network_ms:.0f} / {r.measured_network_ms:.0f} |")
    return "\n".join(lines)


def caption(meta: dict) -> str:
    return (f"The planner's predictions for {meta['model']} against measurements: device EMULATED "
            f"{meta['device_slowdown']:g}x slower than this machine, link {meta['link']} (emulated), wire "
            f"{meta['wire']}, privacy target {meta['max_recovery']:.0%} top-1 recovery. Measured: the best of "
            f"{meta['repeats']} greedy runs of {meta['tokens']} tokens on the paper's prompt through a real server "
            f"process (ms per step include the prompt's step); device and server {meta['threads']} thread(s) each, "
            f"the profile measured the same way. Measured {meta['date']} on {meta['cores']} cores, "
            f"torch {meta['torch']}, in {meta['seconds']} s.")


def _plot(rows: list[Row], meta: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r.predicted_tokens_per_s for r in rows], 0.4, label="predicted")
    ax.bar([x + 0.2 for x in xs], [r.measured_tokens_per_s for r in rows], 0.4, label="measured")
    ax.set_xticks(list(xs), [f"{r.split}\n{r.role}" for r in rows])
    ax.set_ylabel("tokens/s")
    ax.set_title(f"plan vs measurement ({meta['link']}, device {meta['device_slowdown']:g}x slower)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
