"""Speculative decoding across the split: several tokens per round trip, the same output.

Every plain decode step costs one device -> cloud -> device round trip for one token, so a link's
round-trip time caps the speed however fast the cloud is. A speculative round sends the token just
chosen together with k draft tokens (draft sources: drafts.py):

    t, d1..dk ── head ──▶ (k+1) x D up ── body ──▶ (k+1) x D down ── tail ──▶ k+1 rows of logits

Row i of the logits is what the full model says follows d_i (row 0: follows t). `verify` accepts
d1, d2, ... while they agree with it, and takes one more token from the row after the last accepted
draft: 1 to k+1 tokens for one round trip. Head, tail and body then forget the positions of the
rejected drafts (the body's rollback rides on the next step's frame, so it costs nothing extra).

- Greedy: a draft is accepted when it is the argmax, so the output is the plain greedy output
  (exactly, with a lossless wire, up to floating-point summation order).
- Sampling: the drafts are deterministic guesses (a point mass q = δ_d), so standard speculative
  sampling reduces to: accept d with probability p(d); on rejection draw from p with d removed,
  renormalised. Every token is then distributed exactly as p, the sampler's own distribution
  (temperature, top-k, top-p applied).

`DraftLength` picks k each round from what it has measured: the acceptance rate of the source
(each draft accepted with probability a, given the ones before it) and the time of a round of k + 1
rows (the round trip, the body and the tail on k + 1 rows) plus the drafting. It maximises expected
tokens per second, (1 - a^(k+1)) / (1 - a) / time(k), and k = 0 (a plain step) wins when drafts do
not pay: a fast link and drafts that are rarely right.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass

import torch

from .drafts import BridgeDraft, EarlyExitDraft, NgramDraft
from .sampling import Sampler

MODES = ("auto", "off", "ngram", "self", "bridge")
DEFAULT_MAX_DRAFT = 8


def verify(logits: torch.Tensor, drafts: list[int], sampler: Sampler) -> tuple[int, int]:
    """Check drafts against the full model's logits (len(drafts) + 1 rows).

    Returns (n, token): the first n drafts are accepted, and `token` follows them.
    """
    if logits.shape[0] != len(drafts) + 1:
        raise ValueError(f"{len(drafts)} drafts need {len(drafts) + 1} rows of logits, got {logits.shape[0]}")
    for i, draft in enumerate(drafts):
        if sampler.params.greedy:
            best = int(torch.argmax(logits[i]))
            if best != draft:
                return i, best
            continue
        p = sampler.probs(logits[i])
        if sampler.uniform() >= float(p[draft]):  # rejected: draw from p without the draft
            p[draft] = 0.0
            return i, sampler.draw(p / p.sum())
    return len(drafts), sampler(logits[len(drafts)])


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens a round yields with k drafts, each accepted with probability `acceptance` given the ones before."""
    a = min(max(acceptance, 0.0), 1.0)
    return float(k + 1) if a == 1.0 else (1 - a ** (k + 1)) / (1 - a)


