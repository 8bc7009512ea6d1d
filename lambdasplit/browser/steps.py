"""The device's parts as single steps with their KV caches as explicit inputs and outputs: what ONNX exports.

A step takes the new rows, their positions, the attention mask of the step (rows x cached + new positions,
True where a row may attend) and each layer's past keys and values; it returns its output and each layer's
present keys and values (past + new), which the caller feeds back as the next step's past. The stock layers
run unchanged: `_StepKV` stands in for the cache they update, and the family adapter adds what it adds in
PyTorch (rotary tables, learned positions, ALiBi, scaled embeddings, soft-capped logits).
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.llm import LayerStack, SplitModel


class _StepKV:
    """The cache the layers see during one exported step: past + new, kept as this step's presents."""

    def __init__(self, stack: LayerStack, past: tuple[torch.Tensor, ...]):
        self.stack, self.past, self.present = stack, past, {}

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        j = layer_idx - self.stack.start
        full = torch.cat([self.past[2 * j], keys], dim=-2), torch.cat([self.past[2 * j + 1], values], dim=-2)
        self.present[layer_idx] = full
        return full


def _run(stack: LayerStack, hidden, positions, mask, past) -> tuple[torch.Tensor, list[torch.Tensor]]:
    kv = _StepKV(stack, past)
    inputs = stack.layer_inputs(hidden, positions, {kind: mask for kind in dict.fromkeys(stack.types)})
    for j in range(len(stack.layers)):
        hidden = stack.run_layer(j, hidden, positions, inputs[stack.types[j]], kv)
    return hidden, [t for i in range(stack.start, stack.stop) for t in kv.present[i]]


class HeadStep(nn.Module):
    """ids (1, L), positions (1, L), mask (1, 1, L, T), past k/v per layer -> hidden (1, L, D), present k/v."""

    def __init__(self, model: SplitModel):
        super().__init__()
        self.head = model.head

    def forward(self, ids, positions, mask, *past):
        hidden = self.head.family.embed_ids(self.head, ids, positions).to(self.head.dtype)
        hidden, present = _run(self.head.layers, hidden, positions, mask, past)
        return (hidden, *present)


class TailStep(nn.Module):
    """hidden (1, L, D), positions, mask, past k/v per layer -> logits (1, L, V) of every row, present k/v."""

    def __init__(self, model: SplitModel):
        super().__init__()
        self.tail = model.tail

    def forward(self, hidden, positions, mask, *past):
        hidden, present = _run(self.tail.layers, hidden, positions, mask, past)
        logits = self.tail.family.logits(self.tail.config, self.tail.lm_head(self.tail.norm(hidden)))
        return (logits, *present)


@torch.inference_mode()
def cache_shape(model: SplitModel) -> tuple[int, int]:
    """(KV heads, head dim) of one layer's cache, as the layers really store it: read off a one-row step (config
    fields disagree across families: GPT-2 and BLOOM have no `num_key_value_heads`, Falcon has `num_kv_heads`)."""
    for stack in (part.layers for part in (model.head, model.tail) if part is not None):
        if len(stack.layers):
            cache = stack.new_cache()
            stack(torch.zeros(1, 1, model.hidden_size, dtype=model.dtype), cache, 0)
            keys = cache.layers[stack.start].keys
            return int(keys.shape[1]), int(keys.shape[3])
    return 1, 1  # neither part has a layer: no cache crosses the step


def step_mask(past: int, rows: int) -> torch.Tensor:
    """The (1, 1, rows, past + rows) causal mask of a step: row r sees positions up to past + r."""
    return torch.ones(1, 1, rows, past + rows, dtype=torch.bool).tril(past)
