"""Gemma 1, 2 and 3: scaled embeddings, soft-capped logits and attention, alternating sliding windows.

- The embedding is scaled by sqrt(D) inside the stock `...ScaledWordEmbedding` module; the scale is a
  computed buffer that a meta-device build leaves empty, so it is filled here (in the head).
- Gemma 2 soft-caps the final logits (`final_logit_softcapping`: cap * tanh(logits / cap)), in the tail.
- Gemma 2 also soft-caps attention scores inside its layers, which SDPA cannot do: those layers run the
  eager attention, as transformers itself runs them.
- Gemma 2 and 3 alternate sliding-window and global layers (`config.layer_types`); Gemma 3 gives each
  kind its own rotary base, so its rotary module is asked once per kind.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from .base import Family, takes


class Gemma(Family):
    name = "gemma"
    types = ("gemma", "gemma2", "gemma3_text")
    notes = ("embeddings × √D (the stock scaled embedding, in the head); final logits soft-capped (Gemma 2, "
             "in the tail); attention soft-capping runs eager attention; sliding-window layers alternate "
             "with global ones, each kind with its own rotary base (Gemma 3)")

    # Gemma's residual stream passes fp16's range (1e5 in Gemma 3 270M from layer 8 on), and the default wire
    # keeps its outliers in fp16, so it is refused there; bf16 kept every token (docs/wire.md, per family)
    default_wire = "bf16"

    def attention(self, config: PretrainedConfig) -> str:
        return "eager" if getattr(config, "attn_logit_softcapping", None) else "sdpa"

    def fill_buffers(self, module: nn.Module, device: torch.device) -> None:
        for sub in module.modules():
            if hasattr(sub, "scalar_embed_scale") and getattr(sub, "embed_scale", None) is not None:
                sub.embed_scale = torch.tensor(sub.scalar_embed_scale, device=device)

    def layer_inputs(self, config, rotary, hidden, positions, masks) -> dict[str, dict]:
        if rotary is None or not takes(type(rotary).forward, "layer_type"):
            return super().layer_inputs(config, rotary, hidden, positions, masks)
        return {kind: {"position_embeddings": rotary(hidden, positions, kind)} for kind in masks}

    def logits(self, config: PretrainedConfig, logits: torch.Tensor) -> torch.Tensor:
        if cap := getattr(config, "final_logit_softcapping", None):
            return torch.tanh(logits / cap) * cap
        return logits

    def check(self, config: PretrainedConfig) -> str | None:
        if getattr(config, "use_bidirectional_attention", False):
            return "bidirectional attention (an embedding model, not a causal LM)"
        return None