class DraftLength:
    """Chooses the draft length k from the measured acceptance rate and round times.

    The acceptance rate starts from a prior (`prior` with the weight of `prior_weight` drafts) and
    forgets slowly (`decay` per round), since repetition comes and goes within one answer. Round time
    is measured per number of rows (the median of the last `window` rounds of that many rows, so one
    stalled round does not stop drafting). It need not grow linearly: on a CPU one row is a
    matrix-vector product, bound by reading the weights, and two rows a matrix product that costs
    half as much again, after which more rows cost little. Row counts not seen yet are
    interpolated between those seen, or extrapolated from the largest seen by `row_share` of the
    one-row time per extra row; being optimistic about the unseen makes the choice try it.
    """

    def __init__(self, max_k: int = DEFAULT_MAX_DRAFT, prior: float = 0.5, prior_weight: float = 2.0,
                 decay: float = 0.97, row_share: float = 0.03, explore_every: int = 8, window: int = 7):
        if max_k < 0:
            raise ValueError(f"the longest draft must be >= 0 tokens, got {max_k}")
        self.max_k, self.decay, self.row_share, self.explore_every = max_k, decay, row_share, explore_every
        self.accepted, self.rejected = prior * prior_weight, (1 - prior) * prior_weight
        self.window = window
        self.seconds: dict[int, deque[float]] = {}  # rows -> the last rounds' seconds
        self.draft_s = 0.0  # measured seconds per drafted token
        self.plain_rounds = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def round_s(self, rows: int, seen: dict[int, float] | None = None) -> float:
        """Expected seconds of a round of this many rows (0.0 before any round was measured); `seen`: the
        medians per row count, when the caller already has them."""
        seen = self._medians() if seen is None else seen
        if not seen:
            return 0.0
        if rows in seen:
            return seen[rows]
        below = [r for r in seen if r < rows]
        above = [r for r in seen if r > rows]
        if below and above:
            lo, hi = max(below), min(above)
            return seen[lo] + (seen[hi] - seen[lo]) * (rows - lo) / (hi - lo)
        nearest = max(below) if below else min(above)
        one_row = seen.get(1, seen[nearest])
        return max(seen[nearest] + self.row_share * one_row * (rows - nearest), 0.0)

    def _medians(self) -> dict[int, float]:
        return {r: statistics.median(times) for r, times in self.seconds.items()}

    def choose(self, limit: int | None = None) -> int:
        """The draft length that maximises the expected tokens per second (0: a plain step)."""
        top = self.max_k if limit is None else max(min(self.max_k, limit), 0)
        if top == 0:
            return 0
        if not self.seconds:  # nothing measured yet: try drafts
            return top
        a, seen = self.acceptance, self._medians()
        rate = [expected_tokens(a, k) / (self.round_s(k + 1, seen) + k * self.draft_s) for k in range(top + 1)]
        best = max(range(top + 1), key=rate.__getitem__)
        if best == 0:  # drafts do not pay now; look again now and then, as the text may start repeating
            self.plain_rounds += 1
            if self.plain_rounds % self.explore_every == 0:
                return 1
        return best

    def record(self, drafted: int, accepted: int, rows: int, seconds: float, draft_seconds: float = 0.0) -> None:
        """Learn from one round: how many drafts went, how many were accepted, and what it cost."""
        d = self.decay
        if drafted:
            self.accepted = self.accepted * d + accepted
            self.rejected = self.rejected * d + (1 if accepted < drafted else 0)
            per_draft = draft_seconds / drafted
            self.draft_s = per_draft if self.draft_s == 0 else 0.8 * self.draft_s + 0.2 * per_draft
        self.seconds.setdefault(rows, deque(maxlen=self.window)).append(seconds)


@dataclass
class SpeculationStats:
    rounds: int = 0  # decode round trips (the prompt's is not counted)
    drafted: int = 0  # draft tokens sent to be checked
    accepted: int = 0  # of which accepted
    draft_s: float = 0.0  # device time spent drafting

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class Speculator:
    """A draft source and the draft-length choice, round after round."""

    def __init__(self, source: NgramDraft | EarlyExitDraft | BridgeDraft, length: DraftLength):
        self.source, self.length = source, length
        self.stats = SpeculationStats()
        self._draft_seconds = 0.0

    def attach(self, step) -> None:
        """Hand the generation's Stepper to a source that drafts on its caches."""
        if hasattr(self.source, "attach"):
            self.source.attach(step)

    def propose(self, context: list[int], limit: int) -> list[int]:
        """Drafts to follow `context` (which ends with the token about to be fed); at most `limit`."""
        k = self.length.choose(limit)
        if k == 0:
            self._draft_seconds = 0.0
            return []
        started = time.perf_counter()
        drafts = self.source.propose(context, k)[:k]
        self._draft_seconds = time.perf_counter() - started
        self.stats.draft_s += self._draft_seconds
        return drafts

    def record(self, drafted: int, accepted: int, seconds: float) -> None:
        self.stats.rounds += 1
        self.stats.drafted += drafted
        self.stats.accepted += accepted
        self.length.record(drafted, accepted, drafted + 1, seconds, self._draft_seconds)


def make_speculator(mode: str, model, max_draft: int = DEFAULT_MAX_DRAFT, log=print) -> Speculator | None:
    """The speculator for a mode: 'off' gives None; 'auto' is prompt lookup with the adaptive length."""
    if mode not in MODES:
        raise ValueError(f"speculation mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off" or max_draft == 0:
        return None
    if mode == "bridge":
        from .bridge import load_or_fit

        x, y = model.split.x, model.split.y
        source = BridgeDraft(model, load_or_fit(model.folder, x, y, model.body_fingerprint(), log=log))
    elif mode == "self":
        source = EarlyExitDraft(model)
    else:
        source = NgramDraft()
    return Speculator(source, DraftLength(max_draft))
