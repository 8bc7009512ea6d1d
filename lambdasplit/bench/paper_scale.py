"""`lambdasplit bench paper-scale`: the paper's 7B split on this machine, with Llama-2-7B's shape and random weights.

    (a) a seeded random checkpoint of the shape, written once as bf16 shards (models/synthetic.py)
    (b) the split: the body [X, Y) in a real `lambdasplit serve` process (bf16 or int8), the head and tail in
        this process (int8, int4 or bf16), an fp32 wire; greedy ids, tokens/s, traffic per token, each
        process's resident memory, the device's share of the model's bytes; then the server stops
    (c) local-only: the same parts in the same formats, all in this process, with no network
    (d) exactness: (b) and (c) must give the same greedy ids (the fp32 wire is lossless)

Only one copy of the body is alive at a time: (b) ends, and its memory is handed back, before (c) loads.
Before any of it, the bench estimates the memory and disk each step needs from the shape and the formats,
and refuses when this machine has less. Random weights make meaningless text; the memory, speed and
traffic are those of a model of this shape.
"""

from __future__ import annotations

import ctypes
import gc
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import torch

from ..client.body import LocalBody
from ..client.generate import GenerationStats, SplitClient, Stepper
from ..client.sampling import Sampler
from ..client.transport import BodyConnection
from ..models.device import resolve_device
from ..models.formats import WeightFormat, parse_format
from ..models.llm import Split, load_split
from ..models.synthetic import PRESETS, SHARD_BYTES, SyntheticSpec, checkpoint_folder, ensure_checkpoint, is_complete
from ..server.process import ServerProcess
from ..util.report import machine_meta

GiB = 1 << 30
PROCESS_BYTES = GiB // 2  # python, torch and (in the server) uvicorn, before any weight (measured: 0.42 GiB)
READ_BYTES = GiB // 2  # reading float weights from a 1 GiB shard, over what they take once read (measured: 0.35)


class NotEnoughResources(RuntimeError):
    """The bench would need more memory or disk than this machine has free."""


# ---- what it needs -----------------------------------------------------------------------------

@dataclass
class Estimate:
    """Bytes each step needs at its peak (weights, loading transients, one process's own overhead)."""
    device_bytes: int  # head + tail, as held
    body_bytes: int  # body, as held
    write_peak: int  # (a): one shard and the largest tensor's copies
    split_peak: int  # (b): the server's body and this process's head and tail while it loads
    local_peak: int  # (c): everything in this process
    disk_bytes: int  # the checkpoint, 0 when it is already there
    body_quantized: bool = False

    @property
    def ram_bytes(self) -> int:
        return max(self.write_peak if self.disk_bytes else 0, self.split_peak, self.local_peak)


def _linear_bytes(fmt: WeightFormat, out: int, inp: int) -> int:
    if fmt.bits == 8:
        return out * inp + 2 * out  # int8 weights, a bf16 scale per row
    if fmt.bits == 4:
        return out * inp // 2 + 4 * out * (inp // fmt.group_size)  # packed nibbles, a bf16 scale and zero per group
    return out * inp * fmt.dtype.itemsize


def _layers_bytes(spec: SyntheticSpec, fmt: WeightFormat, count: int, as_fp32: bool = False) -> int:
    """Bytes of `count` decoder layers in `fmt` (as_fp32: their linear weights in fp32, as loading holds them
    before quantizing)."""
    d, f = spec.hidden, spec.ffn
    linears = [(d, d)] * 4 + [(f, d), (f, d), (d, f)]
    if as_fp32:
        return count * sum(4 * o * i for o, i in linears)
    return count * (sum(_linear_bytes(fmt, o, i) for o, i in linears) + 2 * d * fmt.dtype.itemsize)


def _load_extra(spec: SyntheticSpec, fmt: WeightFormat, layers: int, lm_head: bool = False) -> int:
    """Bytes a part takes while it loads over what it holds after. A quantized part is loaded in fp32 and
    quantized after, one layer at a time (models/llm.py), and quantizing a matrix makes two fp32
    temporaries of its size; the LM head is one such matrix on its own."""
    if not fmt.quantized:
        return READ_BYTES
    widest = 4 * spec.hidden * max(spec.hidden, spec.ffn)
    stack = _layers_bytes(spec, fmt, 1, as_fp32=True) + 2 * widest if layers else 0
    return max(stack, 3 * 4 * spec.vocab * spec.hidden if lm_head else 0)


