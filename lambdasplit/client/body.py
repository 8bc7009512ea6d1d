"""The body as the device sees it: a remote session over the wire, or local layers in-process.

Both have one method, `forward(hidden (L, D), pos) -> hidden (L, D)`, so the generation loop
does not care where the body runs. The local one is the unsplit baseline of the benchmarks.
"""

from __future__ import annotations

import time

import torch

from ..models.llm import Body
from ..wire.codecs import Codec
from ..wire.frame import Frame, decode_frame, encode_frame
from ..wire.protocol import SessionRequest
from .transport import BodyConnection, BodyError


class RemoteBody:
    """Layers [x, y) on a body server, reached through one session."""

    def __init__(self, connection: BodyConnection, request: SessionRequest, codecs: tuple[Codec, Codec],
                 dtype: torch.dtype):
        self.connection, self.request, self.dtype = connection, request, dtype
        self.up, self.down = codecs
        self.step = 0
        self.cloud_s = 0.0  # the server's own compute time, as it reports it in each reply
        self.opened = connection.open_session(request)

    def forward(self, hidden: torch.Tensor, pos: int) -> torch.Tensor:
        if pos + hidden.shape[0] > self.opened.max_positions:
            raise BodyError("too_long", f"the sequence would reach {pos + hidden.shape[0]} positions; the server "
                                        f"allows {self.opened.max_positions} per session")
        frame = Frame("hidden", step=self.step, pos=pos, tensor=hidden, codec=self.up)
        reply = self.connection.step(encode_frame(frame), codec=self.down)
        self.step += 1
        cloud_us = reply.extra.get("cloud_us", 0)
        self.cloud_s += cloud_us / 1e6 if isinstance(cloud_us, int) else 0.0
        return reply.tensor.to(self.dtype)

    def close(self) -> None:
        self.connection.close_session()


class LocalBody:
    """Layers [x, y) in this process, with their own cache: no network.

    With `codecs` (up, down), each hidden state still goes through real frames, encoded and
    decoded in-process: what the wire would do to it, minus the sockets (the codec benchmarks).
    """

    def __init__(self, body: Body, use_cache: bool = True, codecs: tuple[Codec, Codec] | None = None):
        self.body, self.codecs = body, codecs
        self.cache = body.layers.new_cache() if use_cache else None
        self.cloud_s = 0.0
        self.steps = 0

    def forward(self, hidden: torch.Tensor, pos: int) -> torch.Tensor:
        hidden = self._wire(hidden, pos, 0)
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.body(hidden.unsqueeze(0), self.cache, pos)[0]
        self.cloud_s += time.perf_counter() - started
        out = self._wire(out, pos, 1)
        self.steps += 1
        return out

    def _wire(self, hidden: torch.Tensor, pos: int, direction: int) -> torch.Tensor:
        if self.codecs is None:
            return hidden
        codec = self.codecs[direction]
        data = encode_frame(Frame("hidden", step=self.steps, pos=pos, tensor=hidden, codec=codec))
        return decode_frame(data, codec=codec).tensor.to(hidden.dtype)

    def close(self) -> None:
        self.cache = None
