"""A compiled decode step: one new position through a Llama-architecture layer stack as one graph.

On a CPU, a decode step of a small model is bound less by its weights' bytes than by the eager loop's
per-operation overhead: about 40 small operations a layer, each a dispatch and a parallel region
(docs/devices.md). `DecodeStep` hands the whole of a stack's decode step to `torch.compile`
(inductor): norms, rotary embeddings, attention glue and residuals are fused, and the weight-only
int4/int8 kernels are called from the compiled code. It computes what the stock layers compute, from
the stock modules themselves (projections, norms, MLP, `apply_rotary_pos_emb`); only the dozen lines
that join them are written here, and the tests hold them to the stock layers' numbers.

It runs over the session's own `DynamicCache`: the graph takes each layer's keys and values (their
length is symbolic, so one graph serves every length) and returns them one position longer, as the
stock cache's `update` does. Rollbacks, batching and every other user of the cache are unchanged.
Only single-position steps of a cached session take it (a prefill, a batched step or a speculative
verification runs the stock layers); a cache shorter than 2 positions too, since torch specialises
sizes 0 and 1.

Compiling costs time once per process and layer range (about 40 s for SmolLM2's 28-layer body on 2
cores, a few seconds for one layer): `warm_up` pays it before the first request.
"""

from __future__ import annotations

import itertools
import time
import types

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicLayer
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .formats import int4_product

SUPPORTED = ("LlamaDecoderLayer",)
"""Decoder-layer classes whose forward `DecodeStep` reproduces (SmolLM2 and the Llama family)."""


_SERIAL = itertools.count()


class CompileError(ValueError):
    """The stack cannot be compiled (another architecture), or compiling failed on this machine."""


def unsupported(stack) -> str | None:
    """Why `stack` (a LayerStack) cannot take a compiled decode step; None when it can."""
    kinds = {type(layer).__name__ for layer in stack.layers}
    if other := sorted(kinds - set(SUPPORTED)):
        return f"--compile runs Llama-architecture layers ({', '.join(SUPPORTED)}), not {', '.join(other)}"
    if any(kind != "full_attention" for kind in stack.types):
        return "--compile runs full-attention layers only; this model has sliding-window layers"
    if stack.config._attn_implementation != "sdpa":
        return f"--compile runs sdpa attention, not {stack.config._attn_implementation!r}"
    return None


class _Fused(nn.Module):
    """One layer's q/k/v and gate/up int4 weights as two products (CPU int4 only). The packed rows are the
    layer's own: each Int4Linear's `packed` becomes a view into the fused tensor, so nothing is held twice but
    the small scales."""

    def __init__(self, parts: list, group: int):
        super().__init__()
        self.group, self.widths = group, [q.out_features for q in parts]
        self.register_buffer("packed", torch.cat([q.packed for q in parts]))
        self.register_buffer("scales_and_zeros", torch.cat([q.scales_and_zeros for q in parts], dim=1))
        start = 0
        for q, width in zip(parts, self.widths):
            q.packed = self.packed[start:start + width]
            start += width

    @staticmethod
    def fusable(parts: list) -> bool:
        return (all(type(q).__name__ == "Int4Linear" and not q.on_cuda and q.bias is None
                    and q.out_features % 16 == 0 for q in parts)
                and len({(q.group_size, q.in_features) for q in parts}) == 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (..., K) -> each part's output, as its Int4Linear computes it (bf16 products, x's dtype out)."""
        y = int4_product(x, self.packed, self.group, self.scales_and_zeros)
        return list(y.to(x.dtype).reshape(*x.shape[:-1], -1).split(self.widths, dim=-1))


def _fuse(layer) -> nn.ModuleDict:
    """The layer's fusable products: 'qkv' and 'gate_up' where all their parts are CPU int4."""
    attn, mlp = layer.self_attn, layer.mlp
    fused = nn.ModuleDict()
    for name, parts in (("qkv", [attn.q_proj, attn.k_proj, attn.v_proj]), ("gate_up", [mlp.gate_proj, mlp.up_proj])):
        parts = [_plain(q) for q in parts]
        if _Fused.fusable(parts):
            fused[name] = _Fused(parts, parts[0].group_size)
    return fused


def _plain(module):
    """A projection without the body server's PrivateLoRA wrapper (whose sessions never take this step)."""
    return getattr(module, "base", module) if type(module).__name__ == "PrivateLoraLinear" else module


