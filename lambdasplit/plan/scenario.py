"""Assemble a planning Scenario from what the user gave: profile files or this machine's, speed
factors, the link, the wire codecs, the speculation assumed; and find the privacy assessment.

Every input is described in a line of `Sources.lines`, so the plan's output says where each
figure came from (a file, this machine's cached profile, an emulated factor).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..privacy.results import Assessment, default_assessment_path
from ..wire.spec import DEFAULT_WIRE, parse_wire
from .planner import (
    DEFAULT_ACCEPTANCE,
    DEFAULT_MAX_DRAFT,
    DEFAULT_PROMPT_TOKENS,
    DEFAULT_STEP_OVERHEAD_S,
    MAX_DRAFT,
    Link,
    Scenario,
)
from .profile import Profile, this_machine
from .wirecost import WireSizes, costing_codec, time_codec

PROFILE_CODECS = ("fp32", "fp16", "bf16", *parse_wire(DEFAULT_WIRE))  # codecs a new profile times, besides the plan's own
SPECULATE = ("auto", "off")  # as the client's --speculate: auto is prompt-lookup drafts


@dataclass
class Sources:
    """Where each input of a plan came from, in words, for the output."""

    lines: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PlanRequest:
    """The inputs of `lambdasplit plan`, as the user gave them."""

    folder: Path
    dtype: str = "float32"
    device_profile: str | None = None  # a file; None: this machine
    device_slowdown: float = 1.0  # the device is this many times slower than its profile
    cloud_profile: str | None = None
    cloud_speedup: float = 1.0  # the cloud is this many times faster than its profile
    link: str = "100mbit,10ms"
    rtt: str | None = None
    wire: str | None = None  # None: the model family's default wire
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS
    step_overhead_s: float = DEFAULT_STEP_OVERHEAD_S
    speculate: str = "auto"  # "off": one token per round trip
    acceptance: float = DEFAULT_ACCEPTANCE  # per draft, assumed
    max_draft: int = DEFAULT_MAX_DRAFT
    remeasure: bool = False
    progress: bool = True


def side_codec_seconds(profile: Profile, encodes: str, decodes: str,
                       prompt_tokens: int) -> tuple[tuple[float, float], bool]:
    """((decode step, prompt) seconds, measured_here) for a side that encodes one codec and decodes another.

    A codec the profile did not time is timed now, on this machine, and scaled by the profile's
    factor: an approximation when the profile comes from another machine."""
    missing: list[str] = []

    def times(name: str, rows: int) -> tuple[float, float]:
        found = profile.codec_time(name, rows)
        if found is not None:
            return found
        missing.append(name)
        codec = costing_codec(name, profile.hidden_size)
        encode, decode = time_codec(codec, rows, profile.hidden_size, repeats=20)
        return encode * profile.slowdown, decode * profile.slowdown

    step, prompt = ((times(encodes, rows)[0] + times(decodes, rows)[1]) for rows in (1, prompt_tokens))
    return (step, prompt), bool(missing)


def _side(role: str, file: str | None, factor: float, here: Callable[[], tuple[Profile, str]],
          sources: Sources) -> Profile:
    if file:
        profile, where = Profile.load(file), f"the profile {file}"
    else:
        profile, where = here()
    if factor != 1:
        profile = profile.scaled(factor)
        where += (f", assumed {factor:g}x slower (--device-slowdown {factor:g})" if role == "device"
                  else f", assumed {1 / factor:g}x faster (--cloud-speedup {1 / factor:g})")
    sources.lines.append(f"{role}: {where}")
    sources.lines.append(f"  {profile.describe()}")
    return profile


def build_scenario(request: PlanRequest) -> tuple[Scenario, Sources]:
    """The Scenario for a request, measuring this machine's profile first if no file replaces it."""
    from ..models.families import default_wire
    from ..models.llm import load_config

    if request.speculate not in SPECULATE:
        raise ValueError(f"--speculate must be one of {', '.join(SPECULATE)}, got {request.speculate!r}")
    if not 0 <= request.max_draft <= MAX_DRAFT:  # before measuring anything
        raise ValueError(f"--max-draft must be 0 to {MAX_DRAFT}, got {request.max_draft}")
    if not 0 < request.device_slowdown <= 1e4 or not 0 < request.cloud_speedup <= 1e4:
        raise ValueError(f"--device-slowdown and --cloud-speedup must be positive factors up to 10000, got "
                         f"{request.device_slowdown} and {request.cloud_speedup}")
    if request.wire is not None:
        parse_wire(request.wire)  # a malformed --wire fails before anything is read
    link = Link.parse(request.link, request.rtt)
    config = load_config(request.folder)
    up, down = parse_wire(request.wire or default_wire(config))  # none asked for: the model family's default
    n, d = config.num_hidden_layers, config.hidden_size
    positions = int(getattr(config, "max_position_embeddings", 2048))
    if not 1 <= request.prompt_tokens < positions:
        raise ValueError(f"--prompt-tokens must be 1 to {positions - 1} (the model's context), "
                         f"got {request.prompt_tokens}")
    sources = Sources()
    codecs = tuple(dict.fromkeys((*PROFILE_CODECS, up, down)))

    @functools.cache
    def here() -> tuple[Profile, str]:  # this machine's profile, measured at most once
        profile, path, measured = this_machine(request.folder, request.dtype, remeasure=request.remeasure,
                                               progress=request.progress, codecs=codecs)
        return profile, (f"this machine, measured now and cached in {path}" if measured
                         else f"this machine's cached profile {path} (--remeasure to measure again)")

    device = _side("device", request.device_profile, request.device_slowdown, here, sources)
    cloud = _side("cloud", request.cloud_profile, 1 / request.cloud_speedup, here, sources)
    device.check_model(n, d, "device")
    cloud.check_model(n, d, "cloud")
    if device.dtype != cloud.dtype:
        sources.lines.append(f"note: the device profile is {device.dtype}, the cloud's {cloud.dtype}")
    wire = WireSizes.measure(up, down, d, request.prompt_tokens)
    codec_device, here_d = side_codec_seconds(device, up, down, request.prompt_tokens)
    codec_cloud, here_c = side_codec_seconds(cloud, down, up, request.prompt_tokens)
    sources.lines.append(f"link: {link} (--link {request.link}" + (f" --rtt {request.rtt})" if request.rtt else ")")
                         + f"; {request.step_overhead_s * 1e3:g} ms overhead per step (--step-overhead-ms)")
    sources.lines.append(f"wire: {up} up ({wire.step_up} B a token, {wire.prompt_up} B for the prompt), {down} down "
                         f"({wire.step_down} B, {wire.prompt_down} B), frame and WebSocket headers included; codecs "
                         f"{codec_device[0] * 1e3:.2f} ms a step on the device, "
                         f"{codec_cloud[0] * 1e3:.2f} ms on the cloud"
                         + (" (timed now on this machine: not in the profile)" if here_d or here_c else ""))
    sources.lines.append(f"prompt: {request.prompt_tokens} tokens (--prompt-tokens)")
    acceptance = None if request.speculate == "off" else request.acceptance
    scenario = Scenario(device, cloud, link, wire, request.prompt_tokens, request.step_overhead_s,
                        codec_device_s=codec_device, codec_cloud_s=codec_cloud, acceptance=acceptance,
                        max_draft=request.max_draft)
    sources.lines.append(speculation_line(scenario))
    return scenario, sources


