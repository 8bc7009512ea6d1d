"""`lambdasplit bench gpu`: a prepared check of the body on a GPU, driven from a device on the CPU.

For each body weight format (bf16, then fp32, by default), a body server (`lambdasplit serve --device cuda
--weights FMT`) serves layers [X, Y). The device side (head and tail) runs here on the CPU in fp32, over a
lossless fp32 wire. Reported:

  agreement     greedy tokens identical to those of a CPU fp32 body (the whole split in this process), on
                the built-in prompts: how far the GPU's arithmetic moves the answers
  throughput    decode tokens/s with 1, 8 and 32 sessions at once: threads sharing this process's head and
                tail, each with its own session; the server batches their decode steps (--max-batch)
  memory        per session: the server process's GPU memory as nvidia-smi sees it (an upper bound: torch's
                allocator keeps what the batched steps used), and the KV cache from /v1/info
                (kv_bytes_per_position x positions) and from the peak of /metrics' kv_cache_bytes
  speculation   tokens/s with prompt-lookup drafts ("auto") against plain decoding, through an emulated
                1 Gbit/s link with --rtt round trips, for the first format

With `--device cpu` the same check runs with the body on the CPU: a dry run, where a CPU fp32 body served
must agree exactly with the CPU fp32 body in this process.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import torch

from ..client.generate import GenerationStats, SplitClient
from ..data import PAPER_PROMPT, PRIVATE_PROMPT
from ..models.device import DeviceError, device_name, resolve_device
from ..models.formats import parse_format
from ..models.llm import resolve_split
from ..models.source import model_name
from ..net.link import link_to
from ..server.process import ServerProcess
from ..util.report import machine_meta
from .concurrency import _batch_stats
from .harness import run_together
from .speculative import PROMPTS as SPECULATIVE_PROMPTS

PROMPTS = (PAPER_PROMPT, PRIVATE_PROMPT, SPECULATIVE_PROMPTS["list"], SPECULATIVE_PROMPTS["code"])
CLIENT = dict(device="cpu", weights="fp32", wire="fp32")  # the device side: the CPU, exact


def run_gpu_check(args) -> dict:
    device = _body_device(args.device)
    formats = [parse_format(f.strip()).name for f in args.formats.split(",") if f.strip()]
    sessions = sorted({int(n) for n in args.sessions.split(",") if n.strip()})
    if not formats or not sessions or sessions[0] < 1 or sessions[-1] > 256:
        raise ValueError(f"need --formats and --sessions between 1 and 256, got {args.formats!r}, {args.sessions!r}")
    if args.tokens < 2 or not 1 <= args.prompts <= len(PROMPTS):
        raise ValueError(f"need --tokens >= 2 and --prompts from 1 to {len(PROMPTS)}")
    folder, _, split = resolve_split(args.model, args.split)
    body = device_name(device)
    print(f"bench gpu: {model_name(folder)}, body [{split.x}, {split.y}) on {body} in {', '.join(formats)}; device "
          f"side on the CPU in fp32, fp32 wire; {args.prompts} prompt(s) x {args.tokens} greedy tokens", flush=True)
    started = time.time()
    reference = SplitClient(folder, server=None, split=(split.x, split.y), speculate="off", **CLIENT)
    prompts = [reference.encode_prompt(p) for p in PROMPTS[:args.prompts]]
    expected = [_greedy(reference, ids, args.tokens)[0] for ids in prompts]
    del reference
    report = {"meta": {**machine_meta(), "model": model_name(folder), "split": f"{split.x}:{split.y}",
                       "body_device": body, "client": "cpu fp32", "wire": "fp32", "tokens": args.tokens,
                       "prompts": len(prompts), "sessions": sessions, "rtt_ms": args.rtt,
                       "cuda": torch.version.cuda},
              "agreement": [], "throughput": [], "memory": [], "speculation": None}
    for i, fmt in enumerate(formats):
        with ServerProcess(str(folder), f"{split.x}:{split.y}", "--device", str(device), "--weights", fmt,
                           "--max-batch", str(sessions[-1]), "--max-sessions", str(sessions[-1] + 4)) as server:
            info = json.loads(_get(server.url, "/v1/info"))
            label = f"{info.get('device', '?')} {info.get('weights', fmt)}"
            client = SplitClient(folder, server=server.url, split=(split.x, split.y), speculate="off", **CLIENT)
            _greedy(client, prompts[0], 2)  # warm-up: the route, the fingerprint, the server's first step
            report["agreement"].append(_agreement(client, prompts, expected, args.tokens) | {"body": label})
            gpu = [_gpu_bytes(server.proc.pid)] if device.type == "cuda" else None
            for n in sessions:
                row, peak = _throughput(client, server.url, prompts, args.tokens, n)
                report["throughput"].append({"body": label, **row})
            if gpu is not None:
                gpu.append(_gpu_bytes(server.proc.pid))
            report["memory"].append(_memory(info, label, prompts, args.tokens, peak, sessions[-1], gpu))
            if i == 0:
                report["speculation"] = _speculation(folder, split, server.url, prompts, args) | {"body": label}
    report["meta"]["seconds"] = round(time.time() - started)
    print(markdown(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return report


def _body_device(spec: str) -> torch.device:
    """The body's device; a CUDA device that is not here is one clear line, with the CPU run as the way out."""
    try:
        return resolve_device(spec)
    except DeviceError as exc:
        if str(spec).strip().lower().startswith("cuda") and not torch.cuda.is_available():
            why = "is a CPU build" if torch.version.cuda is None else "sees no CUDA GPU"
            raise DeviceError(f"no CUDA device on this machine (torch {torch.__version__} {why}); "
                              "--device cpu runs the same check on the CPU") from None
        raise DeviceError(f"{exc}; --device cpu runs the same check on the CPU") from None


