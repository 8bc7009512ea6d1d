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
from ..models.llm import Split, load_config
from ..models.source import model_name, resolve_model
from ..server.process import ServerProcess


@dataclass
class Row:
    name: str
    tokens_per_s: float
    ms_per_token: float
    ratio: float = 0.0
    up_bytes: int = 0
    down_bytes: int = 0
    same_tokens_as_local: bool | None = None


def _best(client: SplitClient, ids: list[int], tokens: int, repeats: int) -> tuple[GenerationStats, list[int]]:
    best, out = None, []
    for _ in range(repeats):
        stats = GenerationStats()
        out = list(client.generate_ids(ids, max_new_tokens=tokens, stats=stats, stop_at_eos=False))
        if best is None or stats.tokens_per_s > best.tokens_per_s:
            best = stats
    return best, out


def run_decode_bench(args) -> list[Row]:
    folder = resolve_model(args.model)
    config = load_config(folder)
    x, y = (int(v) for v in args.split.split(":"))
    split = Split.resolve(x, y, config.num_hidden_layers)
    print(f"bench decode: {model_name(folder)}, split {split} of {split.n} layers, {args.tokens} new tokens, "
          f"best of {args.repeats}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}", flush=True)
    rows: list[Row] = []

    local = SplitClient(folder, server=None, split=(split.x, split.y))
    ids = local.encode_prompt(args.prompt)
    stats, reference = _best(local, ids, args.tokens, args.repeats)
    rows.append(Row("local (unsplit, in-process)", stats.tokens_per_s, 1000 / stats.tokens_per_s))
    del local

    rows.append(_hf_row(folder, ids, args.tokens, args.repeats, reference))

    with ServerProcess(str(folder), f"{split.x}:{split.y}") as server:
        for wire in ("fp32", "fp16"):
            client = SplitClient(folder, server=server.url, split=(split.x, split.y), wire=wire)
            stats, tokens = _best(client, ids, args.tokens, args.repeats)
            t = stats.traffic
            rows.append(Row(f"split over loopback, {wire} wire", stats.tokens_per_s, 1000 / stats.tokens_per_s,
                            up_bytes=t.socket_up, down_bytes=t.socket_down,
                            same_tokens_as_local=tokens == reference))
    for row in rows:
        row.ratio = row.tokens_per_s / rows[0].tokens_per_s
    _print(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": model_name(folder), "split": str(split), "tokens": args.tokens,
                       "prompt_tokens": len(ids), "rows": [asdict(r) for r in rows]}, f, indent=2)
    return rows


def _hf_row(folder, ids, tokens, repeats, reference) -> Row:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = torch.tensor([ids])
    best = 0.0
    out = []
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.generate(prompt, max_new_tokens=1, do_sample=False, eos_token_id=None)
            t1 = time.perf_counter()
            out = model.generate(prompt, max_new_tokens=tokens, do_sample=False, eos_token_id=None)
            t2 = time.perf_counter()
            # subtract the prefill + first token, measured separately, to compare decode speed alone
            best = max(best, (tokens - 1) / max((t2 - t1) - (t1 - t0), 1e-9))
    return Row("transformers generate (unsplit)", best, 1000 / best,
               same_tokens_as_local=out[0, len(ids):].tolist() == reference)


def _print(rows: list[Row]) -> None:
    print(f"\n{'':34} {'tokens/s':>9} {'ms/token':>9} {'× local':>8} {'up kB':>8} {'down kB':>8}  same tokens")
    for r in rows:
        same = "" if r.same_tokens_as_local is None else ("yes" if r.same_tokens_as_local else "NO")
        print(f"{r.name:34} {r.tokens_per_s:9.2f} {r.ms_per_token:9.1f} {r.ratio:8.2f} "
              f"{r.up_bytes / 1e3:8.1f} {r.down_bytes / 1e3:8.1f}  {same}")
    print("\nbytes are counted at the client's sockets (kernel TCP counters), HTTP and WebSocket headers included.")
