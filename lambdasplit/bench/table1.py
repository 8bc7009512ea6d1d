"""`lambdasplit bench table1`: the paper's Table I, measured on this machine through an emulated link.

Rows, as in the paper:
  cloud-only              a `serve --cloud-only` server runs every layer; the prompt goes up as text
  Λ-Split w/o caching     at three local:cloud ratios; every step resends the whole sequence's states
  Λ-Split w/ caching      at the same ratios; the prompt's states once, then one row per step
  local-only              every layer in this process; nothing crosses the network

The paper's ratios (Llama-2-7B, N = 32 layers) are scaled to this model's layer count. Every row
generates the same number of tokens greedily from the paper's prompt, EOS ignored, after a short
warm-up. Columns:
  traffic       MB up and down, counted at the client's sockets (kernel TCP counters: HTTP,
                WebSocket and frame headers included); with --capture, also by tcpdump
  communication the wait for the body less the body's compute: the emulated link, the sockets,
                framing and the wire codec
  local         the device's share: head, tail, sampling (and, with --device-slowdown K, the
                EMULATED waits that make the device K times slower)
  cloud         the body's compute as the server reports it
  tokens/s      generated tokens over the total time, prefill included (the paper's "average
                generation throughput")
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..client.cloud import CloudClient, CloudResult
from ..client.generate import GenerationStats, SplitClient
from ..models.llm import load_config
from ..models.source import model_name, resolve_model
from ..net.link import LinkSpec
from ..util.extras import check
from ..util.report import machine_meta, pyplot, write_report
from .harness import LinkedServer, Observed, check_capture, client_compute, compute_meta, serve_compute

PAPER_LAYERS = 32
PAPER_SPLITS = ((1, 31), (4, 28), (8, 24))  # (X, Y) on Llama-2-7B: local:cloud 2:30, 8:24, 16:16
WARMUP_TOKENS = 4
MB = 1e6

# Table I of the paper: Llama-2-7b-chat (fp16 compute and wire), a Jetson AGX Orin 15 W as the device,
# an RTX 3090 server as the cloud, HTTP (FastAPI) over a 1000 Mbit/s link, L_in = 14, L_out = 300.
# (method, local:cloud, transmitted, up MB, down MB, total MB, communication s, local s, cloud s, total s, tokens/s)
PAPER_TABLE1 = (
    ("Cloud-only", "0 : 32", "Text", 0.01, 0.03, 0.03, 0.05, 0.00, 20.46, 20.51, 14.62),
    ("Λ-Split w/o caching", "2 : 30", "Hidden state", 404.44, 470.69, 875.13, 119.19, 31.24, 19.74, 170.17, 1.76),
    ("", "8 : 24", "", 403.74, 470.15, 873.90, 119.87, 82.38, 16.62, 218.87, 1.37),
    ("", "16 : 16", "", 404.14, 471.06, 875.20, 121.16, 156.15, 12.11, 289.42, 1.03),
    ("Λ-Split w/ caching", "2 : 30", "Latest part of hidden state", 3.10, 3.25, 6.34, 2.72, 26.94, 19.71, 49.37,
     6.07),
    ("", "8 : 24", "", 3.10, 3.26, 6.36, 2.81, 81.72, 16.11, 100.64, 2.98),
    ("", "16 : 16", "", 3.10, 3.25, 6.34, 2.89, 157.51, 11.78, 172.18, 1.74),
    ("Local-only", "32 : 0", "-", 0.00, 0.00, 0.00, 0.00, 300.77, 0.00, 300.77, 0.99),
)
ROW_KINDS = ("cloud-only", "no-cache", "cache", "local-only")


def scale_split(x: int, y: int, n: int, paper_n: int = PAPER_LAYERS) -> tuple[int, int]:
    """The paper's (X, Y) on `paper_n` layers, scaled to `n`: the same share of layers on the device.

    The device's layers (X + paper_n - Y) are scaled and rounded, then dealt to the head first:
    2:30 -> 2:28, 8:24 -> 8:22, 16:16 -> 15:15 on a 30-layer model.
    """
    if n < 3:
        raise ValueError(f"a {n}-layer model cannot be split three ways")
    local = min(max(round((x + paper_n - y) * n / paper_n), 2), n - 1)
    head = math.ceil(local / 2)
    return head, n - (local - head)


@dataclass
class Row:
    method: str  # cloud-only, Λ-Split w/o caching, Λ-Split w/ caching, local-only
    local_layers: int
    cloud_layers: int
    split: str  # X:Y of the Λ-Split rows, "" otherwise
    transmitted: str
    prompt_tokens: int
    tokens: int
    up_mb: float  # counted at the client's sockets
    down_mb: float
    total_mb: float
    communication_s: float
    local_s: float
    cloud_s: float
    total_s: float
    tokens_per_s: float
    device_slowdown: float  # > 1: the local time is EMULATED, this many times this machine's own
    emulated_wait_s: float
    link_up_mb: float = 0.0  # as the link proxy forwarded it
    link_down_mb: float = 0.0
    capture_up_mb: float | None = None  # as tcpdump saw it (--capture)
    capture_down_mb: float | None = None

    @property
    def ratio(self) -> str:
        return f"{self.local_layers} : {self.cloud_layers}"

    def observed(self, seen: Observed) -> "Row":
        self.link_up_mb, self.link_down_mb = seen.link_up / MB, seen.link_down / MB
        if seen.capture_up is not None:
            self.capture_up_mb, self.capture_down_mb = seen.capture_up / MB, seen.capture_down / MB
        return self


@dataclass
class Plan:
    """What one run measures: the model, the rows, and how each is run."""
    folder: Path
    n: int
    splits: list[tuple[int, int]]
    kinds: tuple[str, ...]
    tokens: int
    prompt: str
    chat: bool
    wire: str
    transport: str
    link: LinkSpec
    slowdown: float
    capture: bool
    compute: dict = field(default_factory=dict)  # --device and --weights, as SplitClient keywords
    serve: list[str] = field(default_factory=list)  # the same, as `lambdasplit serve` arguments
    rows: list[Row] = field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(len(self.splits) if k in ("no-cache", "cache") else 1 for k in self.kinds)


def run_table1(args) -> list[Row]:
    check("matplotlib", "bench")  # the chart comes last: say so before the run
    folder = resolve_model(args.model)
    n = load_config(folder).num_hidden_layers
    kinds = tuple(k.strip() for k in args.rows.split(",") if k.strip())
    if not kinds or set(kinds) - set(ROW_KINDS):
        raise ValueError(f"--rows takes a comma-separated subset of {','.join(ROW_KINDS)}, got {args.rows!r}")
    if args.tokens < 1:
        raise ValueError(f"--tokens must be at least 1, got {args.tokens}")
    if args.capture:
        check_capture()
    paper = {f"{x + PAPER_LAYERS - y}:{y - x}": (x, y) for x, y in PAPER_SPLITS}
    wanted = [r.strip().replace(" ", "") for r in args.ratios.split(",") if r.strip()]
    if not wanted or set(wanted) - set(paper):
        raise ValueError(f"--ratios takes a comma-separated subset of the paper's {','.join(paper)}, got {args.ratios!r}")
    plan = Plan(folder, n, [scale_split(*paper[r], n) for r in paper if r in wanted], kinds, args.tokens, args.prompt,
                args.chat, args.wire, args.transport, LinkSpec.parse(args.link), args.device_slowdown, args.capture,
                client_compute(args), serve_compute(args))
    compute = compute_meta(args)
    emulated = (f"; the device is EMULATED {plan.slowdown:g}x slower than this machine" if plan.slowdown > 1 else
                "; device and cloud are this same machine")
    print(f"bench table1: {model_name(folder)} ({n} layers), {plan.tokens} tokens per row (greedy, EOS ignored), "
          f"wire {plan.wire} over {plan.transport}, link {plan.link}{emulated}; {compute['weights']} on "
          f"{compute['device']}", flush=True)
    print("the paper's local:cloud ratios on 32 layers, scaled to this model: " + ", ".join(
        f"{r} -> {x + n - y}:{y - x} (split {x}:{y})" for r, (x, y) in
        ((r, scale_split(*paper[r], n)) for r in paper if r in wanted)), flush=True)
    started = time.time()
    with tqdm(total=plan.count * plan.tokens, unit="tok", desc="table1", dynamic_ncols=True) as bar:
        if "cloud-only" in kinds:
            _cloud_only(plan, bar)
        for x, y in plan.splits if {"no-cache", "cache"} & set(kinds) else ():
            _split_rows(plan, x, y, bar)
        if "local-only" in kinds:
            _local_only(plan, bar)
    rows = sorted(plan.rows, key=_table_order)
    meta = {"model": model_name(folder), "layers": n, "tokens": plan.tokens, "prompt": plan.prompt,
            "chat_template": plan.chat, "prompt_tokens": rows[0].prompt_tokens, "wire": plan.wire,
            "transport": plan.transport, "link": str(plan.link), "device_slowdown": plan.slowdown,
            "splits": [f"{x}:{y}" for x, y in plan.splits], **machine_meta(), **compute,
            "seconds": round(time.time() - started)}
    reductions = caching_reductions(rows)
    meta["caching_reduction"] = reductions
    notes = [line for line in (_reduction_lines(reductions), _capture_lines(rows)) if line]
    table = "\n\n".join([markdown(rows, plan.slowdown), *notes])
    write_report(Path(args.out), "table1", rows, table, caption(meta), meta,
                 plot=lambda path: plot(rows, meta, path))
    return rows


# ---- the rows ----------------------------------------------------------------------------------------

def _progress(bar: tqdm, label: str) -> Callable[[int], None]:
    bar.set_description(label)
    return lambda k: bar.update(k)


def _cloud_only(plan: Plan, bar: tqdm) -> None:
    with LinkedServer(str(plan.folder), "0:0", "--cloud-only", *plan.serve, link=plan.link) as server:
        client = CloudClient(server.url)
        options = dict(max_new_tokens=plan.tokens, stop_at_eos=False, chat=plan.chat)
        client.generate(plan.prompt, **{**options, "max_new_tokens": WARMUP_TOKENS})
        step = _progress(bar, "cloud-only")
        result, done = CloudResult("", []), 0
        with server.observe(plan.capture) as seen:
            for _ in client.stream(plan.prompt, result, **options):
                step(len(result.token_ids) - done)
                done = len(result.token_ids)
        step(len(result.token_ids) - done)
        t = result.traffic
        plan.rows.append(Row("cloud-only", 0, plan.n, "", "Text", result.prompt_tokens, len(result.token_ids),
                             t.socket_up / MB, t.socket_down / MB, (t.socket_up + t.socket_down) / MB,
                             result.seconds - result.cloud_s, 0.0, result.cloud_s, result.seconds,
                             len(result.token_ids) / result.seconds, plan.slowdown, 0.0).observed(seen))


def _split_rows(plan: Plan, x: int, y: int, bar: tqdm) -> None:
    with LinkedServer(str(plan.folder), f"{x}:{y}", *plan.serve, link=plan.link) as server:
        for cache in (False, True):
            if ("cache" if cache else "no-cache") not in plan.kinds:
                continue
            client = SplitClient(plan.folder, server=server.url, split=(x, y), wire=plan.wire, cache=cache,
                                 transport=plan.transport, device_slowdown=plan.slowdown,
                                 speculate="off", **plan.compute)  # the paper: one token per round trip
            method = "Λ-Split w/ caching" if cache else "Λ-Split w/o caching"
            what = "Latest part of hidden state" if cache else "Hidden state"
            stats, seen = _generate(plan, client, server, f"{'w/' if cache else 'w/o'} caching {x}:{y}", bar)
            t = stats.traffic
            local = x + plan.n - y
            plan.rows.append(Row(method, local, plan.n - local, f"{x}:{y}", what, stats.prompt_tokens,
                                 stats.new_tokens, t.socket_up / MB, t.socket_down / MB,
                                 (t.socket_up + t.socket_down) / MB, stats.network_s, stats.device_s, stats.cloud_s,
                                 _total(stats), stats.new_tokens / _total(stats), plan.slowdown,
                                 stats.emulated_wait_s).observed(seen))


def _local_only(plan: Plan, bar: tqdm) -> None:
    # every layer in the head: the device's own compute, slowed like the other rows' when emulating
    client = SplitClient(plan.folder, server=None, split=(plan.n, plan.n), device_slowdown=plan.slowdown,
                         speculate="off", **plan.compute)
    stats, _ = _generate(plan, client, None, "local-only", bar)
    plan.rows.append(Row("local-only", plan.n, 0, "", "-", stats.prompt_tokens, stats.new_tokens, 0.0, 0.0, 0.0,
                         0.0, _total(stats), 0.0, _total(stats), stats.new_tokens / _total(stats), plan.slowdown,
                         stats.emulated_wait_s))


def _generate(plan: Plan, client: SplitClient, server: LinkedServer | None, label: str,
              bar: tqdm) -> tuple[GenerationStats, Observed]:
    ids = client.encode_prompt(plan.prompt, chat=plan.chat)
    for _ in client.generate_ids(ids, max_new_tokens=WARMUP_TOKENS, stop_at_eos=False):
        pass
    step, stats = _progress(bar, label), GenerationStats()
    with server.observe(plan.capture) if server else nullcontext(Observed()) as seen:
        for _ in client.generate_ids(ids, max_new_tokens=plan.tokens, stop_at_eos=False, stats=stats):
            step(1)
    return stats, seen


def _total(stats: GenerationStats) -> float:
    return stats.prefill_s + stats.decode_s


def _table_order(row: Row) -> tuple[int, int]:
    order = ("cloud-only", "Λ-Split w/o caching", "Λ-Split w/ caching", "local-only")
    return order.index(row.method), row.local_layers


# ---- results -----------------------------------------------------------------------------------------

def caching_reductions(rows: list[Row]) -> dict[str, float]:
    """Per split, 1 - (total traffic with caching) / (without), where both rows were measured."""
    without = {r.split: r.total_mb for r in rows if r.method == "Λ-Split w/o caching"}
    return {r.split: 1 - r.total_mb / without[r.split] for r in rows
            if r.method == "Λ-Split w/ caching" and without.get(r.split)}


def _reduction_lines(reductions: dict[str, float]) -> str:
    if not reductions:
        return ""
    cut = ", ".join(f"{v:.2%} at split {s}" for s, v in reductions.items())
    verdict = "meets" if min(reductions.values()) >= 0.99 else "MISSES"
    return f"Caching cuts the total traffic by {cut}: {verdict} the target of >= 99% (the paper: 99.3%)."


def _capture_lines(rows: list[Row]) -> str:
    captured = [r for r in rows if r.capture_up_mb is not None and r.total_mb > 0]
    if not captured:
        return ""
    worst = max(max(abs(r.capture_up_mb - r.up_mb) / r.up_mb, abs(r.capture_down_mb - r.down_mb) / r.down_mb)
                for r in captured)
    return (f"Packet capture (tcpdump on the link's loopback port) against the socket counts: the largest "
            f"difference on any row and direction is {worst:.2%}.")


def _fmt(v: float) -> str:
    return f"{v:.2f}"


def _mb(v: float) -> str:
    return f"{v:.3f}" if v >= 0.01 or v == 0 else f"{v:.4f}"  # a text request is a few hundred bytes


def _size(mb: float) -> str:
    return f"{mb:.2f} MB" if mb >= 1 else f"{mb * 1000:.1f} kB"


def markdown(rows: list[Row], slowdown: float = 1.0) -> str:
    """The measured table in the paper's layout."""
    local = "Local (s)" if slowdown <= 1 else f"Local (s, EMULATED {slowdown:g}x slower device)"
    head = ["Method", "Local : Cloud (layers)", "Transmission data", "Uplink (MB)", "Downlink (MB)", "Total (MB)",
            "Communication (s)", local, "Cloud (s)", "Total (s)", "Throughput (tokens/s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * 8) + "|"]
    last = None
    for r in rows:
        method = r.method if r.method != last else ""
        last = r.method
        cells = [method, r.ratio, r.transmitted if method else ""] + [_mb(v) for v in (
            r.up_mb, r.down_mb, r.total_mb)] + [_fmt(v) for v in (r.communication_s, r.local_s, r.cloud_s,
                                                                   r.total_s, r.tokens_per_s)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paper_markdown() -> str:
    """The paper's Table I in the same layout, to read beside a measured one."""
    head = ["Method", "Local : Cloud (layers)", "Transmission data", "Uplink (MB)", "Downlink (MB)", "Total (MB)",
            "Communication (s)", "Local (s)", "Cloud (s)", "Total (s)", "Throughput (tokens/s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * 8) + "|"]
    for method, ratio, what, *values in PAPER_TABLE1:
        lines.append("| " + " | ".join([method, ratio, what] + [_fmt(v) for v in values]) + " |")
    return "\n".join(lines)


def caption(meta: dict) -> str:
    device = (f"the device is EMULATED {meta['device_slowdown']:g}x slower than this machine (its local time is "
              f"its measured compute x {meta['device_slowdown']:g})" if meta["device_slowdown"] > 1 else
              "device and cloud share this machine's CPU and take turns")
    return (f"{meta['model']} ({meta['layers']} layers), L_in = {meta['prompt_tokens']} tokens "
            f"({'chat template' if meta['chat_template'] else 'raw prompt'}), L_out = {meta['tokens']} "
            f"(greedy, EOS ignored); wire {meta['wire']} over {meta['transport']}, emulated link {meta['link']}; "
            f"{device}. Traffic counted at the client's sockets. {meta['date']}, {meta['machine']}, "
            f"{meta['cores']} threads, torch {meta['torch']}, {meta['seconds']} s.")


def plot(rows: list[Row], meta: dict, path: Path) -> None:
    """Traffic (log scale) and the latency breakdown per row, side by side."""
    plt = pyplot()
    labels = [f"{r.method.replace('Λ-Split ', '')}  {r.ratio}" for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 0.6 * len(rows) + 2.5), dpi=110, sharey=True)
    ys = range(len(rows))
    sent = [r for r in rows if r.total_mb > 0]
    floor = min(min(r.up_mb, r.down_mb) for r in sent) / 3 if sent else 1e-3
    for offset, name, color, label in ((-0.2, "up_mb", "tab:blue", "uplink"), (0.2, "down_mb", "tab:orange",
                                                                                "downlink")):
        left.barh([y + offset for y, r in zip(ys, rows) if r.total_mb], [getattr(r, name) for r in sent],
                  height=0.4, left=floor, color=color, label=label)
    for y, r in zip(ys, rows):
        text = f"total {_size(r.total_mb)}" if r.total_mb else "nothing sent"
        left.annotate(text, (max(r.up_mb, r.down_mb, floor), y), xytext=(4, 0), textcoords="offset points",
                      va="center", fontsize=8)
    left.set_xscale("log")
    left.set_xlim(floor / 2, max([r.total_mb for r in rows] + [floor]) * 60)  # room for the labels
    left.set_xlabel("traffic (MB, at the client's sockets; log scale)")
    left.set_yticks(list(ys), labels)
    left.invert_yaxis()
    left.legend(loc="lower right")
    start = [0.0] * len(rows)
    emulated = " (EMULATED slower device)" if meta["device_slowdown"] > 1 else ""
    for name, color, label in (("communication_s", "tab:gray", "communication"),
                               ("local_s", "tab:green", "local" + emulated), ("cloud_s", "tab:purple", "cloud")):
        values = [getattr(r, name) for r in rows]
        right.barh(ys, values, left=start, color=color, label=label)
        start = [a + b for a, b in zip(start, values)]
    for y, r in zip(ys, rows):
        right.annotate(f"{r.total_s:.1f} s, {r.tokens_per_s:.2f} tok/s", (r.total_s, y), xytext=(4, 0),
                       textcoords="offset points", va="center", fontsize=8)
    right.set_xlabel(f"latency for {meta['tokens']} tokens (s)")
    right.set_xlim(0, max(r.total_s for r in rows) * 1.3)
    right.legend(loc="lower right")
    for ax in (left, right):
        ax.grid(alpha=0.3, axis="x", which="both")
    title = (f"Table I on {meta['model']}: L_in = {meta['prompt_tokens']}, L_out = {meta['tokens']}, link "
             f"{meta['link']}, wire {meta['wire']} ({meta['date']})")
    if meta["device_slowdown"] > 1:
        title += f"\nEMULATED device: {meta['device_slowdown']:g}x slower than this machine"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