def estimate(spec: SyntheticSpec, split: Split, body: WeightFormat, device: WeightFormat, written: bool) -> Estimate:
    """What the three steps need, from the shape and formats alone (checked against measured peaks: within
    10% above them at 7B widths)."""
    vd, d = spec.vocab * spec.hidden, spec.hidden
    embed = vd * (device.table.itemsize)  # a quantized head looks up fp16 rows
    head = embed + _layers_bytes(spec, device, split.x)
    # a quantized LM head keeps its rows in fp16 too, to rescore its top logits (untied: a table of its own)
    tail = (_layers_bytes(spec, device, split.n - split.y) + d * device.dtype.itemsize
            + _linear_bytes(device, spec.vocab, d) + (vd * device.table.itemsize if device.quantized else 0))
    device_bytes, body_bytes = head + tail, _layers_bytes(spec, body, split.y - split.x)
    device_extra = _load_extra(spec, device, max(split.x, split.n - split.y), lm_head=True)
    body_extra = _load_extra(spec, body, split.y - split.x)
    server = body_bytes + PROCESS_BYTES
    client_load = device_bytes + device_extra + PROCESS_BYTES
    return Estimate(
        device_bytes=device_bytes, body_bytes=body_bytes,
        write_peak=SHARD_BYTES + 3 * 4 * vd + PROCESS_BYTES,  # a shard, then a V x D tensor in fp32 and its digest
        split_peak=max(server + body_extra, server + client_load),
        local_peak=device_bytes + max(device_extra, body_bytes + body_extra) + PROCESS_BYTES,
        disk_bytes=0 if written else spec.checkpoint_bytes, body_quantized=body.quantized)


def check_resources(need: Estimate, cache: Path) -> tuple[str, NotEnoughResources | None]:
    """One line saying what the bench needs and what is free, and the refusal when it would not fit."""
    ram = psutil.virtual_memory().available
    existing = cache
    while not existing.exists():
        existing = existing.parent
    disk = shutil.disk_usage(existing).free
    line = (f"needs about {need.ram_bytes / GiB:.1f} GiB of memory at its peak (write {need.write_peak / GiB:.1f}, "
            f"split {need.split_peak / GiB:.1f}, local-only {need.local_peak / GiB:.1f}) and "
            f"{need.disk_bytes / GiB:.1f} GiB of disk; this machine has {ram / GiB:.1f} GiB of memory available "
            f"and {disk / GiB:.1f} GiB free in {existing}")
    problems = []
    if need.ram_bytes > ram:
        problems.append(f"{need.ram_bytes / GiB:.1f} GiB of memory, {ram / GiB:.1f} GiB available")
    if need.disk_bytes > disk:
        problems.append(f"{need.disk_bytes / GiB:.1f} GiB of disk, {disk / GiB:.1f} GiB free")
    if not problems:
        return line, None
    hint = ("; --body-weights int8 holds the body in half the memory of bf16" if not need.body_quantized else "")
    return line, NotEnoughResources(f"bench paper-scale would need {' and '.join(problems)}: free some, or try a "
                                    f"smaller shape (--layers, --hidden) or --device-weights int4{hint}")


# ---- the two runs ------------------------------------------------------------------------------

@dataclass
class SplitRun:
    ids: list[int]
    tokens_per_s: float
    prefill_s: float
    client_rss_bytes: int  # this process (the device), after decoding
    client_peak_rss_bytes: int | None  # since the run began (Linux only)
    server_rss_bytes: int  # the body server, as its /v1/info reports it
    server_peak_rss_bytes: int | None
    device_parameter_bytes: int
    body_parameter_bytes: int
    device_share: float  # of the model's bytes (device + body), as each side holds them
    up_bytes_per_token: float  # at the sockets, decode steps only
    down_bytes_per_token: float
    up_bytes: int  # the whole generation: session, prompt, decode
    down_bytes: int


@dataclass
class LocalRun:
    ids: list[int]
    tokens_per_s: float
    prefill_s: float
    rss_bytes: int
    peak_rss_bytes: int | None
    parameter_bytes: int


