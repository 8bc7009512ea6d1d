"""Cross-session batching: one pass of the body for several sessions, each with its own cache.

Every batched result is compared with the unbatched `LayerStack` path on the real SmolLM2 body
[1, 29): the outputs, and afterwards every layer of every session's cache. The inputs are real
hidden states (the head's output for random tokens), so the tolerances meet realistic magnitudes:
SmolLM2's residual stream holds activations up to about 1.2e4, where one float32 ulp is 1e-3.

Most tests run in float64, where batching must agree with the unbatched path to rounding
(observed: at most 3e-11 absolute), so even a small slip of the mask would show. One test runs
the production dtype, float32, with a tolerance that fits 28 layers of float32 rounding (the
unbatched float32 path itself differs from float64 by up to 3e-3 there).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache, MistralConfig, MistralForCausalLM

from lambdasplit.models import batch
from lambdasplit.models.batch import batched_forward
from lambdasplit.models.kvcache import ROLLBACK_SLACK
from lambdasplit.models.llm import LayerStack, load_split

TOLERANCE = {torch.float64: dict(atol=1e-8, rtol=1e-10), torch.float32: dict(atol=1e-3, rtol=1e-4)}


@pytest.fixture(scope="module")
def model(smol_dir):
    """Head and body in float64: the head makes realistic inputs, the body is what is batched."""
    return load_split(smol_dir, 1, 29, parts=("head", "body"), dtype=torch.float64)


@pytest.fixture(scope="module")
def stack(model) -> LayerStack:
    return model.body.layers


@pytest.fixture(scope="module")
def model32(smol_dir):
    return load_split(smol_dir, 1, 29, parts=("head", "body"))


@pytest.fixture(autouse=True)
def _inference_mode():
    with torch.inference_mode():
        yield


def hidden(model, rows: int, seed: int) -> torch.Tensor:
    """A realistic body input (rows, D): the head's output for random token ids."""
    ids = torch.randint(0, model.config.vocab_size, (1, rows), generator=torch.Generator().manual_seed(seed))
    return model.head(ids, None, 0)[0]


def prefilled(model, stack, length: int, seed: int, start=None, stop=None) -> DynamicCache:
    """A session's cache after an unbatched prefill of `length` positions (empty when length is 0)."""
    cache = stack.new_cache()
    if length:
        stack(hidden(model, length, seed).unsqueeze(0), cache, 0, start, stop)
    return cache


def assert_caches_equal(got: DynamicCache, want: DynamicCache, layers: range, who: str) -> None:
    tol = TOLERANCE[want.layers[layers[0]].keys.dtype]
    for i in layers:
        g, w = got.layers[i], want.layers[i]
        assert g.keys.shape == w.keys.shape, f"{who} layer {i}: keys {list(g.keys.shape)} != {list(w.keys.shape)}"
        for name, got_t, want_t in (("keys", g.keys, w.keys), ("values", g.values, w.values)):
            torch.testing.assert_close(got_t, want_t, **tol, msg=lambda m: f"{who} layer {i} {name}: {m}")


def run_both(stack, refs, twins, steps, start=None, stop=None):
    """Run each step unbatched on `refs` and batched on `twins`; check outputs and finally the caches.

    steps: a list of [(hidden (L, D), pos)] per step, one entry per session.
    """
    for s, step in enumerate(steps):
        outs = batched_forward(stack, [(h, twin, pos) for (h, pos), twin in zip(step, twins)], start, stop)
        assert len(outs) == len(step)
        for b, ((h, pos), ref, out) in enumerate(zip(step, refs, outs)):
            expected = stack(h.unsqueeze(0), ref, pos, start, stop)[0]
            assert out.shape == h.shape
            torch.testing.assert_close(out, expected, **TOLERANCE[h.dtype],
                                       msg=lambda m: f"step {s}, session {b} at position {pos}: {m}")
    layers = range(stack.start if start is None else start, stack.stop if stop is None else stop)
    for b, (ref, twin) in enumerate(zip(refs, twins)):
        assert_caches_equal(twin, ref, layers, f"session {b}")


EIGHT = [1, 90, 5, 33, 64, 2, 47, 20]  # cache lengths of eight sessions


def decode_three_steps(model, lengths):
    stack = model.body.layers
    refs = [prefilled(model, stack, n, seed=b) for b, n in enumerate(lengths)]
    twins = [copy.deepcopy(c) for c in refs]
    steps = [[(hidden(model, 1, seed=100 * s + b), n + s) for b, n in enumerate(lengths)] for s in range(3)]
    run_both(stack, refs, twins, steps)
    for b, n in enumerate(lengths):
        assert twins[b].get_seq_length(stack.start) == twins[b].get_seq_length(stack.stop - 1) == n + 3


@pytest.mark.parametrize("lengths", [[17], [3, 40, 11], EIGHT], ids=["B1", "B3", "B8"])
def test_decode_steps_match_unbatched(model, lengths):
    decode_three_steps(model, lengths)


def test_decode_steps_match_unbatched_in_float32(model32):
    decode_three_steps(model32, EIGHT)


