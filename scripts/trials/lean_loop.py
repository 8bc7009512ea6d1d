"""One-off trial behind docs/devices.md ("How far a leaner loop gets"): the stock layer loop against a lean one
(fused QKV and gate/up products, F.rms_norm, a preallocated KV cache) on the same weights, unsplit, then the
products, norms, attention and LM head timed alone. Not a lambdasplit command.

    .venv/bin/python scripts/trials/lean_loop.py float32   # or float16, bfloat16
"""
import time, torch, torch.nn.functional as F, sys
from lambdasplit.models.llm import load_split, resolve_split
torch.set_num_threads(2)
fmt = sys.argv[1] if len(sys.argv) > 1 else "float32"
folder, config, split = resolve_split(None, "1:29")
m = load_split(folder, 0, 30, parts=("head","body","tail"), weights=fmt)  # all layers in tail
head, tail = m.head, m.tail
dt = m.dtype
ids = torch.tensor([[1, 2, 3, 4, 5]])
def hf_run(n):
    cache = tail.layers.new_cache()
    h = m.body(head(ids, None, 0), cache, 0)
    logits = tail(h, cache, 0)
    out=[]
    t=time.perf_counter()
    pos = ids.shape[1]
    for i in range(n):
        nxt = logits[:, -1].argmax(-1, keepdim=True); out.append(int(nxt))
        logits = tail(m.body(head(nxt, None, pos), cache, pos), cache, pos); pos += 1
    return out, n/(time.perf_counter()-t)
# lean
L = m.body.layers.layers
eps = config.rms_norm_eps
nh, nkv, hd = config.num_attention_heads, config.num_key_value_heads, config.hidden_size // config.num_attention_heads
class Lean:
    def __init__(s, layer):
        a, mlp = layer.self_attn, layer.mlp
        s.w1 = layer.input_layernorm.weight; s.w2 = layer.post_attention_layernorm.weight
        s.qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).contiguous()
        s.o = a.o_proj.weight
        s.gu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).contiguous()
        s.d = mlp.down_proj.weight
lean = [Lean(l) for l in L]
def rope(x, cos, sin):
    x1, x2 = x[..., :hd//2], x[..., hd//2:]
    return x * cos + torch.cat((-x2, x1), -1) * sin
def lean_step(x, K, V, pos, cos, sin):
    for i, l in enumerate(lean):
        h = F.rms_norm(x, (x.shape[-1],), l.w1, eps)
        qkv = F.linear(h, l.qkv)
        q = qkv[..., :nh*hd].view(1, 1, nh, hd).transpose(1, 2)
        k = qkv[..., nh*hd:(nh+nkv)*hd].view(1, 1, nkv, hd).transpose(1, 2)
        v = qkv[..., (nh+nkv)*hd:].view(1, 1, nkv, hd).transpose(1, 2)
        q = rope(q, cos, sin); k = rope(k, cos, sin)
        K[i][:, :, pos:pos+1] = k; V[i][:, :, pos:pos+1] = v
        a = F.scaled_dot_product_attention(q, K[i][:, :, :pos+1], V[i][:, :, :pos+1], enable_gqa=True)
        x = x + F.linear(a.transpose(1, 2).reshape(1, 1, nh*hd), l.o)
        h = F.rms_norm(x, (x.shape[-1],), l.w2, eps)
        g, u = F.linear(h, l.gu).chunk(2, -1)
        x = x + F.linear(F.silu(g) * u, l.d)
    return x
def lean_run(n, first):
    # prefill with HF to fill caches? simpler: run lean token-by-token for the prompt too
    K = [torch.zeros(1, nkv, 512, hd, dtype=dt) for _ in lean]; V = [torch.zeros_like(k) for k in K]
    rot = tail.layers.rotary
    out=[]; pos=0; tok = ids[0].tolist()
    def step(t, pos):
        x = head.embed(torch.tensor([[t]])).to(dt)
        cos, sin = rot(x, torch.tensor([[pos]]))
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        x = lean_step(x, K, V, pos, cos, sin)
        return tail.lm_head(tail.norm(x))
    for t in tok: logits = step(t, pos); pos += 1
    tm=time.perf_counter()
    for i in range(n):
        nxt = int(logits[0, -1].argmax()); out.append(nxt)
        logits = step(nxt, pos); pos += 1
    return out, n/(time.perf_counter()-tm)
with torch.inference_mode():
    for r in range(2):
        a, ta = hf_run(64); b, tb = lean_run(64, None)
        print(fmt, "hf %.1f tok/s  lean %.1f tok/s  same=%s" % (ta, tb, a == b), sum(x==y for x,y in zip(a,b)))
def bench(f, n=50):
    for _ in range(5): f()
    t=time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter()-t)/n*1e3
with torch.inference_mode():
    x = torch.randn(1,1,config.hidden_size, dtype=dt)
    def lin():
        for l in lean:
            F.linear(x, l.qkv); F.linear(x, l.o); g = F.linear(x, l.gu); F.linear(g[..., :l.d.shape[1]], l.d)
    W = [ (l.qkv.t().contiguous(), l.o.t().contiguous(), l.gu.t().contiguous(), l.d.t().contiguous()) for l in lean]
    def mm():
        for a,b,c,d in W:
            x@a; x@b; g = x@c; g[..., :d.shape[0]]@d
    nbytes = sum(t.numel()*t.element_size() for l in lean for t in (l.qkv,l.o,l.gu,l.d))
    for name, f in (("linear", lin), ("x@Wt", mm)):
        ms = bench(f); print(name, "%.2f ms for 30 layers, %.1f GB/s (%.0f MB)" % (ms, nbytes/ms/1e6, nbytes/1e6))
    xs = torch.randn(1,1,config.hidden_size, dtype=dt)
    def norms():
        for l in lean: F.rms_norm(xs, (xs.shape[-1],), l.w1, eps)
    print("rms_norm x30 %.3f ms" % bench(norms))
    K = torch.zeros(1, nkv, 512, hd, dtype=dt); q = torch.randn(1, nh, 1, hd, dtype=dt)
    print("sdpa x30 %.3f ms" % bench(lambda: [F.scaled_dot_product_attention(q, K[:, :, :70], K[:, :, :70], enable_gqa=True) for _ in range(30)]))
    print("lm_head %.3f ms" % bench(lambda: tail.lm_head(xs)))
