"""Affine integer quantization and bit packing, vectorized (no Python loop over elements).

A group of values (a row, the whole tensor, or a channel) is sent as `zero` (its minimum), `scale`
((max - min) / (2^bits - 1)) and one code per value, code = round((x - zero) / scale). Decoding
gives zero + code * scale, so every value is off by at most half a step (scale / 2). Codes of
`bits` bits are packed densely, least significant bit first: 4 int3 codes take 12 bits.
"""

from __future__ import annotations

import math

import numpy as np
import torch


class QuantError(ValueError):
    pass


def group_count(rows: int, cols: int, granularity: str) -> int:
    return {"row": rows, "tensor": 1, "channel": cols}[granularity]


def packed_size(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def quantize(x: torch.Tensor, bits: int, granularity: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (rows, cols) float32 -> zero (G,), scale (G,) float32 and codes (rows, cols) uint8."""
    if granularity == "tensor":
        lo, hi = (v.reshape(1, 1) for v in torch.aminmax(x))
    else:
        lo, hi = torch.aminmax(x, dim=1 if granularity == "row" else 0, keepdim=True)
    levels = (1 << bits) - 1
    scale = (hi - lo) / levels
    if not bool(torch.isfinite(scale).all()):  # min and max carry any nan or inf into the scale
        raise QuantError("cannot quantize non-finite values (nan or inf), or a range wider than float32 holds")
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((x - lo) / scale).clamp(0, levels).to(torch.uint8)  # (in-place round_ can stall)
    return lo.reshape(-1), scale.reshape(-1), codes


def dequantize(codes: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, granularity: str) -> torch.Tensor:
    """codes (rows, cols) uint8 -> float32, the inverse of `quantize` up to half a step."""
    shape = {"row": (-1, 1), "channel": (1, -1), "tensor": (1, 1)}[granularity]
    return torch.addcmul(zero.reshape(shape), codes.to(torch.float32), scale.reshape(shape))


def _group(bits: int) -> tuple[int, int]:
    """(codes, bytes) of the smallest whole-byte group: 8 int3 codes fill 3 bytes, 4 int6 codes 3 bytes."""
    codes = 8 // math.gcd(8, bits)
    return codes, codes * bits // 8


def pack_bits(codes: torch.Tensor, bits: int) -> bytes:
    """uint8 codes (any shape, each < 2^bits) -> densely packed bytes, least significant bit first."""
    flat = codes.reshape(-1).numpy()
    if bits == 8:
        return flat.tobytes()
    count = flat.size
    per, nbytes = _group(bits)
    pad = (-count) % per
    if pad:
        flat = np.concatenate([flat, np.zeros(pad, np.uint8)])
    lanes = flat.reshape(-1, per).astype(np.uint32)
    word = lanes[:, 0].copy()
    for i in range(1, per):  # at most 8 lanes, each one vector op over all groups
        word |= lanes[:, i] << np.uint32(i * bits)
    out = np.empty((word.size, nbytes), np.uint8)
    for j in range(nbytes):
        out[:, j] = word >> np.uint32(8 * j)
    return out.reshape(-1)[:packed_size(count, bits)].tobytes()


def unpack_bits(data: bytes | memoryview, bits: int, count: int) -> torch.Tensor:
    """The inverse of `pack_bits`: `count` codes as a uint8 tensor."""
    if len(data) != packed_size(count, bits):
        raise QuantError(f"{count} codes of {bits} bits take {packed_size(count, bits)} bytes, got {len(data)}")
    buf = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return torch.from_numpy(buf.copy())
    per, nbytes = _group(bits)
    pad = (-buf.size) % nbytes
    if pad:
        buf = np.concatenate([buf, np.zeros(pad, np.uint8)])
    cols = buf.reshape(-1, nbytes).astype(np.uint32)
    word = cols[:, 0].copy()
    for j in range(1, nbytes):
        word |= cols[:, j] << np.uint32(8 * j)
    mask = np.uint32((1 << bits) - 1)
    lanes = np.empty((word.size, per), np.uint8)
    for i in range(per):
        lanes[:, i] = (word >> np.uint32(i * bits)) & mask
    return torch.from_numpy(lanes.reshape(-1)[:count].copy())
