"""`lambdasplit bench decode`: decode speed and fidelity of every weight format, unsplit and split.

Rows, in one run, taking turns (each the best of `--repeats`):
  local FMT    the whole model in this process, in weight format FMT (models/formats.py)
  split FMT    head and tail here and the body in a loopback server, both sides in FMT
  ... compiled the same with `--compile` on both sides (models/compiled.py), for the formats of `--compiled`
  transformers generate (fp32), and llama.cpp on the same GGUF file with the same threads (when
  `llama-cpp-python` is installed: pip install llama-cpp-python; never needed by the tests)

Decode speed counts the tokens after the first over the time they took (prefill excluded). Agreement is
teacher-forced: fp32's greedy continuations of four prompts are fed to each format, and the share of
positions where its greedy choice is fp32's is reported. Weight bytes per token are what one decode step
reads (every layer, the norm and the LM head; the embedding is a lookup), and their rate is given as a
share of the streaming bandwidth this run measures.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass

import torch

from ..client.generate import GenerationStats, SplitClient
from ..data import AGREEMENT_PROMPTS
from ..models.device import device_name, resolve_device
from ..models.formats import parse_format
from ..models.llm import SplitModel, resolve_split
from ..models.source import DEFAULT_MODEL, _embedded_gguf, model_name
from ..server.process import ServerProcess

TARGET_AGREEMENT = 0.99


@dataclass
class Row:
    name: str
    weights: str
    tokens_per_s: float
    ms_per_token: float
    vs_fp32_split: float = 0.0
    agreement: float | None = None  # teacher-forced greedy agreement with fp32
    weight_mb_per_token: float | None = None
    stream_fraction: float | None = None  # weight traffic at this speed over the measured streaming rate
    up_bytes: int = 0
    down_bytes: int = 0
    same_tokens_as_local: bool | None = None  # a split row: the same tokens as the local row of its format
    device_ms: float | None = None  # per generated token, prefill included
    network_ms: float | None = None
    cloud_ms: float | None = None


def _decode(client: SplitClient, ids: list[int], tokens: int) -> tuple[GenerationStats, list[int]]:
    stats = GenerationStats()
    out = list(client.generate_ids(ids, max_new_tokens=tokens, stats=stats, stop_at_eos=False))
    return stats, out


def run_decode_bench(args) -> list[Row]:
    formats = [parse_format(f).name for f in args.formats.split(",")]
    formats = ["fp32", *(f for f in dict.fromkeys(formats) if f != "fp32")]  # fp32 is the reference
    device = resolve_device(args.device)
    spec = args.model or DEFAULT_MODEL
    _, _, split = resolve_split(spec, args.split)
    where = f"{split.x}:{split.y}"
    print(f"bench decode: {spec}, split {split} of {split.n} layers, {args.tokens} new tokens, formats "
          f"{', '.join(formats)}, best of {args.repeats} interleaved runs; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {device_name(device)}, {platform.processor() or platform.machine()}",
          flush=True)
    compiled = [] if args.compiled in ("", "none") else [parse_format(f).name for f in args.compiled.split(",")]
    variants = [(fmt, False) for fmt in formats] + [(fmt, True) for fmt in dict.fromkeys(compiled)]
    with ExitStack() as stack:
        locals_, runners = {}, {}
        for fmt, compile_ in variants:
            label = f"{fmt} compiled" if compile_ else fmt
            if compile_:
                print(f"compiling {fmt}'s decode steps, here and in its body server (once; up to a minute each) ...",
                      flush=True)
            local = SplitClient(spec, server=None, split=(split.x, split.y), speculate="off", weights=fmt, device=device,
                                compile=compile_)
            locals_[label] = local
            server = stack.enter_context(ServerProcess(spec, where, "--weights", fmt, "--device", str(device),
                                                       *(["--compile"] if compile_ else [])))
            client = SplitClient(spec, server=server.url, split=(split.x, split.y), wire=args.wire, speculate="off",
                                 weights=fmt, device=device, compile=compile_)
            runners[("local", label)] = local
            runners[("split", label)] = client
        ids = locals_["fp32"].encode_prompt(args.prompt)
        calls = {key: (lambda c=client: _decode(c, ids, args.tokens)) for key, client in runners.items()}
        if not args.no_reference:
            calls[("transformers generate", "fp32")] = _HFRunner(locals_["fp32"].folder, ids, args.tokens)
        gguf = _gguf_of(spec)
        if gguf is not None and not args.no_reference and _has_llama_cpp():
            calls[("llama.cpp", "gguf")] = stack.enter_context(_LlamaCpp(gguf, ids, args.tokens))
        best: dict[tuple[str, str], tuple[GenerationStats, list[int]]] = {}
        for _ in range(args.repeats):  # rows take turns, so that drift in the machine's load touches all alike
            for key, call in calls.items():
                stats, out = call()
                if key not in best or stats.tokens_per_s > best[key][0].tokens_per_s:
                    best[key] = (stats, out)
        # teacher forcing runs whole sequences, which take the stock layers: a compiled row's agreement is its
        # format's (and its 'same tokens' column compares its tokens with the uncompiled row's)
        agreement = _agreement({fmt: locals_[fmt].model for fmt in formats}, locals_["fp32"], args.agree_tokens)
        stream = _stream_rate()
        rows = _rows(best, locals_, agreement, stream, gguf)
    _print(rows, stream, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": model_name(locals_["fp32"].folder), "split": str(split), "tokens": args.tokens,
                       "prompt_tokens": len(ids), "device": str(device), "threads": torch.get_num_threads(),
                       "stream_gb_s": stream, "rows": [asdict(r) for r in rows], "summary": _summary(rows)},
                      f, indent=2)
    return rows


def _rows(best, locals_, agreement, stream, gguf) -> list[Row]:
    rows = []
    for (kind, fmt), (stats, out) in best.items():
        t = stats.traffic
        row = Row(f"{kind} {fmt}" if kind in ("local", "split") else kind, fmt.removesuffix(" compiled"),
                  stats.tokens_per_s,
                  1000 / max(stats.tokens_per_s, 1e-9), up_bytes=t.socket_up if t else 0,
                  down_bytes=t.socket_down if t else 0)
        if kind in ("local", "split"):
            row.agreement = agreement[row.weights]
            row.weight_mb_per_token = locals_[fmt].model.weight_bytes_per_token() / 1e6
            per_token = 1000 / stats.new_tokens
            row.device_ms, row.network_ms, row.cloud_ms = (stats.device_s * per_token, stats.network_s * per_token,
                                                           stats.cloud_s * per_token)
        elif kind == "llama.cpp":
            row.weight_mb_per_token = gguf.stat().st_size / 1e6  # about all of the file, read once per token
        if row.weight_mb_per_token:
            row.stream_fraction = row.weight_mb_per_token * row.tokens_per_s / 1e3 / stream
        if kind == "split":
            row.same_tokens_as_local = out == best[("local", fmt)][1]
        elif kind == "local" and fmt != row.weights:  # compiled: the same tokens as the stock layers' local row?
            row.same_tokens_as_local = out == best[("local", row.weights)][1]
        rows.append(row)
    reference = next(r for r in rows if r.name == "split fp32").tokens_per_s
    for row in rows:
        row.vs_fp32_split = row.tokens_per_s / reference
    return rows


def _summary(rows: list[Row]) -> dict:
    """The fastest split format within the agreement bound, against the fp32 split and llama.cpp."""
    eligible = [r for r in rows if r.name.startswith("split") and (r.agreement or 0) >= TARGET_AGREEMENT]
    best = max(eligible, key=lambda r: r.tokens_per_s)
    llama = next((r for r in rows if r.name == "llama.cpp"), None)
    return {"fastest_split_within_bound": best.name.removeprefix("split "), "tokens_per_s": best.tokens_per_s,
            "vs_fp32_split": best.vs_fp32_split, "target_vs_fp32_split": 2.5,
            "vs_llama_cpp": best.tokens_per_s / llama.tokens_per_s if llama else None, "target_vs_llama_cpp": 0.5,
            "fastest_split_any": max((r for r in rows if r.name.startswith("split")),
                                     key=lambda r: r.tokens_per_s).name.removeprefix("split ")}


@torch.inference_mode()
def _agreement(models: dict[str, SplitModel], reference: SplitClient, tokens: int) -> dict[str, float]:
    """Teacher-forced greedy agreement of each format with fp32 over AGREEMENT_PROMPTS."""
    sequences = []
    for prompt in AGREEMENT_PROMPTS:
        ids = reference.encode_prompt(prompt)
        sequences.append((ids, list(reference.generate_ids(ids, max_new_tokens=tokens, stop_at_eos=False))))
    result = {}
    for fmt, model in models.items():
        same = total = 0
        for ids, out in sequences:
            cache = model.head.layers.new_cache()
            x = torch.tensor([ids + out], device=model.device)
            logits = model.tail(model.body(model.head(x, cache, 0), cache, 0), cache, 0, last_only=False)[0]
            chosen = logits[len(ids) - 1:len(ids) + len(out) - 1].argmax(-1).tolist()
            same += sum(a == b for a, b in zip(chosen, out))
            total += len(out)
        result[fmt] = same / total
    return result


class _HFRunner:
    """transformers' own generate() on the unsplit fp32 model, timed like the other rows (decode only)."""

    def __init__(self, folder, ids: list[int], tokens: int):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.prompt, self.tokens = torch.tensor([ids]), tokens
        # an explicit mask: without one, generate() infers padding from pad_token_id, which for SmolLM2 is
        # <|im_end|>, a real token of every chat prompt; eos_token_id=None runs all `tokens` steps
        self.options = dict(attention_mask=torch.ones_like(self.prompt), do_sample=False, eos_token_id=None)

    def __call__(self) -> tuple[GenerationStats, list[int]]:
        with torch.inference_mode():
            t0 = time.perf_counter()
            self.model.generate(self.prompt, max_new_tokens=1, **self.options)
            t1 = time.perf_counter()
            out = self.model.generate(self.prompt, max_new_tokens=self.tokens, **self.options)
            t2 = time.perf_counter()
        # the prefill and first token, timed on their own, are taken out: decode speed alone
        stats = GenerationStats(new_tokens=self.tokens, decode_s=max((t2 - t1) - (t1 - t0), 1e-9))
        return stats, out[0, self.prompt.shape[1]:].tolist()


