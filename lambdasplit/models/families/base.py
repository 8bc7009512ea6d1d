"""What a model family's causal-LM forward does around its stock decoder layers.

A split is exact only if head + body + tail compute what the unsplit model's forward computes. The
stock layer modules do the attention and the MLP; everything a model class does *between* them is
declared here, once per family: where its modules live, how the head turns ids into the first hidden
state (scaled or position-added embeddings), what each layer is given besides the hidden state
(rotary tables, per-type rotary bases), what happens to the logits (soft-capping), and how a
checkpoint's tensors map onto the modules (fused experts). `Family` is the Llama layout; the other
families override only what differs.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig


class Family:
    """The Llama layout: embed_tokens -> layers (rotary tables shared by all) -> norm -> lm_head."""

    name = "llama"
    types: tuple[str, ...] = ()
    base = "model"  # the causal LM's attribute that holds the decoder
    embed = "embed_tokens"
    layers = "layers"
    norm = "norm"
    rotary: str | None = "rotary_emb"
    lm_head_keys: tuple[str, ...] = ("lm_head.",)  # where checkpoints keep the LM head, first found wins
    fused_checkpoint = False  # its checkpoints name tensors its modules do not have: `convert` maps them
    keep_float: tuple[str, ...] = ()  # layer submodules a quantized format leaves in float (routers)
    full_masks = False  # the layers need every mask built (never None for "causal, let SDPA do it")
    head_modules: tuple[str, ...] = ()  # more modules under `base` that the head holds (learned positions, ...)
    notes = ""  # what this family adds to the Llama layout (docs/families.md)
    default_wire: str | None = None  # the wire codecs when none are asked for (None: the project's default)

    # ---- where things live -------------------------------------------------------------------
    def decoder(self, model: nn.Module) -> nn.Module:
        return getattr(model, self.base)

    def prefix(self, keys: Iterable[str]) -> str:
        """The checkpoint key prefix of the decoder: 'model.' as saved by transformers, '' in checkpoints
        that store the decoder bare (the original GPT-2)."""
        wanted = f"{self.base}."
        return wanted if any(k.startswith(wanted) for k in keys) else ""

    def layer_prefix(self, prefix: str, i: int) -> str:
        return f"{prefix}{self.layers}.{i}."

    # ---- what the forward does around the layers ---------------------------------------------
    def attention(self, config: PretrainedConfig) -> str:
        """The attention implementation the stock layers run with."""
        return "sdpa"

    def embed_ids(self, head: nn.Module, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token ids (1, L) at `positions` -> the first hidden state (before layer 0)."""
        return head.embed(ids)

    def make_rotary(self, decoder: nn.Module, config: PretrainedConfig, device: torch.device) -> nn.Module | None:
        """A fresh rotary module (it has no weights: its tables come from the config), or None."""
        if self.rotary is None:
            return None
        return type(getattr(decoder, self.rotary))(config=config).to(device)

    def layer_inputs(self, config: PretrainedConfig, rotary: nn.Module | None, hidden: torch.Tensor,
                     positions: torch.Tensor, masks: dict[str, torch.Tensor | None]) -> dict[str, dict]:
        """What each attention kind's layers take besides hidden, positions and cache: the rotary tables
        here; an `attention_mask` given here replaces the kind's mask in `masks`."""
        if rotary is None:
            return {kind: {} for kind in masks}
        rope = rotary(hidden, positions)
        return {kind: {"position_embeddings": rope} for kind in masks}

    def logits(self, config: PretrainedConfig, logits: torch.Tensor) -> torch.Tensor:
        return logits

    # ---- loading ---------------------------------------------------------------------------------
    def convert(self, state: dict[str, torch.Tensor], wanted: set[str]) -> dict[str, torch.Tensor]:
        """A layer's checkpoint tensors (named as in the layer) -> the names and layout its module wants."""
        return state

    def fill_buffers(self, module: nn.Module, device: torch.device) -> None:
        """Give computed (non-checkpoint) buffers that the meta-device build left empty their values."""

    def variant(self, config: PretrainedConfig) -> Family:
        """The adapter for this config (a family whose variants differ outside the layers picks one)."""
        return self

    def check(self, config: PretrainedConfig) -> str | None:
        """Why this config cannot be split exactly (None: it can)."""
        return None

    def __repr__(self) -> str:
        return f"<family {self.name}: {', '.join(self.types)}>"


@functools.cache  # asked on every forward (Gemma's rotary): the signature is read once per function
def takes(fn, name: str) -> bool:
    """Whether a function takes a parameter called `name`."""
    return name in inspect.signature(fn).parameters
