"""Per-session KV caches that hold what their layers need, and can roll back a speculative round.

A full-attention layer keeps every position. A sliding-window layer needs only the last `window - 1`
positions to compute the next one, but speculative decoding verifies k drafts in one step and then
forgets the rejected ones: a layer that had already dropped the positions before them could not go
back. `SlidingLayer` therefore keeps `ROLLBACK_SLACK` positions beyond the window (enough for the
longest draft the client sends) and no more; a rollback deeper than that is refused with a clear
error rather than left inconsistent. Each side builds caches only for the layers it runs, and the body
server's KV budget counts what a sliding layer really holds (`kv_cache_bytes`), not the whole context.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

ROLLBACK_SLACK = 16
"""Positions a sliding layer keeps beyond its window: the client's longest draft (15) plus the bonus row."""


class SlidingLayer(DynamicSlidingWindowLayer):
    """A sliding-window layer that keeps `window - 1 + slack` positions, so the last `slack` can be rolled back."""

    def __init__(self, sliding_window: int, slack: int = ROLLBACK_SLACK):
        super().__init__(sliding_window=sliding_window)
        self.slack = slack
        self.record_past = True  # return the window the mask expects; trimming is ours (below)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        visible = super().update(key_states, value_states, *args, **kwargs)
        keep = self.sliding_window - 1 + self.slack
        if self.keys.shape[-2] > keep:
            self.keys, self.values = self.keys[:, :, -keep:], self.values[:, :, -keep:]
        return visible

    def held(self) -> int:
        """Positions this layer holds now."""
        return 0 if not self.is_initialized else int(self.keys.shape[-2])

    def rollback(self, length: int) -> None:
        """Forget every position at or after `length`."""
        drop = self.cumulative_length - length
        if drop <= 0:
            return
        if self.cumulative_length >= self.sliding_window and drop > self.held() - (self.sliding_window - 1):
            raise NotImplementedError(
                f"cannot roll back {drop} positions: a sliding-window layer (window {self.sliding_window}) keeps "
                f"only {self.slack} positions beyond its window for speculative rollbacks")
        self.crop(-drop)


def new_cache(config: PretrainedConfig) -> DynamicCache:
    """A cache for one session: full layers, and sliding layers that keep their window plus the rollback slack."""
    cache = DynamicCache(config=config)
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicSlidingWindowLayer:
            cache.layers[i] = SlidingLayer(layer.sliding_window)
    return cache


def cached_length(cache: DynamicCache) -> int:
    """Positions a cache holds (the longest of its layers: layers no part runs stay empty)."""
    return max((layer.get_seq_length() for layer in cache.layers), default=0)


def truncate_cache(cache: DynamicCache, length: int) -> None:
    """Forget every cached position at or after `length`: the rollback of speculative decoding.

    A sliding layer rolls back at most its slack once it has filled its window; a deeper rollback (and a
    cache of another kind that cannot go back) is refused rather than left inconsistent.
    """
    if length < 0:
        raise ValueError(f"cannot truncate a cache to {length} positions")
    for layer in cache.layers:
        held = layer.get_seq_length()
        if held <= length:
            continue
        if isinstance(layer, SlidingLayer):
            layer.rollback(length)
        elif type(layer) is DynamicLayer:
            layer.crop(length - held)
        else:
            raise NotImplementedError(f"rollback needs full-attention or lambdasplit sliding caches; this model "
                                      f"has a {type(layer).__name__}")


def layer_types(config: PretrainedConfig) -> list[str]:
    """The attention kind of each layer: 'full_attention' or 'sliding_attention'."""
    n = config.num_hidden_layers
    if types := getattr(config, "layer_types", None):
        return list(types)
    return ["sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"] * n


def kv_bytes_per_position(config: PretrainedConfig, itemsize: int) -> int:
    """KV-cache bytes one position takes in one layer: a key and a value per KV head."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * heads * head_dim * itemsize


def held_positions(config: PretrainedConfig, kind: str, positions: int) -> int:
    """Positions a layer of this kind holds after `positions` have gone through it."""
    window = getattr(config, "sliding_window", None)
    if kind == "sliding_attention" and window:
        return min(positions, window - 1 + ROLLBACK_SLACK)
    return positions


def kv_cache_bytes(config: PretrainedConfig, itemsize: int, x: int, y: int, positions: int) -> int:
    """Bytes the caches of layers [x, y) hold after `positions` positions (sliding layers at most their window)."""
    kinds = layer_types(config)[x:y]
    return kv_bytes_per_position(config, itemsize) * sum(held_positions(config, k, positions) for k in kinds)