def speculation_line(scenario: Scenario) -> str:
    """What the plan assumed about speculative decoding, in words."""
    if scenario.acceptance is None:
        return "speculation: off (--speculate off): one token per round trip"
    if not scenario.speculating:
        why = "--max-draft 0" if scenario.max_draft == 0 else "--acceptance 0"
        return f"speculation: no drafts ({why}): one token per round trip"
    return (f"speculation: prompt-lookup drafts, assumed acceptance {scenario.acceptance * 100:g}% per draft "
            f"(--acceptance), k up to {scenario.max_draft} (--max-draft), the best k for each split (measure "
            "yours with lambdasplit bench speculative)")


def find_assessment(folder: Path, path: str | None) -> tuple[Assessment | None, str]:
    """The assessment to plan with, and a line saying which (or how to make one)."""
    if path is None:
        default = default_assessment_path(folder)
        if not default.is_file():
            return None, (f"privacy: no assessment of this model at {default}, so leakage is UNKNOWN and the plan "
                          "is for speed only. Make one with: lambdasplit assess (or give --assessment FILE)")
        path = str(default)
    assessment = Assessment.load(path)
    note = f" with noise {assessment.noise:g}" if assessment.noise else ""
    return assessment, (f"privacy: assessment {path} ({assessment.model}{note}); its figures are lower bounds, "
                        "stronger attacks exist")