def _greedy(client: SplitClient, ids: list[int], tokens: int, speculate: str = "off"):
    stats = GenerationStats()
    out = list(client.generate_ids(ids, max_new_tokens=tokens, stop_at_eos=False, stats=stats, speculate=speculate))
    return out, stats


def _agreement(client: SplitClient, prompts: list[list[int]], expected: list[list[int]], tokens: int) -> dict:
    """The fraction of greedy tokens equal to the CPU fp32 body's, position by position, and where each
    prompt's answer first left it (None: never)."""
    same, first = [], []
    for ids, want in zip(prompts, expected):
        got, _ = _greedy(client, ids, tokens)
        match = [a == b for a, b in zip(got, want)]
        same.append(sum(match) / len(match))
        first.append(match.index(False) if False in match else None)
    return {"vs": "cpu fp32", "agreement": round(sum(same) / len(same), 4), "per_prompt": [round(s, 4) for s in same],
            "first_divergence": first}


class _Session(threading.Thread):
    """One session: its prompt, then (after every session's prompt) its decode steps, timed."""

    def __init__(self, client: SplitClient, ids: list[int], tokens: int, line: threading.Barrier):
        super().__init__(daemon=True)
        self.client, self.ids, self.tokens, self.line = client, ids, tokens, line
        self.stats, self.steps, self.end, self.error = GenerationStats(), 0, 0.0, None

    def run(self) -> None:
        try:
            tokens = self.client.generate_ids(self.ids, max_new_tokens=self.tokens, stop_at_eos=False,
                                              stats=self.stats, speculate="off")
            next(tokens)  # the prompt's step
            self.line.wait()
            for _ in tokens:
                self.steps += 1
            self.end = time.perf_counter()
        except Exception as exc:  # noqa: BLE001 - raised by the caller, with the session count
            self.error = exc
            self.line.abort()


