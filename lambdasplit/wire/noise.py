"""The noise defence (the `noise:S` codec part): Gaussian noise added to a hidden state before it is sent.

Each row (one position's state) gets independent noise of standard deviation `scale` times the
row's root-mean-square, so `scale` is a noise-to-signal ratio that means the same at every layer.
The noise must come from a source the receiver cannot predict: the wire codec draws it from a
generator seeded by the operating system's randomness, never from the session's (shared) seed.
"""

from __future__ import annotations

import secrets

import torch


def add_noise(x: torch.Tensor, scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """x + N(0, (scale * rms(row))^2) per row of the last dimension; x itself is left as it was."""
    if scale < 0 or scale != scale:
        raise ValueError(f"the noise scale must be >= 0, got {scale}")
    if scale == 0:
        return x
    rms = x.float().pow(2).mean(-1, keepdim=True).sqrt()
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float32, device=x.device)
    return (x.float() + noise * rms * scale).to(x.dtype)


def private_generator() -> torch.Generator:
    """A generator seeded from the OS's randomness: noise the other side cannot subtract."""
    return torch.Generator().manual_seed(secrets.randbits(63))
