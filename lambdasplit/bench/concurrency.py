"""`lambdasplit bench concurrency`: how a body server serves many users at once, batched and not.

For each client count (1, 4, 8, 16 by default) and each server mode (batched: decode steps of
concurrent sessions share one forward pass; unbatched: --max-batch 1), that many clients open
sessions on a real server process and decode at the same time over WebSockets.

The devices are emulated: every client replays head states recorded from a real greedy generation
(the prompt's states, then one row per step) and checks each reply against the body output the
recording holds. On this bench's machine the devices would otherwise share the server's CPU cores,
and the figure would measure the devices as much as the server. The server does exactly the work
real clients give it.

Reported per row: aggregate tokens/s (all sessions' decode steps over the wall time), mean
per-session tokens/s, the ratio to one client on the same server mode, the mean batch size the
server ran (from its /metrics), and the largest difference of any reply from the recording.
"""

from __future__ import annotations

import http.client
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import torch
from tqdm import tqdm

from ..client.transport import BodyConnection
from ..models.llm import SplitModel, load_split, resolve_split
from ..models.prompting import encode_prompt
from ..models.source import model_name
from ..server.process import ServerProcess
from ..util.extras import check
from ..util.report import machine_meta, pyplot, write_report
from ..wire.codecs import make_codec
from ..wire.frame import Frame, encode_frame
from ..wire.protocol import SessionRequest
from .harness import compute_meta, run_together, serve_compute

PROMPTS = (
    "What is the difference between AI, ML and DL?",
    "Write a short story about a robot who learns to paint.",
    "Explain how a hash table works, with an example in Python.",
    "Give me three tips for a job interview, and explain why each one matters.",
)


@dataclass
class Recording:
    """One real generation's states at the split points: what a device sends, and what it should get back."""
    up: list[torch.Tensor]  # the prompt's states (L, D), then (1, D) per step
    down: list[torch.Tensor]


@dataclass
class Row:
    mode: str
    clients: int
    aggregate_tokens_per_s: float
    per_session_tokens_per_s: float
    vs_one_client: float
    mean_batch: float
    max_abs_diff: float
    steps: int
    seconds: float


@torch.inference_mode()
def record(model: SplitModel, tokenizer, prompt: str, tokens: int) -> Recording:
    ids = encode_prompt(tokenizer, prompt)
    caches = [part.layers.new_cache() for part in (model.head, model.body, model.tail)]
    rec, pos = Recording([], []), 0
    for _ in range(tokens + 1):
        up = model.head(torch.tensor([ids]), caches[0], pos)
        down = model.body(up, caches[1], pos)
        logits = model.tail(down, caches[2], pos)[0, -1]
        rec.up.append(up[0])
        rec.down.append(down[0])
        pos += len(ids)
        ids = [int(torch.argmax(logits))]
    return rec


class Device(threading.Thread):
    """One emulated device: a session, the recorded prompt, then the recorded steps as fast as replies come."""

    def __init__(self, url: str, request: SessionRequest, rec: Recording, start: threading.Barrier,
                 progress: tqdm):
        super().__init__(daemon=True)
        self.url, self.request, self.rec, self.start_line, self.progress = url, request, rec, start, progress
        self.codec = make_codec("fp32")
        self.max_diff, self.seconds, self.steps, self.error = 0.0, 0.0, 0, None

    def _step(self, conn: BodyConnection, i: int, pos: int) -> None:
        frame = Frame("hidden", step=i, pos=pos, tensor=self.rec.up[i], codec=self.codec)
        reply = conn.step(encode_frame(frame), codec=self.codec)
        self.max_diff = max(self.max_diff, float((reply.tensor - self.rec.down[i]).abs().max()))

    def run(self) -> None:
        try:
            with BodyConnection(self.url, transport="ws", timeout=600) as conn:
                conn.open_session(self.request)
                self._step(conn, 0, 0)  # the prompt, before the clock starts
                self.start_line.wait()
                started, pos = time.perf_counter(), self.rec.up[0].shape[0]
                for i in range(1, len(self.rec.up)):
                    self._step(conn, i, pos)
                    pos += 1
                    self.steps += 1
                    self.progress.update(1)
                self.seconds = time.perf_counter() - started
        except Exception as exc:  # noqa: BLE001 - reported in the table's run, not swallowed
            self.error = exc
            self.start_line.abort()


