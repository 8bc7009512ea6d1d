"""Split fine-tuning: LoRA on the device's head and tail layers, the body's gradients from the server.

One training step on a block of the user's text:

    device: ids -> head(+LoRA) -> h ──up──▶ server: out = body(h), graph kept
    device: out -> tail(+LoRA) -> loss; backward to dL/d(out) ──up──▶ server: dL/dh, graph freed
    device: ◀──down── dL/dh; backward through the head; Adam step on the LoRA weights

The text, the tokens, the logits, the loss and the adapters stay on the device. The server sees the
head's output and the gradient at the body's output (hidden-state sized, like inference traffic).
"""

from __future__ import annotations

import math
import random
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from ..client.transport import BodyConnection
from ..models.llm import SplitModel, load_split
from ..models.lora import Adapter, LoraSpec
from ..models.privatelora import PrivateAdapter, PrivateLoraSpec
from ..models.source import model_name, resolve_model
from ..wire.codecs import session_codecs
from ..wire.frame import Frame, encode_frame
from ..wire.protocol import SessionRequest, WireFormat
from .lora import attach, collect

MIN_BLOCK = 16  # a last piece of text shorter than this is dropped


class TrainingBody:
    """Layers [x, y) on a body server, in a training session: `forward` leaves the graph there,
    `backward` sends the gradient at the body's output and returns the gradient at its input."""

    def __init__(self, url: str, model: SplitModel, wire: str = "fp32", token: str | None = None,
                 ca_bundle: str | None = None, timeout: float = 300.0, private: PrivateAdapter | None = None,
                 rows: int | None = None):
        # `rows`: the longest step (block) it will send; the server reserves that many rows of graph (default 512)
        self.conn = BodyConnection(url, transport="ws", token=token, ca_bundle=ca_bundle, timeout=timeout)
        wire_format = WireFormat(up=wire, down=wire, seed=secrets.randbits(62))
        request = SessionRequest(model_fingerprint=model.body_fingerprint(), x=model.split.x, y=model.split.y,
                                 dtype="float32", wire=wire_format, cache=False, train=True, max_positions=rows,
                                 private_lora=private.spec.request() if private else None)
        self.private = private
        self.opened = self.conn.open_session(request)
        if not self.opened.train:
            self.conn.close()
            raise ValueError(f"the body server at {url} cannot train (it predates split fine-tuning)")
        self.up, self.down = session_codecs(wire, wire, seed=wire_format.seed, x=model.split.x, y=model.split.y)
        self.step = 0
        self.cloud_s = 0.0

    def _send(self, kind: str, tensor: torch.Tensor) -> torch.Tensor:
        frame = Frame(kind, step=self.step, pos=0, tensor=tensor.detach(), codec=self.up)
        reply = self.conn.step(encode_frame(frame), codec=self.down,
                               on_lora=self.private.answer if self.private else None)
        self.step += 1
        self.cloud_s += reply.extra.get("cloud_us", 0) / 1e6
        return reply.tensor

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._send("hidden", hidden)

    def backward(self, grad: torch.Tensor) -> torch.Tensor:
        return self._send("grad", grad)

    def close(self) -> None:
        self.conn.close()


