"""Codecs: how a hidden-state tensor becomes payload bytes, and back.

Each codec is chosen per direction when a session opens. Payload bytes are little-endian.
A codec knows, from the shape alone, how many bytes a payload must have, so a frame is checked
before anything is allocated. (Quantizing codecs arrive with the wire-codecs issue.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


class CodecError(ValueError):
    pass


@dataclass(frozen=True)
class Codec:
    """A lossless or lossy float format: name, element size, and numpy/torch storage types."""

    name: str
    itemsize: int
    np_dtype: str  # little-endian storage type on the wire
    torch_dtype: torch.dtype  # the tensor type the storage is viewed as

    def payload_size(self, shape: tuple[int, ...]) -> int:
        return _numel(shape) * self.itemsize

    def encode(self, tensor: torch.Tensor) -> bytes:
        t = tensor.detach().to("cpu", self.torch_dtype).contiguous()
        if self.torch_dtype == torch.bfloat16:
            t = t.view(torch.int16)
        return t.numpy().astype(self.np_dtype, copy=False).tobytes()

    def decode(self, payload: bytes | memoryview, shape: tuple[int, ...], out_dtype: torch.dtype) -> torch.Tensor:
        if len(payload) != self.payload_size(shape):
            raise CodecError(f"{self.name} payload of shape {list(shape)} must be "
                             f"{self.payload_size(shape)} bytes, got {len(payload)}")
        arr = np.frombuffer(payload, dtype=self.np_dtype).astype(self.np_dtype[1:], copy=True)
        t = torch.from_numpy(arr)
        if self.torch_dtype == torch.bfloat16:
            t = t.view(torch.bfloat16)
        return t.reshape(shape).to(out_dtype)


CODECS: dict[str, Codec] = {
    c.name: c
    for c in (
        Codec("fp32", 4, "<f4", torch.float32),
        Codec("fp16", 2, "<f2", torch.float16),
        Codec("bf16", 2, "<i2", torch.bfloat16),
    )
}


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except KeyError:
        raise CodecError(f"unknown codec {name!r}; known: {', '.join(CODECS)}") from None


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
