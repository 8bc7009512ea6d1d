"""One-off trial behind docs/devices.md: decode speed (unsplit, stock layers, 64 greedy tokens after a 40-token
prompt, 3 interleaved repeats) of int4 layers with an int4 LM head, the same layers with the fp32 LM head, and fp32.

    .venv/bin/python scripts/trials/int4_head_speed.py
"""
import time
import torch, torch.nn as nn
from lambdasplit.models.llm import load_split, resolve_split
torch.set_num_threads(2)
folder, config, split = resolve_split(None, "1:29")
ref = load_split(folder, 1, 29, parts=("head", "body", "tail"), weights="fp32")
q = load_split(folder, 1, 29, parts=("head", "body", "tail"), weights="int4")
qhead = q.tail.lm_head
lm = nn.Linear(576, 49152, bias=False); lm.weight = ref.tail.lm_head.weight
def decode(m, n=64):
    cache = m.head.layers.new_cache()
    ids = torch.tensor([[1] * 40])
    logits = m.tail(m.body(m.head(ids, cache, 0), cache, 0), cache, 0)
    pos = 40; t = time.perf_counter()
    for _ in range(n):
        nxt = logits[0, -1].argmax().view(1, 1)
        logits = m.tail(m.body(m.head(nxt, cache, pos), cache, pos), cache, pos); pos += 1
    return (time.perf_counter() - t) / n * 1e3
with torch.inference_mode():
    for r in range(3):
        q.tail.lm_head = qhead; a = decode(q)
        q.tail.lm_head = lm; b = decode(q)
        c = decode(ref)
        print(f"int4 head {a:.1f} ms, fp32 head {b:.1f} ms, fp32 all {c:.1f} ms", flush=True)