def run_split(folder: Path, split: Split, body: str, device: str, ids: list[int], tokens: int,
              env: dict | None = None, where: str = "cpu") -> SplitRun:
    """(b): the body in a server process (`env` added to its environment), the head and tail here, an fp32 wire;
    the server stops at the end."""
    _reset_peak()
    with ServerProcess(str(folder), str(split), "--weights", body, "--device", where, env=env,
                       startup_timeout=3600) as server:
        client = SplitClient(folder, server=server.url, split=(split.x, split.y), wire="fp32", speculate="off",
                             weights=device, device=where, body_weights=body)
        stats, marks, out = GenerationStats(), [], []
        for token in client.generate_ids(ids, max_new_tokens=tokens, stats=stats, stop_at_eos=False):
            out.append(token)
            if len(out) in (1, tokens):  # after the prompt's step, and after the last decode step
                marks.append(stats.body.measured())
        with BodyConnection(server.url, transport="http") as conn:
            info = conn.info()
        server_peak = _peak_rss(server.proc.pid)
        device_bytes = client.model.parameter_report()["total"]["bytes"]
        steps = tokens - 1
        run = SplitRun(
            ids=out, tokens_per_s=stats.tokens_per_s, prefill_s=stats.prefill_s,
            client_rss_bytes=psutil.Process().memory_info().rss, client_peak_rss_bytes=_peak_rss(),
            server_rss_bytes=info.rss_bytes, server_peak_rss_bytes=server_peak,
            device_parameter_bytes=device_bytes, body_parameter_bytes=info.parameter_bytes,
            device_share=device_bytes / (device_bytes + info.parameter_bytes),
            up_bytes_per_token=(marks[-1].socket_up - marks[0].socket_up) / steps,
            down_bytes_per_token=(marks[-1].socket_down - marks[0].socket_down) / steps,
            up_bytes=stats.traffic.socket_up, down_bytes=stats.traffic.socket_down)
        del client
    _release_memory()
    return run


class _CastBody:
    """A local body in its own format: the state goes in in the body's dtype and comes back in the device's,
    as the server casts a frame and the client casts its reply."""

    def __init__(self, body: LocalBody, dtype, out_dtype):
        self.body, self.dtype, self.out_dtype = body, dtype, out_dtype

    def forward(self, hidden, pos: int):
        return self.body.forward(hidden.to(self.dtype), pos).to(self.out_dtype)


def run_local(folder: Path, split: Split, body: str, device: str, ids: list[int], tokens: int,
              where: str = "cpu") -> LocalRun:
    """(c): head, body and tail in this process, each in its format (the device's parts load first: the body's
    load then has only its own transient)."""
    _reset_peak()
    device_parts = load_split(folder, split.x, split.y, parts=("head", "tail"), weights=device, device=where)
    body_part = load_split(folder, split.x, split.y, parts=("body",), weights=body, device=where)
    stats, sampler = GenerationStats(), Sampler()  # greedy
    step = Stepper(device_parts, _CastBody(LocalBody(body_part.body), body_part.dtype, device_parts.dtype), True, stats)
    t0 = time.perf_counter()
    out = [sampler(step(ids))]
    t1 = time.perf_counter()
    while len(out) < tokens:
        out.append(sampler(step([out[-1]])))
    decode_s = time.perf_counter() - t1
    run = LocalRun(ids=out, tokens_per_s=(tokens - 1) / decode_s if decode_s > 0 else 0.0, prefill_s=t1 - t0,
                   rss_bytes=psutil.Process().memory_info().rss, peak_rss_bytes=_peak_rss(),
                   parameter_bytes=device_parts.parameter_report()["total"]["bytes"]
                   + body_part.parameter_report()["total"]["bytes"])
    del step, device_parts, body_part
    _release_memory()
    return run


def _reset_peak() -> None:
    """Start this process's peak-memory count afresh (Linux: clear_refs 5 resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss(pid: int | str = "self") -> int | None:
    """A process's peak resident memory (VmHWM) in bytes, where /proc tells it."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _release_memory() -> None:
    """Hand freed weights back to the OS before the next step loads its own (glibc keeps freed heap otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ---- the bench ---------------------------------------------------------------------------------

@dataclass
class Report:
    config: dict
    split: str
    body_weights: str
    device_weights: str
    prompt_tokens: int
    tokens: int
    threads: int  # torch threads of each process
    checkpoint: dict
    estimate: dict
    split_run: SplitRun
    local_run: LocalRun
    exact: bool
    meta: dict = field(default_factory=machine_meta)


def spec_from_args(args) -> SyntheticSpec:
    return PRESETS[args.config].with_overrides(layers=args.layers, hidden=args.hidden, heads=args.heads,
                                               ffn=args.ffn, vocab=args.vocab, seed=args.seed)


def default_split(layers: int) -> str:
    """The paper's 2:30 of 32 layers, in proportion for other depths (at least one layer each side)."""
    x = max(1, round(layers / 16))
    return f"{x}:{layers - x}"