def test_ragged_new_lengths_and_an_empty_cache(model, stack):
    lengths, new = [0, 12, 25, 7], [6, 1, 4, 1]
    refs = [prefilled(model, stack, n, seed=b) for b, n in enumerate(lengths)]
    twins = [copy.deepcopy(c) for c in refs]
    ragged = [(hidden(model, k, seed=10 + b), n) for b, (n, k) in enumerate(zip(lengths, new))]
    decode = [(hidden(model, 1, seed=20 + b), n + k) for b, (n, k) in enumerate(zip(lengths, new))]
    run_both(stack, refs, twins, [ragged, decode])


def test_sub_range_touches_only_its_layers(model, stack):
    start, stop = 5, 12
    lengths = [9, 30, 2]
    refs = [prefilled(model, stack, n, seed=b, start=start, stop=stop) for b, n in enumerate(lengths)]
    twins = [copy.deepcopy(c) for c in refs]
    steps = [[(hidden(model, 1, seed=40 + 10 * s + b), n + s) for b, n in enumerate(lengths)] for s in range(2)]
    run_both(stack, refs, twins, steps, start, stop)
    for twin in twins:
        assert twin.get_seq_length(start - 1) == twin.get_seq_length(stop) == 0


def test_sessions_do_not_see_each_other(model, stack):
    """Changing session 0 (its cache, its length, its input) must leave sessions 1 and 2 unchanged."""
    lengths = [30, 8, 55]
    caches = [prefilled(model, stack, n, seed=b) for b, n in enumerate(lengths)]
    inputs = [hidden(model, 1, seed=60 + b) for b in range(3)]
    first = batched_forward(stack, [(h, copy.deepcopy(c), n) for h, c, n in zip(inputs, caches, lengths)])
    other = prefilled(model, stack, 70, seed=99)  # longer than every other cache: the padding widens
    items = [(hidden(model, 1, seed=98), other, 70)]
    items += [(inputs[b], copy.deepcopy(caches[b]), lengths[b]) for b in (1, 2)]
    second = batched_forward(stack, items)
    assert (second[0] - first[0]).abs().max() > 1e-2, "the change to session 0 did not reach its own output"
    for b in (1, 2):
        torch.testing.assert_close(second[b], first[b], **TOLERANCE[first[b].dtype], msg=lambda m: f"session {b}: {m}")


def test_a_mask_that_shows_the_padding_is_caught(model, stack, monkeypatch):
    """The comparison above is sharp enough to see a mask that lets a short session attend to padding."""
    lengths = [4, 60]
    refs = [prefilled(model, stack, n, seed=b) for b, n in enumerate(lengths)]
    twins = [copy.deepcopy(c) for c in refs]
    step = [[(hidden(model, 1, seed=70 + b), n) for b, n in enumerate(lengths)]]
    real_mask = batch._mask
    monkeypatch.setattr(batch, "_mask", lambda *args: torch.ones_like(real_mask(*args)))
    with pytest.raises(AssertionError, match="session 0"):
        run_both(stack, refs, twins, step)


def test_bad_items_are_refused_before_any_cache_changes(model, stack):
    a, b = prefilled(model, stack, 5, seed=1), prefilled(model, stack, 3, seed=2)
    h = hidden(model, 1, seed=3)
    with pytest.raises(ValueError, match="share one cache"):
        batched_forward(stack, [(h, a, 5), (h, a, 5)])
    with pytest.raises(ValueError, match="expected"):
        batched_forward(stack, [(h, a, 5), (h[:, :10], b, 3)])
    with pytest.raises(ValueError, match="not within"):
        batched_forward(stack, [(h, a, 5)], 0, 29)
    partial = prefilled(model, stack, 4, seed=4, start=1, stop=10)
    with pytest.raises(ValueError, match="different lengths"):
        batched_forward(stack, [(h, a, 5), (h, partial, 4)])
    assert a.get_seq_length(1) == 5 and b.get_seq_length(1) == 3 and partial.get_seq_length(1) == 4
    assert batched_forward(stack, []) == []


def test_sliding_window_layers_are_batched_to_rounding(tmp_path):
    """Mistral with a window of 4: sessions shorter than, at, and far past the window, batched in float64,
    agree with each alone to rounding, and their caches hold only the window (plus the rollback slack)."""
    config = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=64, sliding_window=4)
    MistralForCausalLM(config).save_pretrained(tmp_path)
    stack = load_split(tmp_path, 0, 2, parts=("body",), dtype=torch.float64).body.layers
    lengths = (2, 4, 40)
    alone, together = [stack.new_cache() for _ in lengths], [stack.new_cache() for _ in lengths]
    pos = [0] * len(lengths)
    gen = torch.Generator().manual_seed(0)
    for rows in (lengths, (1, 1, 1), (3, 1, 5), (1, 2, 1)):
        hidden = [torch.randn(r, 64, generator=gen, dtype=torch.float64) for r in rows]
        want = [stack(h.unsqueeze(0), c, p)[0] for h, c, p in zip(hidden, alone, pos)]
        for g, w in zip(batched_forward(stack, list(zip(hidden, together, pos))), want):
            torch.testing.assert_close(g, w, **TOLERANCE[torch.float64])
        pos = [p + r for p, r in zip(pos, rows)]
    for a, b in zip(alone, together):
        for la, lb in zip(a.layers, b.layers):
            torch.testing.assert_close(lb.keys, la.keys, **TOLERANCE[torch.float64])
    assert together[2].layers[0].keys.shape[-2] == 3 + ROLLBACK_SLACK < pos[2]
