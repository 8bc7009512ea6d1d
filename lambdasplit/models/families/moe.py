"""Mixture-of-experts (Mixtral, Qwen2-MoE, OLMoE): the router runs where its layer runs.

Routing happens inside each stock layer's MoE block, so whichever side holds a layer also holds its
router and all its experts; nothing crosses the wire but the hidden state. The one thing to declare is
the checkpoint layout: checkpoints store one matrix per expert (`experts.3.gate_proj.weight`, or
Mixtral's `block_sparse_moe.experts.3.w1.weight`), while transformers' expert modules hold them fused
(`experts.gate_up_proj`: every expert's gate and up rows, `experts.down_proj`), so each layer's
tensors are fused as they load.
"""

from __future__ import annotations

import re

import torch

from .base import Family

_EXPERT = re.compile(r"^(?P<owner>.*experts)\.(?P<e>\d+)\.(?P<role>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_ROLE = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


class MixtureOfExperts(Family):
    name = "moe"
    types = ("mixtral", "qwen2_moe", "olmoe")
    fused_checkpoint = True  # one matrix per expert on disk, fused in the modules
    keep_float = ("mlp.gate", "mlp.shared_expert_gate")  # a quantized router could route tokens elsewhere
    notes = "routers and experts run inside the layers, on the side that holds them; per-expert checkpoint tensors fused as they load"

    def convert(self, state: dict[str, torch.Tensor], wanted: set[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
        for name, tensor in state.items():
            if name not in wanted:
                name = name.replace("block_sparse_moe.", "mlp.")  # Mixtral's name for its MoE block
            if name not in wanted and (m := _EXPERT.match(name)):
                experts.setdefault(m["owner"], {}).setdefault(int(m["e"]), {})[_ROLE[m["role"]]] = tensor
            else:
                out[name] = tensor
        for owner, by_expert in experts.items():
            order = range(len(by_expert))
            if sorted(by_expert) != list(order) or any(len(by_expert[e]) != 3 for e in order):
                raise ValueError(f"checkpoint's experts under {owner} are incomplete")
            out[f"{owner}.gate_up_proj"] = torch.stack([torch.cat([by_expert[e]["gate"], by_expert[e]["up"]])
                                                        for e in order])
            out[f"{owner}.down_proj"] = torch.stack([by_expert[e]["down"] for e in order])
        return out
