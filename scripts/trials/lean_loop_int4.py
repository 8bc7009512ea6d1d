"""One-off trial behind docs/devices.md: the lean loop with int4 layers (groups of 32, bf16 kernel inputs) and an
fp16 LM head, unsplit. The first argument is the activations' dtype between products.

    .venv/bin/python scripts/trials/lean_loop_int4.py float32   # or bfloat16
"""
import time, torch, torch.nn as nn, torch.nn.functional as F, sys
from lambdasplit.models.llm import load_split, resolve_split
from lambdasplit.models.formats import Int4Linear
torch.set_num_threads(2)
act = getattr(torch, sys.argv[1] if len(sys.argv) > 1 else "float32")   # activation dtype between ops
folder, config, split = resolve_split(None, "1:29")
m = load_split(folder, 0, 30, parts=("head","body","tail"), weights="fp32")
L = m.body.layers.layers; eps = config.rms_norm_eps
nh, nkv, hd = config.num_attention_heads, config.num_key_value_heads, config.hidden_size // config.num_attention_heads
def _lin(w):
    l = nn.Linear(w.shape[1], w.shape[0], bias=False); l.weight = nn.Parameter(w, requires_grad=False); return l
def q4(w): return Int4Linear(_lin(w), 32)
class Lean:
    def __init__(s, layer):
        a, mlp = layer.self_attn, layer.mlp
        s.w1 = layer.input_layernorm.weight.to(act); s.w2 = layer.post_attention_layernorm.weight.to(act)
        s.qkv = q4(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
        s.o = q4(a.o_proj.weight); s.gu = q4(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])); s.d = q4(mlp.down_proj.weight)
lean = [Lean(l) for l in L]
def mm(x, lin):
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.view(1, -1) if x.dtype == torch.bfloat16 else x.view(1, -1).to(torch.bfloat16), lin.packed, 32, lin.scales_and_zeros).view(1, 1, -1).to(act)
def rope(x, cos, sin):
    x1, x2 = x[..., :hd//2], x[..., hd//2:]
    return x * cos + torch.cat((-x2, x1), -1) * sin
def lean_step(x, K, V, pos, cos, sin):
    for i, l in enumerate(lean):
        h = F.rms_norm(x, (x.shape[-1],), l.w1, eps)
        qkv = mm(h, l.qkv)
        q = qkv[..., :nh*hd].view(1, 1, nh, hd).transpose(1, 2)
        k = qkv[..., nh*hd:(nh+nkv)*hd].view(1, 1, nkv, hd).transpose(1, 2)
        v = qkv[..., (nh+nkv)*hd:].view(1, 1, nkv, hd).transpose(1, 2)
        q = rope(q, cos, sin); k = rope(k, cos, sin)
        K[i][:, :, pos:pos+1] = k; V[i][:, :, pos:pos+1] = v
        a = F.scaled_dot_product_attention(q, K[i][:, :, :pos+1], V[i][:, :, :pos+1], enable_gqa=True)
        x = x + mm(a.transpose(1, 2).reshape(1, 1, nh*hd), l.o)
        h = F.rms_norm(x, (x.shape[-1],), l.w2, eps)
        g, u = mm(h, l.gu).chunk(2, -1)
        x = x + mm(F.silu(g) * u, l.d)
    return x
lm = m.tail.lm_head.weight.half(); nw = m.tail.norm.weight.to(act)
rot = m.body.layers.rotary
def run(n, ids=[1,2,3,4,5]):
    K = [torch.zeros(1, nkv, 512, hd, dtype=act) for _ in lean]; V = [torch.zeros_like(k) for k in K]
    out=[]; pos=0
    def step(t, pos):
        x = m.head.embed(torch.tensor([[t]])).to(act)
        cos, sin = rot(x.float(), torch.tensor([[pos]]))
        x = lean_step(x, K, V, pos, cos.unsqueeze(1).to(act), sin.unsqueeze(1).to(act))
        return F.linear(F.rms_norm(x, (576,), nw, eps).half(), lm)
    for t in ids: logits = step(t, pos); pos += 1
    tm=time.perf_counter()
    for i in range(n):
        nxt = int(logits[0, -1].argmax()); out.append(nxt); logits = step(nxt, pos); pos += 1
    return out, n/(time.perf_counter()-tm)
with torch.inference_mode():
    for r in range(3): print(act, "lean int4 + fp16 lm: %.1f tok/s" % run(100)[1])