def _settled(t: torch.Tensor) -> torch.Tensor:
    """`t` as the graph was compiled for: a contiguous inference tensor. A rollback leaves a cropped view, a
    frame arrives decoded outside inference mode, a prefill may run under no_grad: each would otherwise compile
    a second graph (20-40 s) on its first step. The copy happens once (a step's outputs are already settled)."""
    return t if t.is_inference() and t.is_contiguous() else t.clone(memory_format=torch.contiguous_format)


class DecodeStep:
    """Layers [start, stop) of a LayerStack for one new position of one session, compiled."""

    def __init__(self, stack):
        if reason := unsupported(stack):
            raise CompileError(reason)
        self.stack = stack
        self.calls = 0  # steps taken through the graph
        self.fused = nn.ModuleList(_fuse(layer) for layer in stack.layers)  # fewer, larger products (CPU int4)
        # Checking a graph's guards on every module of 28 layers took 0.5 ms a call; a stack's modules never change
        # once loaded (adapters are merged or installed before), so only the inputs' guards are kept. Without its
        # module guards, a graph must not serve another stack: torch keeps graphs per code object, so each step
        # gets a code object of its own.
        code = DecodeStep._step.__code__
        own = types.FunctionType(code.replace(co_name=f"{code.co_name}_{next(_SERIAL)}"), DecodeStep._step.__globals__)
        self._fn = torch.compile(types.MethodType(own, self), dynamic=True, fullgraph=True,
                                 options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})

    def _step(self, hidden, cos, sin, keys, values, first: int):
        """hidden (1, 1, D) through layers first.. (one per keys entry); their keys/values one position longer."""
        new_keys, new_values = [], []
        for j, (past_k, past_v) in enumerate(zip(keys, values)):
            layer, fused = self.stack.layers[first + j], self.fused[first + j]
            attn, mlp = layer.self_attn, layer.mlp
            h = layer.input_layernorm(hidden)
            shape = (1, 1, -1, attn.head_dim)
            if "qkv" in fused:
                q, k, v = fused["qkv"](h)
            else:
                q, k, v = (_plain(proj)(h) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
            q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k, v = torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)
            new_keys.append(k)
            new_values.append(v)
            out = F.scaled_dot_product_attention(q, k, v, scale=attn.scaling, enable_gqa=True)  # sees every slot
            hidden = hidden + _plain(attn.o_proj)(out.transpose(1, 2).reshape(1, 1, -1))
            h = layer.post_attention_layernorm(hidden)
            if "gate_up" in fused:  # LlamaMLP: down(act(gate(h)) * up(h))
                gate, up = fused["gate_up"](h)
                hidden = hidden + mlp.down_proj(mlp.act_fn(gate) * up)
            else:
                hidden = hidden + mlp(h)
        return hidden, new_keys, new_values

    def applies(self, hidden: torch.Tensor, cache, start: int, stop: int) -> bool:
        """Whether this step can run layers [start, stop) for `hidden` on `cache`."""
        if cache is None or hidden.shape[:2] != (1, 1) or start == stop or torch.is_grad_enabled():
            return False
        for i in range(start, stop):
            layer = cache.layers[i]
            if type(layer) is not DynamicLayer or not layer.is_initialized or layer.keys.shape[-2] < 2:
                return False
        return True

    def __call__(self, hidden: torch.Tensor, cache, pos: int, start: int, stop: int) -> torch.Tensor:
        layers = [cache.layers[i] for i in range(start, stop)]
        with torch.inference_mode():
            cos, sin = self.stack.rotary(hidden, torch.tensor([[pos]], device=hidden.device))
            keys, values = [_settled(c.keys) for c in layers], [_settled(c.values) for c in layers]
            out, keys, values = self._fn(_settled(hidden), cos, sin, keys, values, start - self.stack.start)
        for layer, k, v in zip(layers, keys, values):
            layer.keys, layer.values = k, v
        self.calls += 1
        return out

    def warm_up(self) -> float:
        """Compile the whole stack's step now, on a throwaway cache; the seconds it took."""
        stack = self.stack
        if not len(stack.layers):
            return 0.0
        t = time.perf_counter()
        device = next(stack.buffers(), next(stack.parameters(), None)).device
        cache = stack.new_cache()
        with torch.inference_mode():
            prompt = torch.zeros(1, 2, stack.config.hidden_size, dtype=stack.dtype, device=device)
            stack(prompt, cache, 0, compiled=False)
            try:
                self(prompt[:, :1], cache, 2, stack.start, stack.stop)
            except Exception as exc:  # inductor needs a C++ compiler: say what failed, not a 200-line trace
                lines = str(exc).strip().splitlines()
                raise CompileError(f"torch.compile failed on this machine ({type(exc).__name__}: "
                                   f"{lines[0][:300] if lines else ''}); run without --compile") from None
        return time.perf_counter() - t
