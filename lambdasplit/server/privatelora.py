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
session's step runs (`active`); otherwise they are the plain layers. Such a step runs on a thread of its
own (scheduler.py), never on the shared compute thread: it holds the compute lock for its matrix work and
lets go of it while it waits for the device, which has `timeout` seconds (serve --exchange-timeout) to
answer each question before the step fails and the session is closed.
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
EXCHANGE_TIMEOUT_S = 5.0  # the default of serve --exchange-timeout
_local = threading.local()  # .context: the PrivateLoRA session whose step this thread is running


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
    """The server's half of one session's side channel: the step's thread asks, the WebSocket handler
    carries the question to the device and the answer back. While it waits, the step lets go of `held`
    (the compute lock, set by `active`), so that other sessions' steps go on."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float = EXCHANGE_TIMEOUT_S):
        self.loop = loop
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.count = 0
        self.timeout = timeout
        self.held: threading.Lock | None = None

    def call(self, direction: str, layer: int, module: str, tensor: torch.Tensor) -> torch.Tensor:
        """Send `tensor` (L x r) to the device, return its answer (same shape). The step's thread only."""
        self.count += 1
        frame = Frame("lora", step=self.count, pos=0, tensor=tensor.detach().float(), codec="fp32",
                      extra={"dir": direction, "layer": layer, "module": module})
        answer: concurrent.futures.Future = concurrent.futures.Future()
        self.loop.call_soon_threadsafe(self.outbox.put_nowait, (encode_frame(frame), answer))
        held = self.held
        if held is not None:
            held.release()  # the device's round trip is no matrix work: the other sessions' steps go on
        try:
            data = answer.result(timeout=self.timeout)
        except concurrent.futures.TimeoutError:
            raise ExchangeError("exchange_timeout", f"the device did not answer PrivateLoRA exchange {self.count} "
                                                    f"within {self.timeout:g} s") from None
        finally:
            if held is not None:
                held.acquire()
        try:
            # bounded by the question: an answer of another shape is refused before it is decoded
            reply = decode_frame(data, codec=None, width=tensor.shape[-1], max_rows=tensor.numel() // tensor.shape[-1])
        except FrameError as exc:
            code = "bad_lora" if exc.code == "bad_shape" else exc.code
            raise ExchangeError(code, f"the device's adapter answer: {exc}") from None
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
    """`with active(context, lock, timeout):` this thread's wrapped projections add the session's adapter; each
    exchange lets go of `lock` (held by the caller) while it waits up to `timeout` s for the device."""

    def __init__(self, context: PrivateLoraContext | None, lock: threading.Lock | None = None,
                 timeout: float = EXCHANGE_TIMEOUT_S):
        self.context, self.lock, self.timeout = context, lock, timeout

    def __enter__(self):
        if self.context is None:
            return
        exchange = self.context.exchange
        if exchange is None:
            raise ExchangeError("needs_ws", "a PrivateLoRA session steps over its WebSocket (the server asks the "
                                            "device mid-step); HTTP steps cannot carry that exchange")
        exchange.held, exchange.timeout = self.lock, self.timeout  # the backward pass may ask from another thread
        _local.context = self.context

    def __exit__(self, *exc):
        if self.context is not None and self.context.exchange is not None:
            self.context.exchange.held = None
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
