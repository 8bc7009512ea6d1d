"""Cross-checking servers that may lie: the same step of a hop on k replicas, and the majority decides.

    device ──┬──▶ replica 1 ──┐
             ├──▶ replica 2 ──┼──▶ compare (within the wire codec's tolerance) ──▶ the majority's answer
             └──▶ replica 3 ──┘

Each replica runs its own session over the same inputs, so honest replicas give the same output up to
float rounding and the down codec's own rounding. A replica whose output is farther than the
codec's tolerance from the majority is reported (its URL, the hop, the step) and excluded for the
rest of the session; a spare replica takes its place and replays the prefix. When there is no
majority (two replicas that disagree), one more replica is brought in to break the tie.

What this protects: the answer, as long as most of the replicas asked at each step are honest (the
"Generative AI Consensus in a Trustless Network" setting). What it does not: the input's privacy.
Every replica sees the same hidden states, so k replicas are k parties that can invert them; and
replicas that collude and agree on the same wrong answer win the vote.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..wire.spec import parse_codec
from .body import RemoteBody, add_traffic
from .transport import BodyError, Traffic

# how far apart two honest replicas' outputs may be, as a relative RMS difference per row, after the down
# codec: float rounding (a batched pass is not bit-identical to a lone one) and the codec's own rounding of
# nearly equal numbers onto different levels
FORMAT_TOLERANCE = {"fp32": 1e-3, "fp16": 5e-3, "bf16": 3e-2, "int8": 3e-2, "int6": 0.1, "int4": 0.3,
                    "int3": 0.5, "int2": 1.0}


def tolerance(up: str, down: str) -> float:
    """The largest relative difference two honest replicas' outputs may show over this wire."""
    if parse_codec(up).noise:
        raise ValueError(f"cross-checking needs every replica to get the same input, and the uplink codec {up!r} "
                         "adds fresh noise for each; drop noise:S from the uplink or verify without it")
    spec = parse_codec(down)
    return FORMAT_TOLERANCE[spec.format] + 4 * math.sqrt(2) * spec.noise


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max over rows of ||a - b|| / max(||a||, ||b||): 0 for equal outputs, about 1.4 for unrelated ones."""
    a, b = a.float(), b.float()
    if a.shape != b.shape:
        return math.inf
    scale = torch.maximum(a.norm(dim=-1), b.norm(dim=-1)).clamp_min(1e-12)
    return float(((a - b).norm(dim=-1) / scale).max())


@dataclass(frozen=True)
class Disagreement:
    server: str
    x: int
    y: int
    step: int  # the hop's step (0: the prompt)
    pos: int  # the first position of that step
    difference: float
    tolerance: float

    def __str__(self) -> str:
        return (f"{self.server} disagreed with the majority on layers [{self.x}, {self.y}) at step {self.step} "
                f"(position {self.pos}): relative difference {self.difference:.3g} > tolerance "
                f"{self.tolerance:.3g}; excluded for the rest of the session")


class VerifiedBody:
    """One hop, cross-checked on k of its replicas at every step; the same face as a RemoteBody.

    `open_member(url)` opens a session of the hop's layers on one replica (a RemoteBody that does not
    move to other servers by itself: moving is this class's job)."""

    def __init__(self, replicas: list[str], k: int, open_member: Callable[[str], RemoteBody], tol: float,
                 x: int, y: int, on_event: Callable[[str], None] | None = None):
        if k < 2:
            raise ValueError(f"cross-checking needs k >= 2 replicas per step, got {k}")
        if len(replicas) < k:
            raise ValueError(f"verifying on {k} replicas needs at least {k} servers for layers [{x}, {y}); "
                             f"this hop has {len(replicas)}: {', '.join(replicas)}")
        self.k, self.tol, self.x, self.y = k, tol, x, y
        self.up = self.down = None  # the codecs, as every member's
        self.open_member, self.on_event = open_member, on_event or (lambda message: None)
        self.spares = list(replicas)
        self.members: list[RemoteBody] = []
        self.retired: list[RemoteBody] = []  # dropped members: their traffic still counts
        self.disagreements: list[Disagreement] = []
        self.unavailable: list[str] = []
        self.replacements = 0
        self.steps = 0
        self.cloud_s = 0.0  # per step, the slowest member's compute (they run side by side)
        self.pool = ThreadPoolExecutor(max_workers=len(replicas), thread_name_prefix="lambdasplit-verify")
        while len(self.members) < k:
            member = self._recruit(None)
            if member is None:
                self.close()
                raise BodyError("unreachable", f"fewer than {k} replicas of layers [{x}, {y}) could be reached "
                                               f"({', '.join(self.unavailable)})")
            self.members.append(member)
        self.up, self.down = self.members[0].up, self.members[0].down

    # ---- members ----------------------------------------------------------------------------------
    def _recruit(self, prefix: torch.Tensor | None) -> RemoteBody | None:
        """A session on the next spare replica that answers, caught up to `prefix` (replayed with its first
        step); None when no spare is left."""
        while self.spares:
            url = self.spares.pop(0)
            try:
                member = self.open_member(url)
            except BodyError as exc:
                self.unavailable.append(url)
                self.on_event(f"{url}: {exc}; not used for layers [{self.x}, {self.y})")
                continue
            if prefix is not None and len(prefix):
                member.adopt(prefix)
            return member
        return None

    def _retire(self, member: RemoteBody) -> None:
        self.members.remove(member)
        member.close()
        self.retired.append(member)

    def _run(self, members: list[RemoteBody], hidden: torch.Tensor, pos: int,
             prefix: torch.Tensor | None) -> dict[RemoteBody, torch.Tensor]:
        """This step on each member, side by side; a member whose server fails is replaced by a spare."""
        outs: dict[RemoteBody, torch.Tensor] = {}
        before = {m: m.cloud_s for m in members}
        pending = {self.pool.submit(m.forward, hidden, pos): m for m in members}
        while pending:
            future, member = next(iter(pending.items()))
            del pending[future]
            try:
                outs[member] = future.result()
            except BodyError as exc:
                if exc.code in ("too_long", "mismatch"):  # the request's fault, not the server's
                    raise
                self.unavailable.append(member.url)
                self.on_event(f"{member.url} failed on layers [{self.x}, {self.y}) ({exc}); replacing it")
                self._retire(member)
                spare = self._recruit(prefix)
                if spare is not None:
                    self.members.append(spare)
                    self.replacements += 1
                    before[spare] = 0.0
                    pending[self.pool.submit(spare.forward, hidden, pos)] = spare
        if outs:
            self.cloud_s += max(m.cloud_s - before[m] for m in outs)
        return outs

    def _vote(self, outs: dict[RemoteBody, torch.Tensor]) -> tuple[RemoteBody | None, dict[RemoteBody, float]]:
        """The member the most others agree with, if they are a majority of at least two, and each member's
        difference from it."""
        members = list(outs)
        best, best_agree = None, []
        for m in members:
            agree = [o for o in members if relative_difference(outs[m], outs[o]) <= self.tol]
            if len(agree) > len(best_agree):
                best, best_agree = m, agree
        if best is None or len(best_agree) < 2 or 2 * len(best_agree) <= len(members):
            return None, {}
        return best, {m: relative_difference(outs[best], outs[m]) for m in members}

    # ---- the body's face ------------------------------------------------------------------------
    def forward(self, hidden: torch.Tensor, pos: int) -> torch.Tensor:
        sent = self.members[0].sent
        prefix = torch.cat(sent)[:pos] if sent and pos else None  # what a newcomer must replay first
        outs = self._run(list(self.members), hidden, pos, prefix)
        while True:
            winner, differences = self._vote(outs)
            if winner is not None:
                break
            extra = self._recruit(prefix)  # no majority: one more opinion
            if extra is None:
                raise BodyError("unverified", f"the replicas of layers [{self.x}, {self.y}) disagree at step "
                                              f"{self.steps} and no spare replica is left to break the tie")
            self.members.append(extra)
            self.on_event(f"no majority on layers [{self.x}, {self.y}) at step {self.steps}: asking {extra.url}")
            outs.update(self._run([extra], hidden, pos, prefix))
        for member, difference in differences.items():
            if difference > self.tol:
                report = Disagreement(member.url, self.x, self.y, self.steps, pos, difference, self.tol)
                self.disagreements.append(report)
                self.on_event(str(report))
                self._retire(member)
        while len(self.members) > self.k:  # a tie-breaker no longer needed
            self._retire(self.members[-1])
        while len(self.members) < self.k:  # bring the count back up: the newcomer replays at the next step
            member = self._recruit(torch.cat(winner.sent))
            if member is None:
                self.on_event(f"only {len(self.members)} trusted replica(s) left for layers [{self.x}, {self.y})")
                break
            self.members.append(member)
            self.replacements += 1
        self.steps += 1
        return outs[winner]

    @property
    def excluded(self) -> list[str]:
        return [d.server for d in self.disagreements]

    @property
    def recoveries(self) -> int:
        return self.replacements + sum(m.recoveries for m in (*self.members, *self.retired))

    @property
    def rollback(self) -> bool:
        return all(m.rollback for m in self.members)

    @property
    def first_frame_up(self) -> bytes:
        return next((m.first_frame_up for m in (*self.retired, *self.members) if m.first_frame_up),
                    self.members[0].first_frame_up if self.members else b"")

    @property
    def last_frames(self) -> tuple[bytes, bytes]:
        return self.members[0].last_frames if self.members else (b"", b"")

    def measured(self) -> Traffic:
        total = Traffic()
        for member in (*self.members, *self.retired):
            add_traffic(total, member.measured())
        return total

    def close(self) -> None:
        for member in list(self.members):
            self._retire(member)
        self.pool.shutdown(wait=False)
