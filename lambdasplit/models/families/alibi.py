"""ALiBi families (BLOOM, Falcon-RW): the position bias is built outside the layers, from the key positions.

ALiBi adds slope_h * (key position) to every attention score of head h; the model classes build that bias
once per forward, from the number of key slots, and hand it to the layers. Here it is built for each
call from the width of the mask the layers get (key slot s holds position s: these families have no
sliding windows), with each model's own slope and bias functions, so the rounding is the model's own:

- BLOOM passes it to each block as `alibi` (batch * heads, 1, keys), beside the causal mask;
- Falcon folds it into the attention mask itself: bias / sqrt(head_dim) where a key is visible, the
  dtype's minimum where it is not.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import PretrainedConfig

from .base import Family


class Bloom(Family):
    name = "bloom"
    types = ("bloom",)
    base, embed, layers, norm, rotary = "transformer", "word_embeddings", "h", "ln_f", None
    head_modules = ("word_embeddings_layernorm",)
    full_masks = True
    notes = "a LayerNorm after the embeddings (in the head); ALiBi biases built per call and given to each block"

    def attention(self, config: PretrainedConfig) -> str:
        return "eager"  # BLOOM's blocks have no SDPA path

    def embed_ids(self, head: nn.Module, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return head.extras["word_embeddings_layernorm"](head.embed(ids))

    def layer_inputs(self, config, rotary, hidden, positions, masks):
        from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

        slopes = _get_alibi_slopes(config.num_attention_heads, hidden.device)
        out = {}
        for kind, mask in masks.items():
            alibi = slopes[:, None, None] * torch.arange(mask.shape[-1], device=hidden.device)
            out[kind] = {"alibi": alibi.repeat(hidden.shape[0], 1, 1).to(hidden.dtype)}
        return out


class FalconAlibi(Family):
    name = "falcon-alibi"
    base, embed, layers, norm = "transformer", "word_embeddings", "h", "ln_f"
    full_masks = True
    notes = "ALiBi biases folded into the attention mask per call, divided by √head_dim"

    def layer_inputs(self, config, rotary, hidden, positions, masks):
        from transformers.models.falcon.modeling_falcon import build_alibi_tensor

        heads = config.num_attention_heads
        head_dim = config.hidden_size // heads
        out = {}
        for kind, mask in masks.items():
            batch, width = hidden.shape[0], mask.shape[-1]
            ones = torch.ones((batch, width), device=hidden.device, dtype=torch.long)
            bias = build_alibi_tensor(ones, heads, hidden.dtype).reshape(batch, heads, 1, width) / math.sqrt(head_dim)
            hidden_from = ~mask if mask.dtype == torch.bool else mask < -1
            out[kind] = {"attention_mask": bias.masked_fill(hidden_from, torch.finfo(hidden.dtype).min)}
        return out
