"""Draft sources for speculative decoding: cheap guesses, on the device, of the tokens that come next.

A draft source proposes up to k tokens that continue a context. It never decides what is generated
(the full model checks every draft, see speculative.py), so a bad guess costs only time. Two sources:

- `NgramDraft` ("ngram", prompt lookup): if the last n tokens appeared before in the prompt or the
  answer, propose what followed them then. No model, no compute: it shines where text repeats
  (code, lists, quoting the prompt) and proposes nothing elsewhere.
- `EarlyExitDraft` ("self"): the device's own layers only. The head's output goes straight into the
  tail, skipping the body's layers [X, Y), and the tail's greedy choices are the drafts. It needs no
  second model and no network, but it costs device compute per draft, and its guesses are only as
  good as the shallow model the skip leaves.

- `BridgeDraft` ("bridge"): the early exit made useful. A linear map fitted once (bridge.py) guesses
  the body's output from the head's output and the body's true output one position back, which
  came down with the last step; the tail turns the guess into a draft. It runs on the real head and
  tail caches (the context is exact), then rolls them back.

The first two see only committed tokens (the prompt, the answer so far, and the token about to be fed), which
only ever grow: a rollback forgets draft positions, never committed ones.
"""

from __future__ import annotations

import torch

from ..models.llm import SplitModel, truncate_cache
from .bridge import Bridge


class NgramDraft:
    """Prompt lookup: continue the most recent earlier occurrence of the context's last n tokens
    (the longest n from `max_n` down to `min_n` that occurred before)."""

    name = "ngram"

    def __init__(self, max_n: int = 4, min_n: int = 2):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.max_n, self.min_n = max_n, min_n
        self.tables: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(min_n, max_n + 1)}
        self.indexed = 0  # continuation positions e < indexed are in the tables

    def _index(self, ids: list[int]) -> None:
        """Add every n-gram ids[e - n:e] that has a continuation (e < len(ids)), mapped to e (the latest wins)."""
        if len(ids) < self.indexed:  # a different, shorter context: start over
            self.tables = {n: {} for n in self.tables}
            self.indexed = 0
        for e in range(self.indexed, len(ids)):
            for n, table in self.tables.items():
                if e >= n:
                    table[tuple(ids[e - n:e])] = e
        self.indexed = len(ids)

    def propose(self, ids: list[int], k: int) -> list[int]:
        if k <= 0 or not ids:
            return []
        self._index(ids)  # n-grams ending before the last token: the tail n-gram itself is not indexed
        for n in range(self.max_n, self.min_n - 1, -1):
            if len(ids) > n and (e := self.tables[n].get(tuple(ids[-n:]))) is not None:
                return ids[e:e + k]
        return []


class EarlyExitDraft:
    """The device's head and tail with the body skipped: tail(head(tokens)), greedy, as the draft.

    It keeps its own head and tail caches (the skip path's keys and values differ from the real
    ones after the body), catches them up on the committed tokens at each proposal, and rolls them
    back after drafting.
    """

    name = "self"

    def __init__(self, model: SplitModel):
        if model.head is None or model.tail is None:
            raise ValueError("the early-exit draft needs the device's head and tail")
        self.head, self.tail = model.head, model.tail
        self._reset()

    def _reset(self) -> None:
        self.head_cache = self.head.layers.new_cache()
        self.tail_cache = self.tail.layers.new_cache()
        self.length = 0

    def _run(self, ids: list[int], pos: int) -> torch.Tensor:
        hidden = self.head(torch.tensor([ids]), self.head_cache, pos)
        return self.tail(hidden, self.tail_cache, pos)[0, -1]

    @torch.inference_mode()
    def propose(self, ids: list[int], k: int) -> list[int]:
        if k <= 0 or not ids:
            return []
        if len(ids) < self.length:
            self._reset()
        logits = self._run(ids[self.length:], self.length)
        drafts, pos = [], len(ids)
        while True:
            drafts.append(int(torch.argmax(logits)))
            if len(drafts) == k:
                break
            logits = self._run(drafts[-1:], pos)
            pos += 1
        truncate_cache(self.head_cache, len(ids))
        truncate_cache(self.tail_cache, len(ids))
        self.length = len(ids)
        return drafts


class BridgeDraft:
    """Drafts from the head, a fitted bridge over the body, and the tail's layers, on the step's own caches."""

    name = "bridge"

    def __init__(self, model: SplitModel, bridge: Bridge):
        if (bridge.x, bridge.y) != (model.split.x, model.split.y):
            raise ValueError(f"the bridge spans layers [{bridge.x}, {bridge.y}), the split is {model.split}")
        self.head, self.tail, self.bridge = model.head, model.tail, bridge
        dtype = model.dtype  # the activations' (a quantized format keeps its float LM-head rows in fp16)
        self.bridge.weight = bridge.weight.to(dtype)
        self.lm_rows = model.tail.lm_head.weight[bridge.vocab].detach().to(dtype)  # the draft's smaller LM head
        self.step = None

    def attach(self, step) -> None:
        """The generation's Stepper: its caches, its position, and the body's last output row."""
        self.step = step

    @torch.inference_mode()
    def propose(self, ids: list[int], k: int) -> list[int]:
        step = self.step
        if k <= 0 or step is None or step.last_body is None:
            return []
        start, token, previous = step.pos, ids[-1], step.last_body.view(1, -1)
        drafts = []
        try:
            for i in range(k):
                head = self.head(torch.tensor([[token]]), step.head_cache, start + i)[0]
                guess = self.bridge.predict(head, previous)
                out = self.tail.layers(guess.unsqueeze(0), step.tail_cache, start + i)[0, -1]
                token = int(self.bridge.vocab[int(torch.argmax(self.lm_rows @ self.tail.norm(out)))])
                drafts.append(token)
                previous = guess
        finally:
            truncate_cache(step.head_cache, start)
            truncate_cache(step.tail_cache, start)
        return drafts

