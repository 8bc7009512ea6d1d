"""PrivateLoRA on the body: low-rank adapters whose middle matrix only the device holds.

An adapted projection of a body layer computes  W x + B M A x:
- A (r x d_in) and B (d_out x r) are fixed random matrices, drawn from the session's seed; the
  server holds them.
- M (r x r) is the user's adapter: it lives on the device only.

Per adapted projection and step, the server sends a = A x (L x r values) to the device over the
session's WebSocket (a 'lora' frame), and the device answers with M a. Training runs the same path
backwards: the server sends the gradient g at M a, the device keeps g aᵀ (its gradient for M) and
answers with Mᵀ g.

Known weakness: the server sees every (a, M a) pair. After about r such rows it can solve for M by
least squares, so M is private against an eavesdropper on an encrypted link, not against the server.

The wrapped projections are shared by all sessions. They only add the adapter while a PrivateLoRA
session's step runs on the compute thread (`active`); otherwise they are the plain layers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from dataclasses import dataclass, field

import torch
from torch import nn

from ..wire.frame import Frame, FrameError, decode_frame, encode_frame

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
EXCHANGE_TIMEOUT_S = 60.0
_local = threading.local()  # .context: the PrivateLoRA session whose step the compute thread is running


class ExchangeError(RuntimeError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def fixed_matrices(seed: int, layer: int, module: str, r: int, d_in: int, d_out: int,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r x d_in) and B (d_out x r), drawn from (seed, layer, module): the same at training and use."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + layer * 101 + TARGETS.index(module)) % 2**63)
    a = torch.randn(r, d_in, generator=generator) / d_in ** 0.5
    b = torch.randn(d_out, r, generator=generator) / r ** 0.5
    return a.to(dtype), b.to(dtype)


class Exchange:
    """The server's half of one session's side channel: the compute thread asks, the WebSocket handler
    carries the question to the device and the answer back."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.count = 0

    def call(self, direction: str, layer: int, module: str, tensor: torch.Tensor) -> torch.Tensor:
        """Send `tensor` (L x r) to the device, return its answer (same shape). Compute thread only."""
        self.count += 1
        frame = Frame("lora", step=self.count, pos=0, tensor=tensor.detach().float(), codec="fp32",
                      extra={"dir": direction, "layer": layer, "module": module})
        answer: concurrent.futures.Future = concurrent.futures.Future()
        self.loop.call_soon_threadsafe(self.outbox.put_nowait, (encode_frame(frame), answer))
        try:
            data = answer.result(timeout=EXCHANGE_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            raise ExchangeError("timeout", f"the device did not answer the adapter exchange within "
                                           f"{EXCHANGE_TIMEOUT_S:.0f} s") from None
        try:
            reply = decode_frame(data, codec=None)
        except FrameError as exc:
            raise ExchangeError(exc.code, f"the device's adapter answer: {exc}") from None
        if reply.kind != "lora" or reply.step != self.count or tuple(reply.tensor.shape) != tuple(tensor.shape):
            raise ExchangeError("bad_lora", f"expected a 'lora' answer {self.count} of shape {list(tensor.shape)}, "
                                            f"got {reply.kind!r} {reply.step} of {list(reply.tensor.shape)}")
        return reply.tensor.to(tensor.dtype)


@dataclass
class PrivateLoraContext:
    """One session's adapter state on the server: its fixed matrices and its exchange."""

    rank: int
    targets: tuple[str, ...]
    seed: int
    exchange: Exchange | None = None
    matrices: dict = field(default_factory=dict)

    def ab(self, layer: int, module: str, base: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        key = (layer, module)
        if key not in self.matrices:
            self.matrices[key] = fixed_matrices(self.seed, layer, module, self.rank, base.in_features,
                                                base.out_features, base.weight.dtype)
        return self.matrices[key]


class active:
    """`with active(context):` the compute thread's wrapped projections add this session's adapter."""

    def __init__(self, context: PrivateLoraContext | None):
        self.context = context

    def __enter__(self):
        if self.context is not None and self.context.exchange is None:
            raise ExchangeError("needs_ws", "a PrivateLoRA session steps over its WebSocket (the server asks the "
                                            "device mid-step); HTTP steps cannot carry that exchange")
        _local.context = self.context

    def __exit__(self, *exc):
        _local.context = None


class _ExchangeFn(torch.autograd.Function):
    """M a through the device, forwards; Mᵀ g through the device, backwards."""

    @staticmethod
    def forward(ctx, a, exchange, layer, module):
        ctx.exchange, ctx.layer, ctx.module = exchange, layer, module
        return exchange.call("fwd", layer, module, a)

    @staticmethod
    def backward(ctx, grad):
        return ctx.exchange.call("bwd", ctx.layer, ctx.module, grad), None, None, None


class PrivateLoraLinear(nn.Module):
    """A body projection that adds B M A x while a PrivateLoRA session's step runs, and is plain otherwise."""

    def __init__(self, base: nn.Linear, layer: int, module: str):
        super().__init__()
        self.base, self.layer, self.module = base, layer, module

    @property
    def weight(self) -> torch.Tensor:  # what code that inspects the projection expects to find
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        context: PrivateLoraContext | None = getattr(_local, "context", None)
        if context is None or self.module not in context.targets:
            return out
        a_matrix, b_matrix = context.ab(self.layer, self.module, self.base)
        shape = x.shape
        a = x.reshape(-1, shape[-1]) @ a_matrix.T  # (rows, r): what the device sees
        ma = _ExchangeFn.apply(a, context.exchange, self.layer, self.module)
        return out + (ma @ b_matrix.T).reshape(*shape[:-1], -1)


def install(stack) -> int:
    """Wrap the attention projections of a LayerStack's layers (no-ops until a session activates them)."""
    wrapped = 0
    for j, layer in enumerate(stack.layers):
        attention = getattr(layer, "self_attn", None)
        for module in TARGETS:
            linear = getattr(attention, module, None)
            if isinstance(linear, nn.Linear):
                setattr(attention, module, PrivateLoraLinear(linear, stack.start + j, module))
                wrapped += 1
    return wrapped