def _gguf_of(spec: str):
    from pathlib import Path

    if spec == DEFAULT_MODEL:
        return _embedded_gguf(spec)
    return Path(spec) if str(spec).endswith(".gguf") else None


def _has_llama_cpp() -> bool:
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        print("(no llama.cpp row: pip install llama-cpp-python to add one)", flush=True)
        return False
    return True


class _LlamaCpp:
    """The llama.cpp row: bench/llamacpp.py in a child process, asked for one run per round."""

    def __init__(self, gguf, ids: list[int], tokens: int):
        cmd = [sys.executable, "-m", "lambdasplit.bench.llamacpp", str(gguf), "--threads", str(torch.get_num_threads()),
               "--tokens", str(tokens), "--ids", ",".join(map(str, ids))]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True)
        if not json.loads(self.proc.stdout.readline() or "{}").get("ready"):
            raise RuntimeError(f"llama.cpp did not load {gguf} (run: {' '.join(cmd)})")

    def __call__(self) -> tuple[GenerationStats, list[int]]:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        n = len(answer["tokens"])
        return GenerationStats(new_tokens=n, decode_s=(n - 1) / answer["tokens_per_s"]), answer["tokens"]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _stream_rate(seconds: float = 1.0) -> float:
    """GB/s of a plain streaming read of a DRAM-sized tensor (tensor.sum over 512 MB)."""
    big = torch.ones(128 << 20, dtype=torch.float32)
    big.sum()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        big.sum()
        n += 1
    return big.numel() * 4 * n / (time.perf_counter() - start) / 1e9


