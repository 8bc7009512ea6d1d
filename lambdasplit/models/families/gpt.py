"""GPT-2, GPT-NeoX (Pythia), Phi-2 and Falcon: other module names, learned positions, parallel blocks.

Parallel attention + MLP blocks (NeoX, Falcon, Phi-2), partial rotary (NeoX, Phi-2) and multi-query
attention (Falcon) all happen inside the stock layers; what differs outside them is only where the
modules live, and GPT-2's learned absolute positions, which the head adds to the token embeddings.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from .alibi import FalconAlibi
from .base import Family


class GPT2(Family):
    name = "gpt2"
    types = ("gpt2",)
    base, embed, layers, norm, rotary = "transformer", "wte", "h", "ln_f", None
    head_modules = ("wpe",)
    notes = "learned absolute positions (`wpe`) added to the token embeddings in the head; no rotary"

    def embed_ids(self, head: nn.Module, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return head.embed(ids) + head.extras["wpe"](positions).to(head.embed.weight.dtype)

    def check(self, config: PretrainedConfig) -> str | None:
        if getattr(config, "add_cross_attention", False):
            return "cross-attention layers (an encoder-decoder use of GPT-2)"
        return None


class GPTNeoX(Family):
    name = "gpt_neox"
    types = ("gpt_neox",)
    base, embed, norm = "gpt_neox", "embed_in", "final_layer_norm"
    lm_head_keys = ("embed_out.", "lm_head.")
    notes = "module names `embed_in`, `final_layer_norm`, `embed_out`; parallel residual and partial rotary in the layers"


class Phi(Family):
    name = "phi"
    types = ("phi",)
    norm = "final_layernorm"
    notes = "final norm `final_layernorm`; parallel attention + MLP and partial rotary in the layers"


class Falcon(Family):
    name = "falcon"
    types = ("falcon",)
    base, embed, layers, norm = "transformer", "word_embeddings", "h", "ln_f"
    notes = "module names `word_embeddings`, `h`, `ln_f`; parallel attention + MLP and multi-query attention in the layers"

    def variant(self, config: PretrainedConfig) -> Family:
        return FalconAlibi() if getattr(config, "alibi", False) else self
