"""The format a side holds its weights in: fp32, bf16, fp16, or weight-only int8 / int4.

    fp32 | bf16 | fp16   every tensor in that dtype; activations too
    int8                 each linear layer's weight as int8 with one scale per output row
    int4                 each linear layer's weight as 4-bit groups of 32 columns (a scale and a zero each)

The quantized formats keep activations and norms in `dtype` (fp32), the embedding table in fp16 (`table`),
round each linear layer's input to bf16 for the kernel (its only fast path on a CPU), and run PyTorch's own
weight-only kernels (`aten._weight_int8pack_mm`; `aten._weight_int4pack_mm_for_cpu` on the CPU and the
tinygemm `aten._weight_int4pack_mm` on CUDA); nothing here multiplies matrices by hand. Before any weight
loads, `check_format` runs the format's kernel once on a tiny tensor on the chosen device, so a format the
device cannot run, or shapes a format cannot take, fail with a clear error and never fall back to fp32.
Their LM head is quantized too, and its highest logits are scored again from the fp16 table
(models/rescored_head.py), which keeps the float head's greedy choice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .rescored_head import RescoredHead


class WeightFormatError(ValueError):
    """The format is unknown, the device has no kernel for it, or the model's shapes cannot take it."""


@dataclass(frozen=True)
class WeightFormat:
    name: str
    dtype: torch.dtype  # activations and every tensor that is not a quantized linear weight
    bits: int = 0  # 8 or 4: linear weights quantized, weight-only
    group_size: int = 0  # int4: input columns sharing one scale and zero

    @property
    def quantized(self) -> bool:
        return self.bits > 0

    @property
    def table(self) -> torch.dtype:
        """The embedding table's dtype: a lookup, never quantized; the quantized formats keep it in fp16 (which
        holds a GGUF file's 8-bit table almost exactly, where bf16 rounds it) and rescore the LM head from it."""
        return torch.float16 if self.quantized else self.dtype

    @property
    def storage(self) -> str:
        """The dtype a checkpoint is cached in for this format (quantized formats quantize from fp16, their table's)."""
        if self.quantized:
            return "float16"
        return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
                torch.float64: "float32"}[self.dtype]

    def describe(self) -> str:
        if self.bits == 8:
            return "int8 (weight-only, per-row scales, bf16 products, fp32 activations)"
        if self.bits == 4:
            return f"int4 (weight-only, groups of {self.group_size}, bf16 products, fp32 activations)"
        return self.name

    def __str__(self) -> str:
        return self.name


FORMATS = {
    "fp32": WeightFormat("fp32", torch.float32),
    "bf16": WeightFormat("bf16", torch.bfloat16),
    "fp16": WeightFormat("fp16", torch.float16),
    "int8": WeightFormat("int8", torch.float32, bits=8),
    "int4": WeightFormat("int4", torch.float32, bits=4, group_size=32),
    "fp64": WeightFormat("fp64", torch.float64),  # for checks of exactness (the tests), not offered by the CLI
}
ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float64": "fp64"}
"""The dtype names of `--dtype` and of older clients, as formats."""

CPU_DEFAULT = "int4"
"""The CPU's default: the fastest format that keeps >= 99% teacher-forced greedy agreement with fp32 in
`lambdasplit bench decode` (docs/devices.md has the table). On the embedded SmolLM2-135M, int4 with its
LM head's top rescored keeps 99.2% there and runs fastest; bf16 keeps 97%, int8 95%, fp16 99.6% at
fp32's speed."""

FLOAT_DEFAULT = "fp32"
"""The CPU's default where float weights are needed (adapters: LoRA merged into the device's layers)."""


def parse_format(name: str | WeightFormat | torch.dtype) -> WeightFormat:
    """'fp32', 'bf16', 'fp16', 'int8', 'int4' (or 'float32', 'bfloat16', 'float16', or a torch dtype)."""
    if isinstance(name, WeightFormat):
        return name
    if isinstance(name, torch.dtype):
        name = str(name).removeprefix("torch.")
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key not in FORMATS:
        raise WeightFormatError(f"unknown weight format {name!r}: use one of {', '.join(FORMATS)}")
    return FORMATS[key]


DEFAULT_ENV = "LAMBDASPLIT_WEIGHTS"
"""Names the format every side takes when none is asked for, on any device (e.g. fp32 for exact answers)."""