def _print(rows: list[Row], stream: float, args) -> None:
    width = max(22, *(len(r.name) for r in rows))
    print(f"\n{'':{width}} {'tokens/s':>9} {'× fp32 split':>12} {'agreement':>9} {'MB/token':>9} {'% stream':>8} "
          f"{'up kB':>8} {'down kB':>8}  same tokens")
    for r in rows:
        same = "" if r.same_tokens_as_local is None else ("yes" if r.same_tokens_as_local else "NO")
        agree = f"{r.agreement:9.1%}" if r.agreement is not None else f"{'':9}"
        mb = f"{r.weight_mb_per_token:9.0f}" if r.weight_mb_per_token else f"{'':9}"
        share = f"{r.stream_fraction:8.0%}" if r.stream_fraction else f"{'':8}"
        print(f"{r.name:{width}} {r.tokens_per_s:9.2f} {r.vs_fp32_split:12.2f} {agree} {mb} {share} "
              f"{r.up_bytes / 1e3:8.1f} {r.down_bytes / 1e3:8.1f}  {same}")
    s = _summary(rows)
    print(f"\nstreaming read: {stream:.1f} GB/s. agreement: teacher-forced greedy tokens equal to fp32's over "
          f"{len(AGREEMENT_PROMPTS)} prompts x {args.agree_tokens} tokens. 'same tokens': the split row gave its "
          f"local row's tokens ({args.wire} wire); a compiled local row, its format's uncompiled local row's.")
    vs_llama = f", {s['vs_llama_cpp']:.2f}x llama.cpp (target 0.5x)" if s["vs_llama_cpp"] else ""
    print(f"fastest split within {TARGET_AGREEMENT:.0%} agreement: {s['fastest_split_within_bound']} at "
          f"{s['tokens_per_s']:.1f} tokens/s = {s['vs_fp32_split']:.2f}x the fp32 split (target 2.5x){vs_llama}; "
          f"fastest split in any format: {s['fastest_split_any']}.")
