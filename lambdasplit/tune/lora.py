"""Training LoRA adapters on the device's layers (the adapter format itself is models/lora.py).

`attach` wraps the target linears of the head's and the tail's layers in trainable LoraLinear
modules; `collect` gathers what they learned into an Adapter, saved in PEFT's format.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..models.lora import Adapter, LoraSpec, peft_key


class LoraLinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: base(x) + scale * (x A^T) B^T."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base, self.r, self.scale = base, r, alpha / r
        base.requires_grad_(False)
        a = torch.empty(r, base.in_features, dtype=base.weight.dtype)
        bound = 1 / math.sqrt(base.in_features)  # kaiming-uniform with a = sqrt(5), as nn.Linear and PEFT
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=base.weight.dtype))  # starts as a no-op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scale


def _targets(layer: nn.Module, targets: tuple[str, ...]) -> list[tuple[str, nn.Module, str, nn.Linear]]:
    """(path, parent, attribute, linear) for every linear sub-module whose name is one of `targets`."""
    found = []
    for path, module in layer.named_modules():
        name = path.rsplit(".", 1)[-1]
        if name in targets and isinstance(module, nn.Linear):
            parent = layer.get_submodule(path.rsplit(".", 1)[0]) if "." in path else layer
            found.append((path, parent, name, module))
    return found


def attach(stack, spec: LoraSpec, seed: int = 0) -> dict[tuple[int, str], LoraLinear]:
    """Wrap the target linears of a LayerStack's layers in LoraLinear; return them by (layer, path)."""
    generator = torch.Generator().manual_seed(seed)
    added = {}
    for j, layer in enumerate(stack.layers):
        index = stack.start + j
        for path, parent, name, linear in _targets(layer, spec.targets):
            wrapped = LoraLinear(linear, spec.r, spec.alpha, generator)
            setattr(parent, name, wrapped)
            added[(index, path)] = wrapped
    return added


def collect(modules: dict[tuple[int, str], LoraLinear], spec: LoraSpec, base_model: str) -> Adapter:
    """The trained A and B of every wrapped linear, keyed as PEFT saves them."""
    tensors = {}
    for (layer, path), module in modules.items():
        tensors[peft_key(layer, path, "A")] = module.lora_A.detach().clone()
        tensors[peft_key(layer, path, "B")] = module.lora_B.detach().clone()
    return Adapter(spec, sorted({layer for layer, _ in modules}), tensors, base_model)
