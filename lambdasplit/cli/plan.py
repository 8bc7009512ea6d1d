"""`lambdasplit profile` and `lambdasplit plan`: measure a machine, then choose the split points."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..plan.planner import (
    DEFAULT_ACCEPTANCE,
    DEFAULT_MAX_DRAFT,
    DEFAULT_PROMPT_TOKENS,
    DEFAULT_STEP_OVERHEAD_S,
    MAX_DRAFT,
)
from ..plan.profile import DEFAULT_CONTEXT, DEFAULT_PREFILL_TOKENS, DEFAULT_REPEATS
from ..privacy.results import ATTACKER_HELP, ATTACKERS, ATTACKS, METRICS
from ..wire.spec import DEFAULT_WIRE
from .options import add_json, add_model, add_output, wire_arg

DEFAULT_LINK = "100mbit,10ms"


def register(sub) -> None:
    _profile_parser(sub)
    _plan_parser(sub)


def run(args) -> None:
    {"profile": _run_profile, "plan": _run_plan}[args.command](args)


def _profile_parser(sub) -> None:
    p = sub.add_parser("profile", help="measure how long each part of a model takes on this machine",
                       description="Time the embedding lookup, every decoder layer (one token over a KV cache of "
                                   "--context positions, and a --prefill-tokens prompt), the final norm and LM head, "
                                   "and the wire codecs, on this machine, with the project's own head/body/tail "
                                   "parts. Each figure is the median of --repeats passes after a warm-up. Writes a "
                                   "JSON profile for `plan --device FILE` / `--cloud FILE`; without --output it "
                                   "refreshes this machine's cached profile, which `plan` uses by default.")
    add_model(p, dtype=True)
    add_output(p, "where to write the profile (default: this machine's cache, where plan looks)", default=None,
               metavar="FILE")
    p.add_argument("--context", type=int, default=DEFAULT_CONTEXT, metavar="L",
                   help=f"KV-cache positions behind each timed decode step (default {DEFAULT_CONTEXT})")
    p.add_argument("--prefill-tokens", type=int, default=DEFAULT_PREFILL_TOKENS, metavar="L",
                   help="prompt length of the prefill timings; plan scales them linearly to its --prompt-tokens "
                        f"(default {DEFAULT_PREFILL_TOKENS})")
    p.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, metavar="N",
                   help=f"timed passes; medians are kept (default {DEFAULT_REPEATS})")
    p.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed passes first (default 1)")
    p.add_argument("--codecs", default=None, metavar="LIST",
                   help="wire codecs to time, comma-separated (default: fp32, fp16, bf16 and the default wire's "
                        f"{DEFAULT_WIRE})")
    p.set_defaults(run=run)


def _plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="choose the split points: predicted speed, traffic and leakage of every (X, Y)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Predict, for every split (X, Y), the decode speed (tokens/s), the time to first "
                                   "token, the bytes per token each way and the leakage; recommend the fastest split "
                                   "that meets a privacy target, or say that none does.\n\n"
                                   "  step time = device (embed, layers [0,X), [Y,N), norm, LM head, codecs)\n"
                                   "            + cloud (layers [X,Y), codecs)\n"
                                   "            + network (round trip + bytes / rate + per-step overhead)\n"
                                   "  tokens/s  = expected tokens per round trip / step time\n\n"
                                   "With speculative decoding (the client's default) a round trip carries the next "
                                   "token and k drafts, k + 1 rows through every part, and yields 1 + a + ... + a^k "
                                   "tokens on average for a per-draft acceptance a; the plan tries every k up to "
                                   "--max-draft for each split and keeps the fastest (k = 0: plain decoding).\n\n"
                                   "The device and the cloud are profiles (lambdasplit profile), by default this "
                                   "machine's, measured once and cached; speed factors scale them. Leakage comes "
                                   "from `lambdasplit assess`; its figures are lower bounds.",
                       epilog="example: lambdasplit plan --device-slowdown 15 --cloud-speedup 2 --link 100mbit,20ms "
                              "--max-recovery 0.2 --attacker with-weights")
    add_model(p, dtype=True)
    _machine_options(p)
    _speculation_options(p)
    _privacy_options(p)
    _search_options(p)
    p.set_defaults(run=run)


def _machine_options(p) -> None:
    g = p.add_argument_group("device and cloud")
    g.add_argument("--device", default=None, metavar="FILE",
                   help="the device's profile (lambdasplit profile -o FILE on the device); default: this machine's")
    g.add_argument("--device-slowdown", type=float, default=1.0, metavar="K",
                   help="the device is K times SLOWER than its profile (e.g. 15: the paper's Jetson against its "
                        "GPU; matches generate --device-slowdown K); default 1")
    g.add_argument("--cloud", default=None, metavar="FILE", help="the cloud's profile; default: this machine's")
    g.add_argument("--cloud-speedup", type=float, default=1.0, metavar="K",
                   help="the cloud is K times FASTER than its profile; default 1")
    g.add_argument("--remeasure", action="store_true", help="measure this machine's profile again, not the cached one")
    g = p.add_argument_group("link and wire")
    g.add_argument("--link", default=DEFAULT_LINK, metavar="RATE,DELAY",
                   help="rate each way and ONE-WAY delay, as generate --link takes them: the round trip is twice the "
                        f"delay (default {DEFAULT_LINK}: 20 ms round trip); e.g. 1000mbit,5ms, 20mbit,40ms")
    g.add_argument("--rtt", default=None, metavar="TIME",
                   help="give the round-trip time directly (e.g. 40ms) with a --link that has only a rate")
    g.add_argument("--step-overhead-ms", type=float, default=DEFAULT_STEP_OVERHEAD_S * 1e3, metavar="MS",
                   help="cost of a step beyond compute, codecs and the link: framing, WebSocket, event loops "
                        f"(default {DEFAULT_STEP_OVERHEAD_S * 1e3:g}: measured through generate --link's proxy on a "
                        "2-core machine; a direct connection saved about 1.5 ms there)")
    g.add_argument("--wire", type=wire_arg, default=None, metavar="CODEC[,CODEC]",
                   help=f"wire codecs, one or UP,DOWN, as generate --wire (default: the model family's, "
                        f"{DEFAULT_WIRE}; bf16 for Gemma)")
    g.add_argument("--prompt-tokens", type=int, default=DEFAULT_PROMPT_TOKENS, metavar="L",
                   help=f"prompt length for the time to first token (default {DEFAULT_PROMPT_TOKENS}: the paper's "
                        "prompt in the chat template)")


def _speculation_options(p) -> None:
    g = p.add_argument_group("speculative decoding")
    g.add_argument("--speculate", choices=("auto", "off"), default="auto",
                   help="auto (default, as generate's): each round trip may carry k prompt-lookup drafts, k chosen "
                        "for the most tokens/s; off: one token per round trip (generate --speculate off)")
    g.add_argument("--acceptance", type=_acceptance, default=DEFAULT_ACCEPTANCE, metavar="A",
                   help="the share of drafts accepted (each given the ones before), 0.3 or 30%%, below 1 (default "
                        f"{DEFAULT_ACCEPTANCE:g}; measure yours with lambdasplit bench speculative)")
    g.add_argument("--max-draft", type=int, default=DEFAULT_MAX_DRAFT, metavar="K",
                   help=f"longest draft per round trip, 0 to {MAX_DRAFT} (default {DEFAULT_MAX_DRAFT}, as generate's)")


def _privacy_options(p) -> None:
    g = p.add_argument_group("privacy target")
    g.add_argument("--assessment", default=None, metavar="FILE",
                   help="the leakage assessment (lambdasplit assess); default: the one assess keeps for the model")
    g.add_argument("--max-recovery", type=_share, default=None, metavar="R",
                   help="the most an attacker may recover, as a share or a percentage (0.2 or 20%%); without it "
                        "the plan is for speed and only shows the leakage")
    g.add_argument("--attacker", choices=tuple(ATTACKERS), default="with-weights",
                   help="; ".join(f"{k}: {v}" for k, v in ATTACKER_HELP.items()) + " (default with-weights)")
    g.add_argument("--attack", choices=ATTACKS, default=None,
                   help="judge by this one attack instead of the attacker's strongest (both targets: the input "
                        "token and the next one)")
    g.add_argument("--metric", choices=METRICS, default="top1",
                   help="top1 or top5 token recovery, or exact (whole sequences); default top1")


def _search_options(p) -> None:
    g = p.add_argument_group("search and output")
    g.add_argument("--splits", default=None, metavar="X:Y[,X:Y...]",
                   help="evaluate only these splits (negative values count from the end)")
    g.add_argument("--min-body-layers", type=int, default=1, metavar="K",
                   help="at least K layers on the cloud (default 1)")
    g.add_argument("--stride", type=int, default=1, metavar="S", help="X and Y on multiples of S only (default 1)")
    g.add_argument("--top", type=int, default=15, metavar="K", help="show the K fastest splits (default 15)")
    g.add_argument("--all", action="store_true", help="show every split")
    add_json(g, "also write everything as JSON")


def _fraction(text: str) -> float:
    """'0.2' or '20%' -> 0.2."""
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share such as 0.2 or 20%, got {text!r}") from None


def _share(text: str) -> float:
    """A recovery rate: '0.2' or '20%' -> 0.2, in [0, 1]."""
    value = _fraction(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"a recovery rate is from 0 to 1 (0% to 100%), got {text!r}")
    return value


def _acceptance(text: str) -> float:
    """A per-draft acceptance: '0.3' or '30%' -> 0.3, in [0, 1)."""
    value = _fraction(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"an acceptance is from 0 up to (not including) 1, got {text!r}")
    return value


def _run_profile(args) -> None:
    from ..models.source import resolve_model
    from ..plan.profile import cached_profile_path, measure_profile
    from ..plan.scenario import PROFILE_CODECS

    folder = resolve_model(args.model)
    codecs = tuple(c.strip() for c in args.codecs.split(",") if c.strip()) if args.codecs else PROFILE_CODECS
    profile = measure_profile(folder, args.dtype, context=args.context, prefill_tokens=args.prefill_tokens,
                              repeats=args.repeats, warmup=args.warmup, codecs=codecs)
    path = profile.save(args.out or cached_profile_path(folder, args.dtype))
    print(profile.describe())
    print(f"wrote {path}" + ("" if args.out else " (this machine's profile: plan uses it by default)"))


def _run_plan(args) -> None:
    from ..models.llm import Split
    from ..models.source import resolve_model
    from ..plan.planner import PrivacyTarget, candidate_splits, make_plan
    from ..plan.report import format_plan, plan_to_dict
    from ..plan.scenario import PlanRequest, build_scenario, find_assessment

    if args.top < 1:
        raise ValueError(f"--top must be at least 1, got {args.top}")
    target = PrivacyTarget(args.max_recovery, args.attacker, args.attack, args.metric)
    folder = resolve_model(args.model)
    request = PlanRequest(folder, args.dtype, args.device, args.device_slowdown, args.cloud, args.cloud_speedup,
                          args.link, args.rtt, args.wire, args.prompt_tokens, args.step_overhead_ms / 1e3,
                          speculate=args.speculate, acceptance=args.acceptance, max_draft=args.max_draft,
                          remeasure=args.remeasure)
    assessment, line = find_assessment(folder, args.assessment)
    scenario, sources = build_scenario(request)
    sources.lines.append(line)
    n = scenario.num_layers
    if args.splits:
        splits = [Split.parse(text.strip(), n) for text in args.splits.split(",")]
        if same := [str(s) for s in splits if s.x == s.y]:
            raise ValueError(f"--splits {', '.join(same)}: X = Y runs every layer on the device (local-only, always "
                             "shown); give splits with X < Y")
        pairs = [(s.x, s.y) for s in splits]
    else:
        pairs = candidate_splits(n, min_body_layers=args.min_body_layers, stride=args.stride)
    plan = make_plan(scenario, assessment, target, pairs)
    print(format_plan(plan, sources.lines, top=args.top, show_all=args.all))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(plan_to_dict(plan, sources.lines), indent=1))
        print(f"wrote {path}")