def text_blocks(tokenizer, text: str, block: int) -> list[list[int]]:
    """The text's tokens in consecutive blocks of `block` (the last one if at least MIN_BLOCK long)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    blocks = [ids[i:i + block] for i in range(0, len(ids), block)]
    return [b for b in blocks if len(b) >= MIN_BLOCK]


@dataclass
class TuneResult:
    steps: int
    losses: list[float]
    heldout_ppl_before: float
    heldout_ppl_after: float
    train_blocks: int
    heldout_blocks: int
    seconds: float
    cloud_s: float
    bytes_up: int
    bytes_down: int
    meta: dict = field(default_factory=dict)


class SplitTuner:
    """Adapters trained through a body server: LoRA on the head's and the tail's layers (mode "lora"), or
    PrivateLoRA on the body's attention projections, with M on the device (mode "privatelora")."""

    def __init__(self, model: str | Path | None, server: str, split: tuple[int, int], spec: LoraSpec = LoraSpec(),
                 *, wire: str = "fp32", seed: int = 0, token: str | None = None, ca_bundle: str | None = None,
                 private: PrivateLoraSpec | None = None, rows: int | None = None):
        self.folder = resolve_model(model)
        self.model = load_split(self.folder, split[0], split[1], parts=("head", "tail"))
        self.model.head.requires_grad_(False)
        self.model.tail.requires_grad_(False)
        self.spec = spec
        self.modules, self.private = {}, None
        if private is not None:
            split = self.model.split
            self.private = PrivateAdapter(private, split.x, split.y, model_name(self.folder))
            if not self.private.m:
                raise ValueError(f"split {split} gives the body no layer to adapt")
        else:
            self.modules = {**attach(self.model.head.layers, spec, seed),
                            **attach(self.model.tail.layers, spec, seed + 1)}
            if not self.modules:
                raise ValueError(f"split {self.model.split} leaves the device no layer with "
                                 f"{', '.join(spec.targets)} to adapt: the head and the tail are empty")
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.body = TrainingBody(server, self.model, wire, token, ca_bundle, private=self.private, rows=rows)

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        if self.private is not None:
            return self.private.parameters
        return [p for m in self.modules.values() for p in (m.lora_A, m.lora_B)]

    def loss(self, ids: list[int], train: bool = True) -> float:
        """The mean next-token loss of one block; with `train`, the LoRA weights' gradients accumulate."""
        tokens = torch.tensor([ids])
        with torch.set_grad_enabled(train):
            head_out = self.model.head(tokens, None, 0)  # (1, L, D)
        body_out = self.body.forward(head_out[0]).to(head_out.dtype).requires_grad_(train)
        with torch.set_grad_enabled(train):
            logits = self.model.tail(body_out.unsqueeze(0), None, 0, last_only=False)[0]
            loss = F.cross_entropy(logits[:-1].float(), tokens[0, 1:])
        if train:
            loss.backward()  # the tail's LoRA gradients, and dL/d(body output)
            grad_in = self.body.backward(body_out.grad).to(head_out.dtype)
            if head_out.requires_grad:  # X = 0: no head layers, nothing to adapt there
                head_out.backward(grad_in.unsqueeze(0))  # the head's LoRA gradients
        return loss.item()

    def perplexity(self, blocks: list[list[int]]) -> float:
        """exp of the token-weighted mean loss over blocks (no training)."""
        if not blocks:
            return float("nan")
        total = sum(self.loss(b, train=False) * (len(b) - 1) for b in blocks)
        return math.exp(total / sum(len(b) - 1 for b in blocks))

    def adapter(self) -> Adapter | PrivateAdapter:
        return self.private if self.private is not None else collect(self.modules, self.spec, model_name(self.folder))

    def train(self, text: str, *, epochs: int = 2, lr: float = 3e-3, block: int = 128, holdout: float = 0.1,
              seed: int = 0, progress: Callable[[Iterable, int], Iterable] | None = None) -> TuneResult:
        blocks = text_blocks(self.tokenizer, text, block)
        if len(blocks) < 2:
            raise ValueError(f"the text gives {len(blocks)} block(s) of up to {block} tokens; give more text (or "
                             "a smaller --block) so that some can be held out")
        n_held = max(1, round(len(blocks) * holdout)) if holdout > 0 else 0
        order = list(range(len(blocks)))
        random.Random(seed).shuffle(order)
        held = [blocks[i] for i in sorted(order[:n_held])]
        train = [blocks[i] for i in sorted(order[n_held:])]
        started = time.perf_counter()
        before = self.perplexity(held)
        optimizer = torch.optim.AdamW(self.parameters, lr=lr, weight_decay=0.0)
        losses = []
        rng = random.Random(seed + 1)
        plan = [b for _ in range(epochs) for b in rng.sample(train, len(train))]
        steps = progress(plan, len(plan)) if progress else plan
        for ids in steps:
            optimizer.zero_grad(set_to_none=True)
            losses.append(self.loss(ids, train=True))
            optimizer.step()
            if hasattr(steps, "set_postfix"):
                steps.set_postfix(loss=f"{losses[-1]:.3f}")
        after = self.perplexity(held)
        traffic = self.body.conn.measured()
        return TuneResult(len(losses), losses, before, after, len(train), len(held), time.perf_counter() - started,
                          self.body.cloud_s, traffic.frame_up, traffic.frame_down,
                          meta={"spec": asdict(self.spec), "epochs": epochs, "lr": lr, "block": block,
                                "holdout": holdout, "seed": seed, "split": str(self.model.split)})

    def close(self) -> None:
        self.body.close()
