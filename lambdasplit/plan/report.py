"""A plan as a readable table and a recommendation, or as JSON."""

from __future__ import annotations

from dataclasses import asdict

from .planner import Candidate, Plan

_COLUMNS = ("#", "X:Y", "layers dev:cloud", "device ms", "cloud ms", "network ms", "tokens/s", "TTFT ms",
            "up B/tok", "down B/tok", "leakage (strongest attack)", "meets")
_SPECULATION = ("k", "tok/trip")  # after tokens/s when the plan speculates
_LEFT = {"#", "X:Y", "layers dev:cloud", "leakage (strongest attack)", "meets"}


def _columns(speculating: bool) -> tuple[str, ...]:
    at = _COLUMNS.index("tokens/s") + 1
    return (*_COLUMNS[:at], *_SPECULATION, *_COLUMNS[at:]) if speculating else _COLUMNS


def _meets(c: Candidate, judged: bool) -> str:
    return {True: "yes", False: "no", None: "?"}[c.meets] if judged else ""


def _row(rank: str, c: Candidate, n: int, judged: bool, speculating: bool) -> list[str]:
    p = c.prediction
    local = p.x + n - p.y if p.kind == "split" else (n if p.kind == "local-only" else 0)
    label = {"split": p.label, "local-only": "local-only", "cloud-only": "cloud-only*"}[p.kind]
    drafts = [str(p.draft_k), f"{p.tokens_per_round_trip:.2f}"] if p.kind != "cloud-only" else ["-", "-"]
    return [rank, label, f"{local}:{n - local}", f"{p.device_s * 1e3:.1f}", f"{p.cloud_s * 1e3:.1f}",
            f"{p.network_s * 1e3:.1f}", f"{p.tokens_per_s:.2f}", *(drafts if speculating else []),
            f"{p.ttft_s * 1e3:.0f}", str(p.up_bytes), str(p.down_bytes), c.leak.label, _meets(c, judged)]


def _table(columns: tuple[str, ...], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [list(columns), *rows]) for i in range(len(columns))]

    def line(cells: list[str]) -> str:
        cells = (c.ljust(w) if name in _LEFT else c.rjust(w) for name, c, w in zip(columns, cells, widths))
        return "  ".join(cells).rstrip()

    return "\n".join([line(list(columns)), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def format_plan(plan: Plan, sources: list[str], *, top: int = 15, show_all: bool = False) -> str:
    """The inputs, the table of candidates (fastest first) with the references, and the recommendation."""
    n = plan.scenario.num_layers
    shown = plan.splits if show_all else plan.splits[:top]
    judged = plan.target.max_recovery is not None
    speculating = plan.scenario.speculating
    rows = [_row(str(i + 1), c, n, judged, speculating) for i, c in enumerate(shown)]
    if plan.recommended is not None and plan.recommended not in shown:
        rows.append(_row(str(plan.splits.index(plan.recommended) + 1), plan.recommended, n, judged, speculating))
    rows += [_row("ref", c, n, judged, speculating) for c in (plan.local_only, plan.cloud_only)]
    hidden = len(plan.splits) - len(shown)
    step = ("ms per round trip (1 + k rows); k: drafts per round trip, tok/trip: the tokens it yields on average "
            "(local-only is predicted without drafts); " if speculating else "ms per decode step; ")
    lines = [*sources, f"target: {plan.target.describe()}", "", _table(_columns(speculating), rows), "",
             f"{len(plan.splits)} splits; " + (f"{hidden} slower ones not shown (--all shows them); " if hidden else "")
             + step + "TTFT = prompt prefill + one round trip (not the session's set-up); "
             "*cloud-only is a reference: the text crosses the network, no privacy", ""]
    lines += _verdict(plan)
    return "\n".join(lines)


def _verdict(plan: Plan) -> list[str]:
    target, best = plan.target, plan.recommended
    lines = []
    if best is not None:
        p = best.prediction
        why = ("the fastest split" if target.max_recovery is None or not plan.assessed
               else f"the fastest split with leakage {best.leak.value:.1%} <= {target.max_recovery:.0%}")
        drafts = (f" with {p.draft_k} drafts a round trip, which yields {p.tokens_per_round_trip:.2f} tokens on average"
                  if p.draft_k else " without drafts" if plan.scenario.speculating else "")
        lines.append(f"recommended: --split {p.label} ({why}): {p.tokens_per_s:.2f} tokens/s predicted{drafts}, "
                     f"time to first token {p.ttft_s * 1e3:.0f} ms, {p.up_bytes + p.down_bytes} bytes a token, "
                     f"leakage {best.leak.label}")
        if plan.assessed and target.max_recovery is None:
            lines.append("no privacy target was given: --max-recovery R keeps only the splits that leak at most R")
        if not plan.assessed:
            lines.append("leakage is UNKNOWN: no assessment was found (run `lambdasplit assess`); with the public "
                         "weights a shallow split can be inverted almost completely")
    else:
        lines.append(f"no split meets the target ({target.describe()}).")
        least = plan.least_leaking()
        if least:
            lines.append("least leaking: " + "; ".join(f"{c.label} {c.leak.label}, {c.prediction.tokens_per_s:.2f} "
                                                       "tokens/s" for c in least))
        lines.append(f"local-only keeps everything on the device: {plan.local_only.prediction.tokens_per_s:.2f} "
                     "tokens/s predicted")
    lines += [f"note: {note}" for note in plan.notes]
    return lines


def _candidate_dict(c: Candidate) -> dict:
    return {"label": c.label, **asdict(c.prediction), "step_s": c.prediction.step_s,
            "leak": asdict(c.leak), "meets": c.meets}


def plan_to_dict(plan: Plan, sources: list[str]) -> dict:
    """Everything: inputs (profiles, link, wire, target), every candidate, the references, the verdict."""
    s = plan.scenario
    return {
        "inputs": {"sources": sources, "device": s.device.to_dict(), "cloud": s.cloud.to_dict(),
                   "link": asdict(s.link), "wire": asdict(s.wire), "prompt_tokens": s.prompt_tokens,
                   "step_overhead_s": s.step_overhead_s, "acceptance": s.acceptance, "max_draft": s.max_draft,
                   "codec_device_s": list(s.codec_device_s), "codec_cloud_s": list(s.codec_cloud_s)},
        "target": asdict(plan.target),
        "assessed": plan.assessed,
        "splits": [_candidate_dict(c) for c in plan.splits],
        "local_only": _candidate_dict(plan.local_only),
        "cloud_only": _candidate_dict(plan.cloud_only),
        "recommended": plan.recommended.label if plan.recommended else None,
        "least_leaking": [c.label for c in plan.least_leaking()],
        "verdict": _verdict(plan),
    }
