"""One-off trial: does a torch.compile'd (inductor, C++ CPU) fixed-shape decode step remove the per-op overhead of
the lean loop (scripts/trials/lean_loop*.py)? Not a lambdasplit command.

One decode step over a STATIC KV cache (K, V: (layers, kv_heads, MAXLEN, head_dim), written by index_copy_ at a
position given as a tensor, attention over all MAXLEN slots with a mask arange(MAXLEN) <= pos, rotary cos/sin
gathered from a table), fused QKV and gate/up weights. The same Step module runs eager and compiled.

Variants (first argument, comma separated), each "kind[:flag...]":
    kind  fp32 | bf16 (bf16 weights and activations, fp16 LM head) | int4 (int4 layers, groups of 32, through
          aten._weight_int4pack_mm_for_cpu with bf16 inputs, fp32 residual stream, fp16 LM head)
    flags eager (no compile), bmm / sum (attention by matmuls / by a broadcast product and sum: the default
          is bmm eager, sum compiled), freeze (inductor freezing), cppw (cpp_wrapper), autotune (max_autotune)
    e.g.  eager:fp32 -> "fp32:eager"
Scopes (--scope): full = one step over embed + 30 layers + norm + LM head; split = three steps as deployed:
device-in (embed + layer 0), body (layers 1..28), device-out (layer 29 + norm + LM head); the device time is
device-in + device-out. (Layer indices are 0-based: the body is the 28 layers between the device's two.)

    .venv/bin/python scripts/trials/compiled_step.py fp32:eager,fp32,fp32:freeze --scope full
    .venv/bin/python scripts/trials/compiled_step.py stock,fp32:eager,fp32,int4 --scope split

"stock" is the stock layer loop (lambdasplit's Head/Body/Tail with a DynamicCache), a timing reference only.
Timing: greedy decode of TOKENS tokens after the prompt, per-token wall time; variants interleaved within each of
REPEATS repeats, best repeat reported. Agreement: teacher-forced greedy agreement with the stock fp32 model's own
greedy continuation (2 prompts, 64 tokens each).
"""
import argparse, math, time
import torch, torch.nn as nn, torch.nn.functional as F
import torch._dynamo, torch._inductor.config
from lambdasplit.models.llm import load_split, resolve_split
from lambdasplit.models.formats import Int4Linear
from lambdasplit.models.prompting import encode_prompt
from lambdasplit.data import AGREEMENT_PROMPTS

p = argparse.ArgumentParser()
p.add_argument("variants", nargs="?", default="fp32:eager,fp32,bf16,int4")
p.add_argument("--scope", default="full", choices=["full", "split"])
p.add_argument("--maxlen", type=int, default=256)
p.add_argument("--tokens", type=int, default=64)
p.add_argument("--repeats", type=int, default=3)
p.add_argument("--no-agree", action="store_true")
args = p.parse_args()

torch.set_num_threads(2)
torch._dynamo.config.cache_size_limit = 64          # every Step instance is a recompile of the same forward
torch._dynamo.config.accumulated_cache_size_limit = 512
MAXLEN = args.maxlen

folder, config, _ = resolve_split(None, "1:29")
m = load_split(folder, 0, 30, parts=("head", "body", "tail"), weights="fp32")    # all 30 layers in the body
LAYERS = m.body.layers.layers
eps = config.rms_norm_eps
D, nh, nkv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
hd = D // nh
cos_t, sin_t = m.body.layers.rotary(torch.zeros(1, 1, D), torch.arange(MAXLEN)[None])
cos_t, sin_t = cos_t[0].contiguous(), sin_t[0].contiguous()                     # (MAXLEN, hd)


def P(t):
    return nn.Parameter(t.detach().contiguous(), requires_grad=False)


class Q4(nn.Module):
    """Int4 weights as parameters of this module (so that inductor's freezing sees them as constants)."""
    def __init__(self, w):
        super().__init__()
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False); lin.weight = nn.Parameter(w, requires_grad=False)
        q = Int4Linear(lin, 32)
        self.packed, self.sz, self.n = P(q.packed), P(q.scales_and_zeros), w.shape[0]

    def forward(self, x):  # x: (1, k) any float dtype -> (1, n) float32
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, 32, self.sz).float()


class Dense(nn.Module):
    def __init__(self, w, dt):
        super().__init__()
        self.w = P(w.to(dt))

    def forward(self, x):
        return F.linear(x.to(self.w.dtype), self.w)


