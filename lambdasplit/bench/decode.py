"""`lambdasplit bench decode`: is the split as fast as the unsplit model on the same machine?

Rows, in one run, each the best of `--repeats`:
  local     the whole model in this process, same decode loop, no network (the baseline)
  hf        transformers' model.generate on the unsplit model, for reference
  split-*   head and tail here, body in a server subprocess on loopback, per wire codec

Decode speed counts the tokens after the first over the time they took (prefill excluded).
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass

import torch

from ..client.generate import GenerationStats, SplitClient
from ..models.llm import resolve_split
from ..models.source import model_name
from ..server.process import ServerProcess
from ..wire.spec import DEFAULT_WIRE


@dataclass
class Row:
    name: str
    tokens_per_s: float
    ms_per_token: float
    ratio: float = 0.0
    up_bytes: int = 0
    down_bytes: int = 0
    same_tokens_as_local: bool | None = None
    device_ms: float | None = None  # per generated token, prefill included
    network_ms: float | None = None
    cloud_ms: float | None = None


def _decode(client: SplitClient, ids: list[int], tokens: int) -> tuple[GenerationStats, list[int]]:
    stats = GenerationStats()
    out = list(client.generate_ids(ids, max_new_tokens=tokens, stats=stats, stop_at_eos=False))
    return stats, out


def run_decode_bench(args) -> list[Row]:
    folder, _, split = resolve_split(args.model, args.split)
    print(f"bench decode: {model_name(folder)}, split {split} of {split.n} layers, {args.tokens} new tokens, "
          f"best of {args.repeats} interleaved runs; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}", flush=True)

    with ServerProcess(str(folder), f"{split.x}:{split.y}") as server:
        local = SplitClient(folder, server=None, split=(split.x, split.y), speculate="off")
        ids = local.encode_prompt(args.prompt)
        runners = {"local (unsplit, in-process)": lambda: _decode(local, ids, args.tokens)}
        hf = _HFRunner(folder, ids, args.tokens)
        runners["transformers generate (unsplit)"] = hf
        for wire in dict.fromkeys(("fp32", "fp16", DEFAULT_WIRE)):  # and the default codec, if it is another
            client = SplitClient(folder, server=server.url, split=(split.x, split.y), wire=wire,
                                 speculate="off")  # plain decode: see bench speculative
            runners[f"split over loopback, {wire} wire"] = (lambda c=client: _decode(c, ids, args.tokens))
        best: dict[str, tuple[GenerationStats, list[int]]] = {}
        # rows take turns, so that drift in the machine's load touches every row alike
        for _ in range(args.repeats):
            for name, run in runners.items():
                stats, out = run()
                if name not in best or stats.tokens_per_s > best[name][0].tokens_per_s:
                    best[name] = (stats, out)

    reference = best["local (unsplit, in-process)"][1]
    rows = []
    for name, (stats, out) in best.items():
        t = stats.traffic
        row = Row(name, stats.tokens_per_s, 1000 / stats.tokens_per_s,
                  up_bytes=t.socket_up if t else 0, down_bytes=t.socket_down if t else 0,
                  same_tokens_as_local=None if name.startswith("local") else out == reference)
        if not isinstance(runners[name], _HFRunner):
            per_token = 1000 / stats.new_tokens
            row.device_ms, row.network_ms, row.cloud_ms = (stats.device_s * per_token, stats.network_s * per_token,
                                                           stats.cloud_s * per_token)
        rows.append(row)
    for row in rows:
        row.ratio = row.tokens_per_s / rows[0].tokens_per_s
    _print(rows)
    weight_bytes = _weights_read_per_token(local)
    print(f"\nlocal decode reads {weight_bytes / 1e6:.0f} MB of weights per token (all layers and the LM head; the "
          f"embedding is a lookup): {weight_bytes * rows[0].tokens_per_s / 1e9:.1f} GB/s of weight traffic.")
    stream, gemv = _memory_probe(local.model.tail.lm_head.weight)
    print(f"this machine: a streaming read (tensor.sum) reaches {stream:.1f} GB/s; torch's fp32 matrix-vector "
          f"product on the LM head ({local.model.tail.lm_head.weight.numel() * 4 / 1e6:.0f} MB, as in decoding) "
          f"reaches {gemv:.1f} GB/s.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": model_name(folder), "split": str(split), "tokens": args.tokens,
                       "prompt_tokens": len(ids), "rows": [asdict(r) for r in rows]}, f, indent=2)
    return rows


class _HFRunner:
    """transformers' own generate() on the unsplit model, timed like the other rows (decode only)."""

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


def _weights_read_per_token(client: SplitClient) -> int:
    model = client.model
    parts = [model.head.layers, model.body.layers, model.tail.layers, model.tail.norm, model.tail.lm_head]
    return sum(p.numel() * p.element_size() for part in parts for p in part.parameters())


def _memory_probe(weight: torch.Tensor, seconds: float = 1.0) -> tuple[float, float]:
    """GB/s of a plain streaming read, and of the 1-row matrix product decoding does, on a DRAM-sized matrix."""
    big = torch.ones(128 << 20, dtype=torch.float32)  # 512 MB: far past any cache
    x = torch.ones(1, weight.shape[1], dtype=weight.dtype)

    def rate(fn, nbytes: int) -> float:
        fn()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            fn()
            n += 1
        return nbytes * n / (time.perf_counter() - start) / 1e9

    with torch.inference_mode():
        return (rate(big.sum, big.numel() * 4),
                rate(lambda: torch.nn.functional.linear(x, weight), weight.numel() * weight.element_size()))


def _print(rows: list[Row]) -> None:
    width = max(34, *(len(r.name) for r in rows))
    print(f"\n{'':{width}} {'tokens/s':>9} {'× local':>8} {'device':>7} {'network':>8} {'cloud':>7} "
          f"{'up kB':>8} {'down kB':>8}  same tokens")
    for r in rows:
        same = "" if r.same_tokens_as_local is None else ("yes" if r.same_tokens_as_local else "NO")
        split = ("".join(f" {v:{w}.1f}" for v, w in ((r.device_ms, 7), (r.network_ms, 8), (r.cloud_ms, 7)))
                 if r.device_ms is not None else f" {'':7} {'':8} {'':7}")
        print(f"{r.name:{width}} {r.tokens_per_s:9.2f} {r.ratio:8.2f}{split} "
              f"{r.up_bytes / 1e3:8.1f} {r.down_bytes / 1e3:8.1f}  {same}")
    print("\ndevice / network / cloud: ms per generated token (prefill included); 'cloud' is the body's compute\n"
          "(in-process for the local row), 'network' the rest of the wait for the body: sockets, framing, the\n"
          "server's event loop, and the wire codecs' encoding and decoding. Bytes are counted at the client's\n"
          "sockets (kernel TCP counters), HTTP and WebSocket headers included. Device and body share this\n"
          "machine's cores, and take turns.")