def default_format(device: torch.device, need_float: bool = False) -> WeightFormat:
    """$LAMBDASPLIT_WEIGHTS when set; else bf16 on a GPU and, on the CPU, the measured fastest format within the
    agreement bound. fp32 where float weights are needed and the default is quantized."""
    if chosen := os.environ.get(DEFAULT_ENV, "").strip():
        try:
            fmt = parse_format(chosen)
        except WeightFormatError as exc:
            raise WeightFormatError(f"${DEFAULT_ENV}: {exc}") from None
    else:
        fmt = FORMATS["bf16"] if device.type in ("cuda", "mps") else FORMATS[CPU_DEFAULT]
    return FORMATS[FLOAT_DEFAULT] if need_float and fmt.quantized else fmt


def choose_format(name: str | WeightFormat | torch.dtype | None, device: torch.device,
                  need_float: bool = False) -> WeightFormat:
    """The format asked for, or the device's default when none was."""
    return parse_format(name) if name else default_format(device, need_float)


def check_format(fmt: WeightFormat, device: torch.device, in_features: list[int] | None = None) -> None:
    """Refuse, before loading, a format the device cannot run or the model's linear layers cannot take."""
    if fmt.bits == 4:
        bad = sorted({k for k in in_features or [] if k % fmt.group_size})
        if bad:
            raise WeightFormatError(f"int4 groups {fmt.group_size} input columns, which does not divide the "
                                    f"model's linear widths {bad}: use int8 or bf16")
    probe = torch.linspace(-1, 1, 64 * 64).reshape(64, 64)
    try:
        layer = quantize_linear(_linear(probe, device, fmt.dtype), fmt)
        out = layer(torch.ones(1, 64, dtype=fmt.dtype, device=device))
        expected = torch.ones(1, 64) @ probe.t()
        err = ((out.float().cpu() - expected).abs().max() / expected.abs().max()).item()
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightFormatError(f"{fmt} weights have no working kernel on {device} with torch {torch.__version__} "
                                f"({first[:200]}); use {_instead(fmt, device)}") from None
    if not err < 0.05:  # a kernel that runs but computes nonsense (int4's own rounding is far below this)
        raise WeightFormatError(f"{fmt} weights give wrong results on {device} (a probe product is off by {err:.3g}); "
                                f"use {_instead(fmt, device)}")


def _instead(fmt: WeightFormat, device: torch.device) -> str:
    return "fp32" if fmt.name == "bf16" else ("bf16 or fp32" if device.type != "cpu" or fmt.name != "fp16" else "bf16")


def _linear(weight: torch.Tensor, device: torch.device, dtype: torch.dtype) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = nn.Parameter(weight.to(device=device, dtype=dtype), requires_grad=False)
    return layer


def quantize_linear(layer: nn.Linear, fmt: WeightFormat) -> nn.Module:
    """The layer itself for float formats; a weight-only int8 / int4 module holding its quantized weight."""
    if fmt.bits == 8:
        return Int8Linear(layer)
    if fmt.bits == 4:
        return Int4Linear(layer, fmt.group_size)
    return layer


def quantize_head(layer: nn.Linear, fmt: WeightFormat) -> nn.Module:
    """An LM head in `fmt`: itself for float formats; for the quantized ones, the quantized head with its float
    rows (in `fmt.table`) to rescore its highest logits."""
    if not fmt.quantized:
        return layer
    rows = layer.weight.detach().to(fmt.table)
    if not torch.isfinite(rows).all():
        raise WeightFormatError(f"the LM head has values fp16 cannot hold (up to {layer.weight.abs().max().item():.3g}); "
                                f"use bf16 or fp32 weights")
    bias = None if layer.bias is None else layer.bias.detach()
    return RescoredHead(quantize_linear(layer, fmt), rows, bias)


def quantize_module(module: nn.Module, fmt: WeightFormat, skip: tuple[nn.Module, ...] = ()) -> int:
    """Replace every nn.Linear under `module` (but those in `skip`) by its quantized form; returns how many.
    GPT-2's Conv1D (y = x W + b, W stored [in, out]) is the same product, so it is quantized as the
    nn.Linear of W transposed. Fused expert tensors (MoE layers) are not linear modules and stay in float."""
    if not fmt.quantized:
        return 0
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if child in skip:
                continue
            if isinstance(child, Conv1D):
                child = _conv1d_as_linear(child)
            if isinstance(child, nn.Linear):
                setattr(parent, name, quantize_linear(child, fmt))
                count += 1
    return count


