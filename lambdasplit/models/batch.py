"""One forward pass of a body's layers for several sessions at once (cross-session batching).

Decode on a CPU server is bound by memory bandwidth: one step of one session reads every weight of
the body to compute a single row. `batched_forward` stacks the new rows of B sessions into one
batch, so the weights are read once for B rows, while each session keeps its own `DynamicCache`
of its own length.

Layout, per call:

- queries: row b holds session b's L_b new hidden rows, right-padded with zeros to max L;
- keys/values: each layer's stock attention calls `cache.update(k, v, layer_idx)` (named `past_key_values` before transformers 5.24). The
  stand-in cache given to the layers (`_SessionsKV`) appends session b's L_b real new rows to
  session b's own cache (through that cache's own `update`, so it ends exactly as the unbatched
  path leaves it), then returns the sessions' full keys/values, right-padded with zeros to the
  longest (S = max T_b + L_b positions);
- mask: one boolean (B, 1, max L, S) mask per call, shared by all layers: query row q of session b
  sees key slots s <= T_b + q (T_b = its cached length), so it is causal for the new rows and
  never sees the padding, nor, being its own batch row, any other session. Padding query rows see
  the keys of the last real row (no fully masked row, hence no NaN); their outputs and their
  keys/values are dropped;
- positions: row b runs at pos_b .. pos_b + max L - 1, and the rotary embeddings are computed
  once for the whole batch.

Ragged new lengths are padded to the longest, so B * max(L) rows are computed: batch decode steps
(L = 1) together and send a long prefill on its own, or with prefills of similar length.
Sliding-window layers get a mask of their own: each session's cache shows only its window (as
`get_mask_sizes` advertises it), so key slot s of session b holds position offset_b + s, and a query
sees the slots within `sliding_window` positions before it.
Items are validated before any cache is touched, but if a layer raises midway, every session of
the batch may hold a half-updated cache and cannot go on: the server's compute thread closes them all
(`Session.fail`, called by `Scheduler._run_group` in server/scheduler.py), as it closes a single session
whose step fails.
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import DynamicCache

from .llm import LayerStack

Item = tuple[torch.Tensor, DynamicCache, int]
"""(hidden (L, D), the session's cache, pos = the position of its first new row)."""


def can_batch(stack: LayerStack, start: int, stop: int) -> bool:
    """Whether batched_forward handles layers [start, stop) of this stack (full or sliding attention, sdpa or eager)."""
    kinds = stack.types[start - stack.start:stop - stack.start]
    return (all(k in MASKS for k in kinds) and stack.config._attn_implementation in ("sdpa", "eager"))


MASKS = ("full_attention", "sliding_attention")


def batched_forward(stack: LayerStack, items: list[Item], start: int | None = None,
                    stop: int | None = None) -> list[torch.Tensor]:
    """Run layers [start, stop) (default: all of `stack`) once for all sessions; return each output (L_i, D).

    Afterwards each session's cache holds exactly what `stack(hidden.unsqueeze(0), cache, pos, start, stop)`
    would have left (same lengths; the same values within floating-point tolerance). Every item is
    checked before any cache is touched.
    """
    start = stack.start if start is None else start
    stop = stack.stop if stop is None else stop
    if not stack.start <= start <= stop <= stack.stop:
        raise ValueError(f"layers [{start}, {stop}) are not within this stack's [{stack.start}, {stack.stop})")
    if not items or start == stop:
        return [hidden for hidden, _, _ in items]
    types = stack.types[start - stack.start:stop - stack.start]
    if other := [t for t in types if t not in MASKS]:
        raise NotImplementedError(f"batched_forward builds masks for full and sliding attention, not {other[0]!r}")
    cached = _check(items, start, stop, stack.config.hidden_size)
    new = [h.shape[0] for h, _, _ in items]
    hidden = pad_sequence([h for h, _, _ in items], batch_first=True)  # (B, max L, D), zero-padded
    device = hidden.device
    rows = torch.arange(hidden.shape[1], device=device)
    positions = torch.tensor([pos for _, _, pos in items], device=device)[:, None] + rows
    window = getattr(stack.config, "sliding_window", None)
    masks = {}
    for kind in dict.fromkeys(types):
        first = start + types.index(kind)  # the sessions' caches of this kind all advertise the same window
        sizes = [cache.layers[first].get_mask_sizes(n) for (_, cache, _), n in zip(items, new)]
        masks[kind] = _mask(stack.config._attn_implementation, cached, new, sizes,
                            window if kind == "sliding_attention" else None, hidden.dtype, device)
    inputs = stack.layer_inputs(hidden, positions, masks)
    kv = _SessionsKV([cache for _, cache, _ in items], new)
    for j in range(start - stack.start, stop - stack.start):
        hidden = stack.run_layer(j, hidden, positions, inputs[stack.types[j]], kv)
    return [hidden[b, :n] for b, n in enumerate(new)]


class _SessionsKV:
    """Stands in for the cache inside the stock layers: writes each session's new rows to its own cache
    and hands the attention the batch's keys/values, right-padded with zeros to `width` positions.

    The padded keys/values are two buffers shared by all layers of the call (a layer's attention is done
    with them before the next layer's update), so they are allocated and zeroed once per call, not per
    layer; every layer overwrites the same slots, and the padding stays zero.
    """

    def __init__(self, caches: list[DynamicCache], new: list[int]):
        self.caches, self.new = caches, new
        self.buffers: dict[tuple, torch.Tensor] = {}

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        """keys/values (B, H, max L, d) of layer `layer_idx` -> all sessions' (B, H, width, d), padded, where
        width is the most positions a session's cache of this layer shows (its mask's width)."""
        full = [cache.update(keys[b:b + 1, :, :n], values[b:b + 1, :, :n], layer_idx, *args, **kwargs)
                for b, (cache, n) in enumerate(zip(self.caches, self.new))]
        width = max(k.shape[-2] for k, _ in full)
        batch_k, batch_v = self._buffer("k", keys, width), self._buffer("v", values, width)
        for b, (k, v) in enumerate(full):
            batch_k[b, :, :k.shape[-2]] = k[0]
            batch_v[b, :, :v.shape[-2]] = v[0]
            if k.shape[-2] < width:  # a shorter window than another layer's of this width left: keep padding 0
                batch_k[b, :, k.shape[-2]:] = 0
                batch_v[b, :, v.shape[-2]:] = 0
        return batch_k, batch_v

    def _buffer(self, name: str, like: torch.Tensor, width: int) -> torch.Tensor:
        """One zeroed buffer per (keys or values, width), shared by the layers that show that width."""
        shape = (like.shape[0], like.shape[1], width, like.shape[-1])
        key = (name, shape, like.dtype)
        if key not in self.buffers:
            self.buffers[key] = like.new_zeros(shape)
        return self.buffers[key]


def _check(items: list[Item], start: int, stop: int, dim: int) -> list[int]:
    """Validate every item before any cache is touched; return each session's cached length."""
    if len({id(cache) for _, cache, _ in items}) != len(items):
        raise ValueError("two items share one cache; each session needs its own")
    if len({(h.dtype, h.device) for h, _, _ in items}) != 1:
        raise ValueError("all hidden states must share one dtype and device")
    cached = []
    for b, (hidden, cache, pos) in enumerate(items):
        if hidden.dim() != 2 or hidden.shape[0] == 0 or hidden.shape[1] != dim:
            raise ValueError(f"item {b}'s hidden state has shape {list(hidden.shape)}; expected (L >= 1, {dim})")
        if cache is None:
            raise ValueError(f"item {b} has no cache; batched_forward needs one DynamicCache per session")
        if pos < 0:
            raise ValueError(f"item {b} has a negative position {pos}")
        lengths = {cache.get_seq_length(i) for i in range(start, stop)}
        if len(lengths) != 1:
            raise ValueError(f"item {b}'s cache holds different lengths {sorted(lengths)} in layers [{start}, {stop})")
        cached.append(lengths.pop())
    return cached


def _mask(kind: str, cached: list[int], new: list[int], sizes: list[tuple[int, int]], window: int | None,
          dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The (B, 1, max L, S) mask of one attention kind. Session b's cache shows `sizes[b] = (kv_length,
    kv_offset)`: key slot s holds position kv_offset + s. Query row q (at position cached_b + q, padding rows
    as the last real row) sees slot s if s < kv_length, its position is not after the query's, and, in a
    sliding layer, it is less than `window` positions before it."""
    if kind not in ("sdpa", "eager"):
        raise NotImplementedError(f"batched_forward builds masks for 'sdpa' and 'eager' attention, not {kind!r}")
    lengths = torch.tensor([length for length, _ in sizes], device=device)
    offsets = torch.tensor([offset for _, offset in sizes], device=device)
    slots = torch.arange(int(lengths.max()), device=device)
    rows = torch.arange(max(new), device=device)
    cached_t, new_t = torch.tensor(cached, device=device), torch.tensor(new, device=device)
    query = cached_t[:, None] + torch.minimum(rows[None, :], new_t[:, None] - 1)  # (B, max L): each row's position
    key = offsets[:, None] + slots[None, :]  # (B, S): each slot's position
    visible = (key[:, None, :] <= query[:, :, None]) & (slots < lengths[:, None])[:, None, :]
    if window is not None:
        visible &= query[:, :, None] - key[:, None, :] < window
    visible = visible[:, None]
    if kind == "sdpa":
        return visible
    return torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(~visible, torch.finfo(dtype).min)