def _throughput(client: SplitClient, url: str, prompts: list[list[int]], tokens: int, n: int) -> tuple[dict, dict]:
    """n sessions decoding at once: aggregate and per-session decode tokens/s, the server's mean batch, and the
    peak of the server's KV-cache gauge while they ran."""
    line = threading.Barrier(n + 1)
    sessions = [_Session(client, prompts[i % len(prompts)], tokens, line) for i in range(n)]
    before = _batch_stats(url)
    watch = _GaugeWatch(url).start()
    t0, wall = run_together(sessions, line)  # a session that failed before the start is raised below
    peak = watch.stop()
    if failed := [s.error for s in sessions if s.error]:
        raise RuntimeError(f"{n} sessions: a session failed: {failed[0]}")
    after = _batch_stats(url)
    steps = sum(s.steps for s in sessions)
    own = sum(s.stats.head_tail_s for s in sessions) / max(sum(s.stats.prefill_s + s.stats.decode_s
                                                               for s in sessions), 1e-9)
    return {"sessions": n, "tokens_per_s": round(steps / wall, 2),
            "per_session_tokens_per_s": round(sum(s.steps / (s.end - t0) for s in sessions) / n, 2),
            "mean_batch": round((after[0] - before[0]) / max(after[1] - before[1], 1), 2),
            "device_side_share": round(own, 3), "decode_steps": steps, "seconds": round(wall, 3)}, peak


class _GaugeWatch(threading.Thread):
    """Polls the server's /metrics for the peak of kv_cache_bytes (with the sessions open at that moment)."""

    def __init__(self, url: str, every_s: float = 0.05):
        super().__init__(daemon=True)
        self.url, self.every_s, self.done = url, every_s, threading.Event()
        self.peak = {"kv_cache_bytes": 0.0, "sessions": 0.0}

    def run(self) -> None:
        while not self.done.is_set():
            text = _get(self.url, "/metrics")
            seen = {k: _gauge(text, k) for k in self.peak}
            if seen["kv_cache_bytes"] > self.peak["kv_cache_bytes"]:
                self.peak = seen
            self.done.wait(self.every_s)

    def start(self) -> "_GaugeWatch":
        super().start()
        return self

    def stop(self) -> dict:
        self.done.set()
        self.join()
        return self.peak


def _memory(info: dict, label: str, prompts: list[list[int]], tokens: int, peak: dict, n: int,
            gpu: list[int | None] | None) -> dict:
    """Memory per session: the KV cache computed and measured, and the GPU's where nvidia-smi shows it
    (`gpu`: the server's GPU bytes before the first run and after the last; None: the body is not on a GPU)."""
    per_position = int(info.get("kv_bytes_per_position", 0))
    positions = round(sum(len(p) for p in prompts) / len(prompts)) + tokens
    row = {"body": label, "kv_bytes_per_position": per_position, "positions": positions,
           "kv_bytes_per_session": per_position * positions,
           "peak_kv_bytes_per_session": round(peak["kv_cache_bytes"] / peak["sessions"]) if peak["sessions"] else None,
           "peak_sessions": int(peak["sessions"]), "gpu_bytes_per_session": None}
    kv = "KV-cache bytes per session from /v1/info kv_bytes_per_position x positions instead"
    if gpu is None:
        row["gpu_source"] = f"the body is on the CPU: no GPU memory to read; {kv}"
    elif None in gpu:
        row["gpu_source"] = (f"GPU memory not exposed (the server reports none, and nvidia-smi lists no such "
                             f"process here); {kv}")
    else:
        row["gpu_bytes_per_session"] = round(max(gpu[1] - gpu[0], 0) / n)
        row["gpu_source"] = (f"nvidia-smi: the server process's GPU memory after the {n}-session run less before "
                             f"the first, / {n} (an upper bound: torch's allocator keeps the batched steps' workspace)")
    return row