def run_paper_scale(args) -> Report | None:
    if args.tokens < 2:
        raise ValueError(f"--tokens must be at least 2 (decode speed counts the tokens after the first), "
                         f"got {args.tokens}")
    spec = spec_from_args(args)
    split = Split.parse(args.split or default_split(spec.layers), spec.layers)
    body_fmt, device_fmt = parse_format(args.body_weights), parse_format(args.device_weights)
    folder = checkpoint_folder(spec)
    need = estimate(spec, split, body_fmt, device_fmt, is_complete(folder, spec))
    print(f"bench paper-scale: {_describe(spec)}, random weights (seed {spec.seed}); split {split}: body in "
          f"{body_fmt.name} on a server, head and tail in {device_fmt.name} here; {args.tokens} greedy tokens",
          flush=True)
    line, refusal = check_resources(need, folder.parent)
    print(f"it holds {_size(need.device_bytes)} on the device and {_size(need.body_bytes)} in the body; it {line}",
          flush=True)
    if refusal is not None:
        raise refusal
    if args.dry_run:
        return None
    if args.threads:  # every process computes on as many threads; and the same kernels give the same bits
        torch.set_num_threads(args.threads)
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)} if args.threads else None
    started = time.perf_counter()
    _reset_peak()
    folder, written = ensure_checkpoint(spec)
    checkpoint = {"folder": str(folder), "bytes": spec.checkpoint_bytes, "parameters": spec.parameters,
                  "written_now": written, "write_s": round(time.perf_counter() - started, 1) if written else None,
                  "write_peak_rss_bytes": _peak_rss() if written else None}
    how = f"written in {checkpoint['write_s']} s" if written else "reused"
    print(f"(a) checkpoint: {folder} ({how})", flush=True)
    _release_memory()
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)(args.prompt)["input_ids"]
    print(f"(b) split {split} through a body server ...", flush=True)
    where = str(resolve_device(args.device))
    split_run = run_split(folder, split, body_fmt.name, device_fmt.name, ids, args.tokens, env, where)
    print("(c) local-only, in this process ...", flush=True)
    local_run = run_local(folder, split, body_fmt.name, device_fmt.name, ids, args.tokens, where)
    report = Report(config=asdict(spec), split=str(split), body_weights=body_fmt.name,
                    device_weights=device_fmt.name, prompt_tokens=len(ids), tokens=args.tokens,
                    threads=args.threads or torch.get_num_threads(),
                    checkpoint=checkpoint, estimate={**asdict(need), "ram_bytes": need.ram_bytes},
                    split_run=split_run, local_run=local_run, exact=split_run.ids == local_run.ids)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=2))
        print(f"written: {args.json}")
    return report


def _describe(spec: SyntheticSpec) -> str:
    count = f"{spec.parameters / 1e9:.2f} B" if spec.parameters >= 1e9 else f"{spec.parameters / 1e6:.2f} M"
    shape = (f"{spec.layers} layers, D = {spec.hidden}, {spec.heads} heads, FFN {spec.ffn}, vocabulary {spec.vocab}, "
             f"{count} parameters")
    same = spec.with_overrides(seed=0) == PRESETS["llama2-7b"]
    return f"Llama-2-7B's shape ({shape})" if same else f"a Llama of {shape}"


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / GiB:.2f} GiB" if n >= GiB // 10 else f"{n / (1 << 20):.1f} MiB"


def print_report(r: Report) -> None:
    s, loc = r.split_run, r.local_run
    print(f"\n{'':24} {'tokens/s':>9} {'prefill s':>10} {'RSS':>10} {'peak RSS':>10} {'weights':>10} "
          f"{'up B/token':>11} {'down B/token':>13}")
    print(f"{'split: device (here)':24} {s.tokens_per_s:9.3f} {s.prefill_s:10.2f} {_size(s.client_rss_bytes):>10} "
          f"{_size(s.client_peak_rss_bytes):>10} {_size(s.device_parameter_bytes):>10} {s.up_bytes_per_token:11.0f} "
          f"{s.down_bytes_per_token:13.0f}")
    print(f"{'split: body server':24} {'':9} {'':10} {_size(s.server_rss_bytes):>10} "
          f"{_size(s.server_peak_rss_bytes):>10} {_size(s.body_parameter_bytes):>10}")
    print(f"{'local-only (one process)':24} {loc.tokens_per_s:9.3f} {loc.prefill_s:10.2f} {_size(loc.rss_bytes):>10} "
          f"{_size(loc.peak_rss_bytes):>10} {_size(loc.parameter_bytes):>10}")
    print(f"\nthe device holds {s.device_share:.1%} of the model's bytes ({r.device_weights} head and tail, "
          f"{r.body_weights} body); split / local-only speed: {s.tokens_per_s / loc.tokens_per_s:.2f}x")
    print(f"traffic: {s.up_bytes / 1e3:.1f} kB up and {s.down_bytes / 1e3:.1f} kB down in all ({r.prompt_tokens} "
          f"prompt tokens, {r.tokens} new), counted at the client's sockets with HTTP and WebSocket headers")
    verdict = "yes" if r.exact else "NO"
    print(f"exact (fp32 wire): {verdict}: split {s.ids} vs local-only {loc.ids}")
    print("RSS: resident memory after decoding; peak: the largest during the run (the server's since it started). "
          "Random weights: the text means nothing; memory, speed and traffic do.")
