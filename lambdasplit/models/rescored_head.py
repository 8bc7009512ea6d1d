"""A quantized LM head whose top candidates are scored again in float: the greedy choice of a float head at
nearly the cost of a quantized one.

A quantized format's LM head loses more of fp32's greedy tokens than all its layers together (on the
embedded SmolLM2-135M, int4 everywhere kept 90.6% of fp32's teacher-forced tokens, int4 layers with an
fp32 head 99.0%: docs/devices.md): the model's top two logits are often close, and 4-bit rows move them.
Yet the float head's top token is almost always among the quantized head's few highest. So a token's
logits are computed in two passes:

1. every row of the vocabulary through the quantized head (the kernel reads 4 or 8 bits a weight);
2. the `top` highest of those again, exactly: their float rows (kept in float16, the table the head's
   embedding lookup uses anyway) times the hidden state in the activations' dtype.

The greedy choice is then the float head's whenever the float head's best token is among the quantized
head's `top` highest: `tests/test_rescored_head.py` measures how far down it ever falls (a few places,
against 64 rescored). Sampling sees float logits for those `top` tokens and the quantized estimates
for the rest of the vocabulary, which lie below them.

Reading the `top` rows costs `top * D * 2` bytes a token (74 kB for SmolLM2), against the table's 56 MB.
"""

from __future__ import annotations

import torch
from torch import nn

RESCORED = 64
"""Rows scored again in float per position."""


class RescoredHead(nn.Module):
    """logits = the quantized head's, with its `top` highest per position replaced by the float rows' exact ones."""

    def __init__(self, quantized: nn.Module, rows: torch.Tensor, bias: torch.Tensor | None = None,
                 top: int = RESCORED):
        super().__init__()
        if rows.shape != (quantized.out_features, quantized.in_features):
            raise ValueError(f"float rows {list(rows.shape)} do not match the quantized head "
                             f"[{quantized.out_features}, {quantized.in_features}]")
        self.quantized = quantized
        self.in_features, self.out_features = quantized.in_features, quantized.out_features
        self.top = min(top, self.out_features)
        self.register_buffer("rows", rows)
        self.register_buffer("rows_bias", bias)

    @property
    def weight(self) -> torch.Tensor:
        """The float table (what weight-based code, e.g. the logit lens, reads)."""
        return self.rows

    @property
    def bias(self) -> torch.Tensor | None:
        return self.rows_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.quantized(x)
        flat, out = x.reshape(-1, self.in_features), logits.view(-1, self.out_features)
        best = out.topk(self.top, dim=-1).indices  # (R, top)
        exact = torch.einsum("rkd,rd->rk", self.rows[best].to(flat.dtype), flat)
        if self.rows_bias is not None:
            exact = exact + self.rows_bias[best].to(exact.dtype)
        out.scatter_(-1, best, exact.to(out.dtype))
        return logits

    @property
    def weight_bytes(self) -> int:
        """Bytes one position reads: the quantized head, and `top` float rows."""
        return self.quantized.weight_bytes + self.top * self.in_features * self.rows.element_size()