def _speculation(folder: Path, split, url: str, prompts: list[list[int]], args) -> dict:
    """Plain decoding against prompt-lookup drafts, the same prompts through an emulated link of --rtt."""
    proxy = link_to(url, f"1gbit,{args.rtt / 2:g}ms")
    try:
        client = SplitClient(folder, server=proxy.url, split=(split.x, split.y), **CLIENT)
        _greedy(client, prompts[0], 2)  # warm-up
        runs = {mode: [_greedy(client, ids, args.tokens, mode) for ids in prompts] for mode in ("off", "auto")}
        rate = {m: sum(s.new_tokens - 1 for _, s in done) / sum(s.decode_s for _, s in done)
                for m, done in runs.items()}
        drafted = sum(s.speculation.drafted for _, s in runs["auto"])
        accepted = sum(s.speculation.accepted for _, s in runs["auto"])
    finally:
        proxy.stop()
    return {"rtt_ms": args.rtt, "link": "1gbit", "off_tokens_per_s": round(rate["off"], 2),
            "on_tokens_per_s": round(rate["auto"], 2), "speedup": round(rate["auto"] / rate["off"], 2),
            "acceptance": round(accepted / drafted, 3) if drafted else None,
            "identical": all(a == b for (a, _), (b, _) in zip(runs["off"], runs["auto"]))}


def _get(url: str, path: str) -> str:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def _gauge(text: str, name: str) -> float:
    found = re.search(rf"^lambdasplit_{name} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def _gpu_bytes(pid: int) -> int | None:
    """The GPU memory nvidia-smi reports for one process (None: no nvidia-smi, or it lists no such process)."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and fields[0] == str(pid) and fields[1].isdigit():
            return int(fields[1]) << 20
    return None


def markdown(report: dict) -> str:
    m = report["meta"]
    lines = [f"GPU check: {m['model']}, body {m['split']} on {m['body_device']}; device side {m['client']}, "
             f"{m['wire']} wire; {m['prompts']} prompt(s) x {m['tokens']} greedy tokens; torch {m['torch']}, "
             f"CUDA {m['cuda']}, {m['date']}", "",
             "| body | greedy agreement with a cpu fp32 body | first divergence per prompt |", "|---|---:|---|"]
    for a in report["agreement"]:
        first = ", ".join("-" if f is None else str(f) for f in a["first_divergence"])
        lines.append(f"| {a['body']} | {a['agreement']:.1%} | {first} |")
    lines += ["", "| body | sessions | decode tokens/s | per session | mean batch | device-side share |",
              "|---|---:|---:|---:|---:|---:|"]
    for t in report["throughput"]:
        lines.append(f"| {t['body']} | {t['sessions']} | {t['tokens_per_s']:.1f} | {t['per_session_tokens_per_s']:.1f} "
                     f"| {t['mean_batch']:.2f} | {t['device_side_share']:.0%} |")
    lines += ["", "| body | KV bytes/position | positions | KV per session | peak KV per session (/metrics) | "
              "GPU memory per session |", "|---|---:|---:|---:|---:|---:|"]
    for r in report["memory"]:
        gpu = "not exposed" if r["gpu_bytes_per_session"] is None else _mib(r["gpu_bytes_per_session"])
        peak = "-" if r["peak_kv_bytes_per_session"] is None else _mib(r["peak_kv_bytes_per_session"])
        lines.append(f"| {r['body']} | {r['kv_bytes_per_position']:,} | {r['positions']} | "
                     f"{_mib(r['kv_bytes_per_session'])} | {peak} | {gpu} |")
    lines += [f"GPU memory per session: {r['gpu_source']}." for r in report["memory"][:1]]
    if s := report["speculation"]:
        acceptance = "-" if s["acceptance"] is None else f"{s['acceptance']:.0%}"
        lines += ["", "| body | RTT | plain tokens/s | with drafts (auto) | speed-up | acceptance | same tokens |",
                  "|---|---:|---:|---:|---:|---:|:-:|",
                  f"| {s['body']} | {s['rtt_ms']:g} ms | {s['off_tokens_per_s']:.1f} | {s['on_tokens_per_s']:.1f} | "
                  f"{s['speedup']:.2f}x | {acceptance} | {'yes' if s['identical'] else 'NO'} |"]
    return "\n".join(lines)


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"