class Layer(nn.Module):
    def __init__(self, layer, kind):
        super().__init__()
        a, mlp = layer.self_attn, layer.mlp
        act = torch.bfloat16 if kind == "bf16" else torch.float32
        lin = (lambda w: Q4(w)) if kind == "int4" else (lambda w: Dense(w, act))
        self.w1, self.w2 = P(layer.input_layernorm.weight.to(act)), P(layer.post_attention_layernorm.weight.to(act))
        self.qkv = lin(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
        self.o = lin(a.o_proj.weight)
        self.gu = lin(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        self.d = lin(mlp.down_proj.weight)


def rope(x, cos, sin):
    x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat((-x2, x1), -1) * sin


class Step(nn.Module):
    """Layers [a, b), with the embedding before them (input: a (1,) int64 token) and/or the final norm and LM head
    after them (output: (1, vocab) logits); otherwise hidden (1, D) in and out."""
    def __init__(self, kind, a, b, embed, final, attn="sum"):
        super().__init__()
        self.attn = attn
        self.act = torch.bfloat16 if kind == "bf16" else torch.float32
        self.embed, self.final = embed, final
        self.layers = nn.ModuleList(Layer(LAYERS[i], kind) for i in range(a, b))
        self.cos, self.sin = P(cos_t.to(self.act)), P(sin_t.to(self.act))
        self.slots = P(torch.arange(MAXLEN))
        if embed:
            self.emb = P(m.head.embed.weight.to(self.act))
        if final:
            self.nw = P(m.tail.norm.weight.to(self.act))
            self.lm = P(m.tail.lm_head.weight.to(torch.float32 if kind == "fp32" else torch.float16))

    def forward(self, inp, pos, K, V):
        x = F.embedding(inp, self.emb) if self.embed else inp                    # (1, D)
        cos, sin = self.cos[pos], self.sin[pos]                                  # (1, hd)
        allowed = self.slots <= pos                                              # (MAXLEN,)
        for i, l in enumerate(self.layers):
            h = F.rms_norm(x, (D,), l.w1, eps)
            qkv = l.qkv(h).to(self.act)
            q = rope(qkv[:, :nh * hd].view(nh, hd), cos, sin)
            k = rope(qkv[:, nh * hd:(nh + nkv) * hd].view(nkv, 1, hd), cos, sin)
            v = qkv[:, (nh + nkv) * hd:].view(nkv, 1, hd)
            # static cache, flat (layers * MAXLEN, kv_heads, head_dim): an in-place write into the input itself
            # (a write into a view of it makes inductor copy the whole cache every layer)
            K.index_put_((pos + i * MAXLEN,), k.view(1, nkv, hd).to(K.dtype))
            V.index_put_((pos + i * MAXLEN,), v.view(1, nkv, hd).to(V.dtype))
            Ki, Vi = K[i * MAXLEN:(i + 1) * MAXLEN], V[i * MAXLEN:(i + 1) * MAXLEN]          # (MAXLEN, nkv, hd)
            qg = q.view(nkv, nh // nkv, 1, hd)
            if self.attn == "bmm":
                s = (qg.view(nkv, nh // nkv, hd) @ Ki.permute(1, 2, 0)).float()
            else:  # broadcast product and sum: one fused loop, no extern call
                s = (qg.float() * Ki.permute(1, 0, 2).unsqueeze(1).float()).sum(-1)                 # (nkv, g, MAXLEN)
            s = (s * (1 / math.sqrt(hd))).masked_fill(~allowed, float("-inf")).softmax(-1).to(V.dtype)
            if self.attn == "bmm":
                att = (s @ Vi.transpose(0, 1)).reshape(1, nh * hd)
            else:
                att = (s.float().unsqueeze(-1) * Vi.permute(1, 0, 2).unsqueeze(1).float()).sum(-2)
                att = att.to(self.act).reshape(1, nh * hd)
            x = x + l.o(att).to(self.act)
            h = F.rms_norm(x, (D,), l.w2, eps)
            g, u = l.gu(h).to(self.act).chunk(2, -1)
            x = x + l.d(F.silu(g) * u).to(self.act)
        if self.final:
            h = F.rms_norm(x, (D,), self.nw, eps)
            return F.linear(h.to(self.lm.dtype), self.lm).float()
        return x

    def new_cache(self):
        kv = torch.zeros(len(self.layers) * MAXLEN, nkv, hd, dtype=self.act)
        return kv, kv.clone()


class Stage:
    """One Step (eager or compiled) with its own static cache."""
    def __init__(self, step, fn):
        self.step, self.fn, self.kv = step, fn, step.new_cache()
        self.seconds = 0.0

    def reset(self):
        self.kv[0].zero_(); self.kv[1].zero_()

    def __call__(self, inp, pos):
        t = time.perf_counter()
        out = self.fn(inp, pos, *self.kv)
        self.seconds += time.perf_counter() - t
        return out


SPLITS = {"full": [(0, 30, True, True)],
          "split": [(0, 1, True, False), (1, 29, False, False), (29, 30, False, True)]}
STAGE_NAMES = {"full": ["step"], "split": ["device-in", "body", "device-out"]}


class Variant:
    def __init__(self, spec):
        self.spec = spec
        kind, *flags = spec.split(":")
        self.kind = kind
        self.compile_s, self.error, self.best, self.agree = None, None, None, None
        if kind == "stock":
            return
        opts = {}
        if "freeze" in flags: opts["freezing"] = True
        if "cppw" in flags: opts["cpp_wrapper"] = True
        if "autotune" in flags: opts["max_autotune"] = True
        self.stages = []
        for a, b, e, f in SPLITS[args.scope]:
            attn = "bmm" if "bmm" in flags or ("eager" in flags and "sum" not in flags) else "sum"
            step = Step(kind, a, b, e, f, attn).eval()
            fn = step if "eager" in flags else torch.compile(step, fullgraph=True, dynamic=False, options=opts or None)
            self.stages.append(Stage(step, fn))

    def reset(self):
        for s in self.stages: s.reset(); s.seconds = 0.0

    def token(self, t, pos):
        """Logits (1, vocab) after token t at position pos."""
        x = torch.tensor([t])
        p = torch.tensor([pos])
        for s in self.stages:
            x = s(x, p)
        return x


def stock_decode(prompt, n):
    """Greedy decode with the stock layers; returns (tokens, seconds for the n decode steps)."""
    cache = m.body.layers.new_cache()
    ids = torch.tensor([prompt])
    logits = m.tail(m.body(m.head(ids, None, 0), cache, 0), cache, 0)
    out, pos = [], len(prompt)
    t = time.perf_counter()
    for _ in range(n):
        nxt = logits[0, -1].argmax().view(1, 1); out.append(int(nxt))
        logits = m.tail(m.body(m.head(nxt, None, pos), cache, pos), cache, pos); pos += 1
    return out, time.perf_counter() - t


def variant_decode(v, prompt, n):
    v.reset()
    for pos, t in enumerate(prompt):
        logits = v.token(t, pos)
    for s in v.stages: s.seconds = 0.0
    out, pos = [], len(prompt)
    t0 = time.perf_counter()
    for _ in range(n):
        nxt = int(logits[0].argmax()); out.append(nxt)
        logits = v.token(nxt, pos); pos += 1
    return out, time.perf_counter() - t0, [s.seconds for s in v.stages]


def main():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    prompts = [encode_prompt(tok, p) for p in AGREEMENT_PROMPTS[:2]]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, scope {args.scope}, MAXLEN {MAXLEN}, "
          f"prompt lengths {[len(p) for p in prompts]}", flush=True)
    with torch.inference_mode():
        refs = [(p, stock_decode(p, 64)[0]) for p in prompts]        # the fp32 stock model's greedy continuations
        variants = [Variant(s) for s in args.variants.split(",")]
        for v in variants:                                           # compile = first call of each stage
            if v.kind == "stock":
                continue
            v.compile_s = []
            try:
                x, pos = torch.tensor([prompts[0][0]]), torch.tensor([0])
                for s in v.stages:
                    t = time.perf_counter(); x = s.fn(x, pos, *s.kv); v.compile_s.append(time.perf_counter() - t)
                print(f"{v.spec}: first call {' + '.join('%.1f' % c for c in v.compile_s)} s", flush=True)
            except Exception as e:
                v.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                print(f"{v.spec}: FAILED {v.error}", flush=True)
                import traceback; traceback.print_exc(limit=3)
        live = [v for v in variants if v.error is None]
        if not args.no_agree:
            for v in live:
                if v.kind == "stock":
                    continue
                same = total = 0
                for prompt, cont in refs:
                    v.reset()
                    seq = prompt + cont
                    for pos in range(len(seq) - 1):
                        logits = v.token(seq[pos], pos)
                        if pos >= len(prompt) - 1:
                            same += int(logits[0].argmax()) == seq[pos + 1]; total += 1
                v.agree = (same, total)
                print(f"{v.spec}: agreement {same}/{total}", flush=True)
        for r in range(args.repeats):
            for v in live:
                prompt = prompts[r % len(prompts)]
                if v.kind == "stock":
                    out, sec = stock_decode(prompt, args.tokens); parts = [sec]
                else:
                    out, sec, parts = variant_decode(v, prompt, args.tokens)
                ms = sec / args.tokens * 1e3
                print(f"  repeat {r} {v.spec:24s} {ms:7.2f} ms/token  parts "
                      + " ".join("%.2f" % (p / args.tokens * 1e3) for p in parts), flush=True)
                if v.best is None or ms < v.best[0]:
                    v.best = (ms, [p / args.tokens * 1e3 for p in parts])
    names = STAGE_NAMES[args.scope]
    print(f"\n| variant | compile s ({'+'.join(names)}) | ms/token | tok/s | {' | '.join(n + ' ms' for n in names)} "
          f"| agreement |")
    print("|---|---|---|---|" + "---|" * len(names) + "---|")
    for v in variants:
        if v.error:
            print(f"| {v.spec} | FAILED: {v.error} |"); continue
        comp = "-" if not v.compile_s or v.spec.endswith("eager") else "+".join("%.1f" % c for c in v.compile_s)
        parts = " | ".join("%.2f" % p for p in v.best[1]) if v.kind != "stock" else " | ".join("-" for _ in names)
        ag = "-" if v.agree is None else "%d/%d = %.3f" % (*v.agree, v.agree[0] / v.agree[1])
        print(f"| {v.spec} | {comp} | {v.best[0]:.2f} | {1e3 / v.best[0]:.1f} | {parts} | {ag} |")


if __name__ == "__main__":
    main()