def _batch_stats(url: str) -> tuple[float, float]:
    """(sum, count) of the server's batch-size histogram."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    total = float(re.search(r"^lambdasplit_batch_size_sum (\S+)$", text, re.M).group(1))
    count = float(re.search(r"^lambdasplit_batch_size_count (\S+)$", text, re.M).group(1))
    return total, count


def run_concurrency_bench(args) -> list[Row]:
    check("matplotlib", "bench")  # the chart comes last: say so before the run
    folder, _, split = resolve_split(args.model, args.split)
    counts = sorted({int(c) for c in args.clients.split(",")})
    if not counts or counts[0] < 1 or counts[-1] > 256:
        raise ValueError(f"--clients takes client counts between 1 and 256, got {args.clients!r}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"batched", "unbatched"}:
        raise ValueError(f"--modes takes batched and/or unbatched, got {args.modes!r}")
    compute = compute_meta(args)
    print(f"bench concurrency: {model_name(folder)}, body layers [{split.x}, {split.y}) in {compute['weights']} on "
          f"{compute['device']}, {args.tokens} decode steps per client, clients {counts}, modes {modes}; devices "
          f"EMULATED by replaying head states recorded on the CPU in fp32 (fp32 wire)", flush=True)
    from transformers import AutoTokenizer

    model, tokenizer = load_split(folder, split.x, split.y, parts=("head", "body", "tail")), \
        AutoTokenizer.from_pretrained(folder)
    recordings = [record(model, tokenizer, p, args.tokens) for p in
                  tqdm(PROMPTS, desc="recording real generations", unit="prompt")]
    request = SessionRequest(model_fingerprint=model.body_fingerprint(), x=split.x, y=split.y,
                             max_positions=max(r.up[0].shape[0] for r in recordings) + args.tokens + 1)
    started, rows = time.time(), []
    total = len(modes) * sum(counts) * args.tokens
    with tqdm(total=total, desc="decoding", unit="step") as progress:
        for mode in modes:
            batch = str(max(counts)) if mode == "batched" else "1"
            with ServerProcess(str(folder), f"{split.x}:{split.y}", "--max-batch", batch,
                               "--max-sessions", str(max(counts) + 4), *serve_compute(args)) as server:
                single = None
                for n in counts:
                    progress.set_description(f"{mode}, {n} client{'s' if n > 1 else ''}")
                    before = _batch_stats(server.url)
                    line = threading.Barrier(n + 1)
                    devices = [Device(server.url, request, recordings[i % len(recordings)], line, progress)
                               for i in range(n)]
                    _, wall = run_together(devices, line)  # a device that failed before the start is reported below
                    failed = [d.error for d in devices if d.error]
                    if failed:
                        raise RuntimeError(f"{mode}, {n} clients: a device failed: {failed[0]}")
                    after = _batch_stats(server.url)
                    steps = sum(d.steps for d in devices)
                    aggregate = steps / wall
                    single = single or aggregate
                    mean_batch = (after[0] - before[0]) / max(after[1] - before[1], 1)
                    rows.append(Row(mode, n, aggregate, sum(d.steps / d.seconds for d in devices) / n,
                                    aggregate / single, mean_batch, max(d.max_diff for d in devices), steps, wall))
    meta = {"model": model_name(folder), "split": str(split), "tokens": args.tokens, "clients": counts,
            **machine_meta(), **compute, "seconds": round(time.time() - started)}
    write_report(Path(args.out), "concurrency", rows, markdown(rows), caption(meta), meta,
                 plot=lambda path: plot(rows, meta, path))
    return rows


def markdown(rows: list[Row]) -> str:
    lines = ["| server | clients | aggregate tokens/s | per-session tokens/s | × one client | mean batch | "
             "max abs diff vs recording |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.mode} | {r.clients} | {r.aggregate_tokens_per_s:.1f} | {r.per_session_tokens_per_s:.1f} | "
                     f"{r.vs_one_client:.2f} | {r.mean_batch:.2f} | {r.max_abs_diff:.1e} |")
    return "\n".join(lines)


def caption(meta: dict) -> str:
    return (f"{meta['model']}, body {meta['split']}, {meta['tokens']} decode steps per client after its prompt; "
            f"devices EMULATED by replaying recorded head states over WebSockets (fp32 wire), so their own compute "
            f"does not share the server's cores; body in {meta['weights']} on {meta['device']}; {meta['date']}, "
            f"{meta['machine']}, {meta['cores']} threads, torch {meta['torch']}, {meta['seconds']} s.")


def plot(rows: list[Row], meta: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for mode, style in (("batched", "o-"), ("unbatched", "s--")):
        sel = [r for r in rows if r.mode == mode]
        if sel:
            ax.plot([r.clients for r in sel], [r.aggregate_tokens_per_s for r in sel], style, label=f"{mode}, aggregate")
            ax.plot([r.clients for r in sel], [r.per_session_tokens_per_s for r in sel], style, alpha=0.4,
                    label=f"{mode}, per session")
    ax.set_xscale("log", base=2)
    ax.set_xticks(meta["clients"], [str(c) for c in meta["clients"]])
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("decode tokens/s")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"Body server under load: {meta['model']}, body {meta['split']} ({meta['date']})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
