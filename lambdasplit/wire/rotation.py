"""A random orthogonal rotation that both sides rebuild from a session seed.

LLM hidden states carry a few huge channels. Quantizing a row whose range is set by one outlier
wastes almost every level on the rest. Rotating the row first spreads each outlier over all
channels, so the range shrinks and low-bit codes keep their precision; the receiver rotates back.

For a width n = m * 2^k the rotation is (C_m (x) H_2^k) * diag(s): random signs s, then a
Walsh-Hadamard transform over blocks of 2^k and an orthonormal DCT-II over the m blocks (m = 1
when n is a power of two). H_2^k is itself applied as a Kronecker product of Hadamard factors of
at most 64, so the whole rotation is two or three small matrix products: for n = 4096, H_64 (x)
H_64 costs 2 x 64 multiply-adds per value instead of 4096. All of it is orthonormal, so the L2
error of quantization is unchanged by the inverse. The signs come from SHAKE-256 of the seed: the
same bits on every platform and every torch version. The rotation gives no privacy: the server
knows the seed, as it must.
"""

from __future__ import annotations

import hashlib
import math
from functools import lru_cache

import numpy as np
import torch

MAX_ODD_FACTOR = 1024
MAX_HADAMARD_FACTOR = 64
MAX_WIDTH = 1 << 16  # wider than any model's hidden state: a rotation holds n signs, so n is bounded


class RotationError(ValueError):
    pass


def hadamard_matrix(n: int) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix of order n (a power of two)."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def _dct_matrix(m: int) -> torch.Tensor:
    k = torch.arange(m, dtype=torch.float64)[:, None]
    i = torch.arange(m, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * (2 * i + 1) * k / (2 * m)) * math.sqrt(2.0 / m)
    c[0] /= math.sqrt(2.0)
    return c.to(torch.float32)


def _signs(n: int, seed: int) -> torch.Tensor:
    digest = hashlib.shake_256(f"lambdasplit-rotation:{seed}:{n}".encode()).digest((n + 7) // 8)
    bits = np.unpackbits(np.frombuffer(digest, dtype=np.uint8), count=n, bitorder="little")
    return torch.from_numpy(1.0 - 2.0 * bits.astype(np.float32))


class Rotation:
    """The seeded rotation of rows of width n: `forward` before quantizing, `inverse` after."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise RotationError(f"cannot rotate rows of width {n}")
        if n > MAX_WIDTH:
            raise RotationError(f"cannot rotate rows of width {n}: the widest rotation is {MAX_WIDTH}")
        self.n, self.seed = n, seed
        k = n & -n  # the largest power of two dividing n
        m = n // k
        if m > MAX_ODD_FACTOR:
            raise RotationError(f"width {n} = {m} x {k}: the odd factor {m} is over {MAX_ODD_FACTOR}; "
                                "the rotation needs a width that is a power of two times a small number")
        self.signs = _signs(n, seed)
        self.factors = [_dct_matrix(m)] if m > 1 else []
        while k > 1:
            size = min(k, MAX_HADAMARD_FACTOR)
            self.factors.append(hadamard_matrix(size))
            k //= size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply(x * self.signs, transpose=False)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self._apply(y, transpose=True) * self.signs

    def _apply(self, x: torch.Tensor, transpose: bool) -> torch.Tensor:
        """(F_1 (x) F_2 (x) ...) applied to each row: one batched matrix product per factor."""
        shape, before, after = x.shape, x.numel() // self.n, self.n
        for f in self.factors:
            size = f.shape[0]
            after //= size
            f = f.T if transpose else f
            if after == 1:  # the last factor: one plain matrix product over all rows
                x = x.reshape(before, size) @ f.T
            else:
                x = torch.matmul(f, x.reshape(before, size, after))
            before *= size
        return x.reshape(shape)


@lru_cache(maxsize=8)
def rotation(n: int, seed: int) -> Rotation:
    """A shared rotation, for tools; a session's codec keeps its own (one width), so a peer's frames of
    other widths never fill this cache."""
    return Rotation(n, seed)
