"""One-off trial behind docs/devices.md: does a per-group clipping search (the int4 range shrunk about its centre by
the ratio, of 1.0 down to 0.8, that rounds each group of 32 with the least squared error) raise int4's teacher-forced
agreement with fp32 over plain round-to-nearest? Four prompts, 128 tokens each, with the int4 LM head and with the
fp32 one.

    .venv/bin/python scripts/trials/int4_clip_search.py
"""
import torch, torch.nn as nn
from lambdasplit.models import formats
from lambdasplit.models.llm import load_split, resolve_split
from lambdasplit.bench.decode import AGREEMENT_PROMPTS
torch.set_num_threads(2)
folder, config, split = resolve_split(None, "1:29")
ref = load_split(folder, 1, 29, parts=("head","body","tail"), weights="fp32")
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(folder)
def run(model, x):
    cache = model.head.layers.new_cache()
    return model.tail(model.body(model.head(x, cache, 0), cache, 0), cache, 0, last_only=False)[0]
N = 128
orig_init = formats.Int4Linear.__init__
def quantize_search(w, group_size, ratios):
    n, k = w.shape
    g = w.reshape(n, k // group_size, group_size)
    low0, high0 = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    best_err = best = None
    for r in ratios:
        mid = (low0 + high0) / 2
        low, high = mid + (low0 - mid) * r, mid + (high0 - mid) * r
        scale = ((high - low) / 15).clamp(min=1e-8)
        q = ((g - low) / scale).round().clamp(0, 15)
        err = ((q * scale + low - g) ** 2).sum(-1, keepdim=True)
        if best is None:
            best_err, best = err, (low, scale)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = (torch.where(better, low, best[0]), torch.where(better, scale, best[1]))
    return best
RATIOS = None
def patched(self, layer, group_size):
    nn.Module.__init__(self)
    w = layer.weight.detach().float(); n, k = w.shape
    low, scale = quantize_search(w, group_size, RATIOS)
    g = w.reshape(n, k // group_size, group_size)
    q = ((g - low) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    zero = low + 8 * scale
    self.in_features, self.out_features, self.group_size = k, n, group_size
    self.on_cuda = False
    self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
    sz = torch.cat([scale.reshape(n, -1, 1), zero.reshape(n, -1, 1)], dim=-1).transpose(0, 1).contiguous()
    self.register_buffer("scales_and_zeros", sz.to(torch.bfloat16))
    self.register_buffer("bias", None if layer.bias is None else layer.bias.detach())
seqs = []
with torch.inference_mode():
    for p in AGREEMENT_PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
        if hasattr(ids, "input_ids"): ids = ids["input_ids"]
        ids = list(ids)
        for _ in range(N):
            l = run(ref, torch.tensor([ids]))[-1]; ids.append(int(l.argmax()))
        seqs.append((len(ids) - N, ids))
    def agree(model):
        same = tot = 0
        for n, ids in seqs:
            ch = run(model, torch.tensor([ids]))[n - 1:-1].argmax(-1).tolist()
            same += sum(a == b for a, b in zip(ch, ids[n:])); tot += len(ch)
        return same, tot
    for name, ratios in [("rtn", None), ("clip-search", [1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.8])]:
        if ratios is None:
            formats.Int4Linear.__init__ = orig_init
        else:
            RATIOS = ratios; formats.Int4Linear.__init__ = patched
        q = load_split(folder, 1, 29, parts=("head", "body", "tail"), weights="int4")
        print(name, "int4 all", agree(q), flush=True)
        lm = nn.Linear(576, 49152, bias=False); lm.weight = ref.tail.lm_head.weight
        q.tail.lm_head = lm
        print(name, "int4 + fp32 lm_head", agree(q), flush=True)