def _conv1d_as_linear(conv: Conv1D) -> nn.Linear:
    layer = _linear(conv.weight.detach().T.contiguous(), conv.weight.device, conv.weight.dtype)
    layer.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)
    return layer


class Int8Linear(nn.Module):
    """y = x @ (q * scale)^T + b with q int8 [out, in] and one scale per output row."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        w = layer.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.register_buffer("qweight", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        # the kernel's fast path takes bf16 rows; the residual stream around it stays in the activations' dtype
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.qweight, self.scales)
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @property
    def weight_bytes(self) -> int:
        return self.qweight.numel() + self.scales.numel() * self.scales.element_size()


def int4_product(x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor,
                 on_cuda: bool = False) -> torch.Tensor:
    """x (..., K) times packed 4-bit weights -> (rows, N) in bf16: the kernels' fast path takes bf16 rows."""
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    if on_cuda:
        return torch.ops.aten._weight_int4pack_mm(x2, packed, group_size, scales_and_zeros)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group_size, scales_and_zeros)


class Int4Linear(nn.Module):
    """Weight-only 4-bit groups: w ≈ (q - 8) * scale + zero per group of `group_size` input columns, packed
    for PyTorch's int4 kernel on the layer's device."""

    def __init__(self, layer: nn.Linear, group_size: int):
        super().__init__()
        w = layer.weight.detach().float()
        n, k = w.shape
        if k % group_size:
            raise WeightFormatError(f"int4 groups of {group_size} do not divide a linear layer's width {k}")
        groups = w.reshape(n, k // group_size, group_size)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = ((high - low) / 15).clamp(min=1e-8)
        q = ((groups - low) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k)
        zero = low + 8 * scale
        self.in_features, self.out_features, self.group_size = k, n, group_size
        pad = -n % 16  # the kernels take output widths in multiples of 16 (a vocabulary of 50257 is not): zero rows
        if pad:
            q = torch.cat([q, q.new_full((pad, k), 8)])
            scale, zero = (torch.cat([t, t.new_zeros((pad, *t.shape[1:]))]) for t in (scale, zero))
            n += pad
        self.on_cuda = w.device.type == "cuda"
        if self.on_cuda:  # tinygemm: two 4-bit values per byte, then the kernel's own tiling of k in 16 x tiles
            packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            tiles = next(t for t in (8, 4, 2) if k % (16 * t) == 0)  # k is a multiple of the group (32)
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack(packed, tiles))
        else:
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        sz = torch.cat([scale.reshape(n, -1, 1), zero.reshape(n, -1, 1)], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("scales_and_zeros", sz.to(torch.bfloat16))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = int4_product(x, self.packed, self.group_size, self.scales_and_zeros, self.on_cuda)
        if y.shape[-1] != self.out_features:
            y = y[:, :self.out_features]
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @property
    def weight_bytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scales_and_zeros.numel() * 2


def weight_tensors(module: nn.Module, reads: bool = False) -> dict[int, tuple[int, int]]:
    """id -> (parameters, bytes) of each weight `module` holds; a quantized linear layer counts as one tensor
    of in x out parameters at its packed size. Keyed by id, so a tensor shared by two modules counts once.
    With `reads`, a rescored head's float table counts only the rows one position reads."""
    out = {}
    for sub in module.modules():  # a RescoredHead comes before the quantized head it holds
        if isinstance(sub, RescoredHead):
            rows = sub.rows.shape[0] if not reads else sub.top
            out[id(sub.rows)] = (sub.rows.numel(), rows * sub.in_features * sub.rows.element_size())
            # the quantized head is the same matrix in another form: its bytes count, its parameters not again
            out[id(next(sub.quantized.buffers()))] = (0, sub.quantized.weight_bytes)
        elif isinstance(sub, (Int8Linear, Int4Linear)):
            out.setdefault(id(next(sub.buffers())), (sub.in_features * sub.out_features, sub.weight_bytes))
    for p in module.parameters():
        out.setdefault(id(p), (p.numel(), p.numel() * p.element_size()))
    return out


def weight_bytes(module: nn.Module) -> int:
    """Bytes of weights a forward pass over `module` reads: quantized weights at their packed size."""
    return sum(size for _, size in weight_tensors(module, reads=True).values())
