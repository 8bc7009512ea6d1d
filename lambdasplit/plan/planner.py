"""The cost model and the search: predicted speed, traffic and leakage of every split (X, Y).

A decode step of split (X, Y) runs one after the other, with no overlap (as the client does):

    device   embed + layers [0, X) + encode up            (device profile)
    network  one round trip + up bytes / rate + per-step overhead
    cloud    decode up + layers [X, Y) + encode down      (cloud profile)
    network  down bytes / rate
    device   decode down + layers [Y, N) + norm + LM head (device profile)

    tokens/s = 1 / (device + cloud + network)

Speculative decoding (client/speculative.py) sends the next token and k drafts in one round trip:
k + 1 rows through every part, (k + 1) x D each way, and 1 to k + 1 tokens back. With a per-draft
acceptance a (each draft accepted given the ones before were), a round yields on average

    expected tokens(a, k) = 1 + a + ... + a^k = (1 - a^(k+1)) / (1 - a)

and costs the sum above for k + 1 rows. The compute of a (k + 1)-row step is measured, not
extrapolated from one row: the profile times decode steps of 2, 4, 9 and 16 rows over the same
cached context, each layer and the LM head on every row (the client's tail computes logits for
all k + 1), and `Profile.stack_rows_s` / `lm_head_rows_s` interpolate linearly between those row counts.
On a CPU a second row is far dearer than its arithmetic (one row runs BLAS's matrix-vector kernels,
two a matrix product: on one thread here layers [1, 29) take 48 ms for 1 row, 74 ms for 2, 99 ms for
16), so drafts pay only where the round trip they save outweighs that jump. A version 1 profile,
without these timings, falls back to an estimate that is far too low for a few rows (each extra row
at the prefill's rate per token: `Profile.extra_row_s`). Codec time and bytes are interpolated
between one row and the prompt's L_in rows (a frame's header is paid once). The round trip and the
per-step overhead are paid once. For each split the planner tries every k from 0 (plain decoding) to
`max_draft` and keeps the one with the most tokens/s = expected tokens / round time. The client
picks k each round from what it measures; the planner's k is what a steady acceptance a would settle
on.

The per-step overhead is what a step costs beyond compute, codecs and the link: framing, the
WebSocket, both event loops, the server's hand-over to its compute thread. On this project's
2-core machine, through the link proxy that `generate --link` puts in between, a zero-delay step
spent 4.2 ms on the network side with the default wire, 0.6 ms of it in the codecs: hence the
default 3.5 ms (`step_overhead_s`). A direct loopback connection costs about 1.5 ms less
(docs/benchmarks.md, Performance: 1.6-1.9 ms with an fp32 wire).

Time to first token is the same sum for the prompt: L_in tokens of prefill on each side, one
round trip, and the prompt's L_in x D states up and down. It does not count opening the session
(a TCP connection, an HTTP POST and a WebSocket upgrade: about three more round trips, once),
and is for a warmed-up process: the first prompt after loading the model is slower.

Two reference rows stand beside the splits. Local-only (every layer on the device; X = Y says the
same) sends nothing. Cloud-only sends the text: the server streams tokens as it makes them, so
its speed is the cloud's alone, and it leaks everything.

Leakage comes from an assessment (`lambdasplit assess`). A split leaks the worse of its uplink
(the state at X) and its downlink (the state at Y), both lower bounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..net.link import LinkError, LinkSpec
from ..privacy.results import ATTACKERS, ATTACKS, METRICS, TARGETS, Assessment
from .profile import Profile

if TYPE_CHECKING:  # this module stays torch-free: the CLI reads its defaults at import
    from .wirecost import WireSizes

DEFAULT_PROMPT_TOKENS = 41  # the paper's prompt in SmolLM2's chat template
DEFAULT_STEP_OVERHEAD_S = 0.0035
# Prompt lookup on `lambdasplit bench speculative`'s four prompts gave 1.00 to 1.37 tokens per round trip
# (mean 1.16; docs/speculative.md): what a steady per-draft acceptance of 0.15 gives at k = 8.
DEFAULT_ACCEPTANCE = 0.15
DEFAULT_MAX_DRAFT = 8  # as the client's (client/speculative.py)
MAX_DRAFT = 15  # the client's limit
# The cloud-only baseline's text traffic, from Table I in docs/benchmarks.md: the prompt goes up as one
# JSON request (0.3 kB for an 11-token prompt, HTTP headers included), and each token comes down
# as one NDJSON line (11.8 kB for 300 tokens).
CLOUD_ONLY_REQUEST_BYTES = 260
CLOUD_ONLY_BYTES_PER_PROMPT_TOKEN = 4
CLOUD_ONLY_BYTES_PER_TOKEN = 40


# ---- the link ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Link:
    """A link's rate each way (None: unlimited) and its round-trip time."""

    rate_bps: float | None
    rtt_s: float

    @classmethod
    def parse(cls, text: str, rtt: str | None = None) -> "Link":
        """'RATE,DELAY' as `generate --link` takes it (the delay is ONE-WAY: RTT = 2 x delay), or
        'RATE' with `rtt` giving the round trip directly (for example '100mbit' and '20ms')."""
        try:
            spec = LinkSpec.parse(text)
            if rtt is None:
                return cls(spec.rate_bps, 2 * spec.delay_s)
            if spec.delay_s:
                raise LinkError(f"give the delay once: --link {text!r} has a one-way delay, and --rtt {rtt!r} too")
            round_trip = LinkSpec.parse(rtt)
            if round_trip.rate_bps is not None:
                raise LinkError(f"--rtt takes a time such as 20ms, got {rtt!r}")
            return cls(spec.rate_bps, round_trip.delay_s)
        except LinkError as exc:
            raise ValueError(f"bad link: {exc}") from None

    def transfer_s(self, nbytes: int) -> float:
        return 0.0 if self.rate_bps is None else nbytes * 8 / self.rate_bps

    def __str__(self) -> str:
        rate = "unlimited rate" if self.rate_bps is None else f"{self.rate_bps / 1e6:g} Mbit/s each way"
        return f"{rate}, {self.rtt_s * 1e3:g} ms round trip ({self.rtt_s * 500:g} ms one way)"


# ---- the cost model ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scenario:
    """Everything the speed of a split depends on."""

    device: Profile
    cloud: Profile
    link: Link
    wire: WireSizes
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS
    step_overhead_s: float = DEFAULT_STEP_OVERHEAD_S
    codec_device_s: tuple[float, float] = (0.0, 0.0)  # (decode step, prompt): encode up + decode down, device
    codec_cloud_s: tuple[float, float] = (0.0, 0.0)  # decode up + encode down, cloud
    acceptance: float | None = None  # per-draft acceptance of speculative decoding; None: no speculation
    max_draft: int = DEFAULT_MAX_DRAFT  # the most drafts a round trip may carry

    def __post_init__(self):
        self.cloud.check_model(self.device.num_layers, self.device.hidden_size, "cloud")
        if self.prompt_tokens < 1:
            raise ValueError(f"the prompt needs at least 1 token, got {self.prompt_tokens}")
        if not 0 <= self.step_overhead_s < 10:
            raise ValueError(f"the per-step overhead must be 0 to 10 s, got {self.step_overhead_s}")
        if self.acceptance is not None and not 0 <= self.acceptance < 1:
            raise ValueError(f"the acceptance is a share of drafts, from 0 up to (not including) 1; got "
                             f"{self.acceptance}")
        if not 0 <= self.max_draft <= MAX_DRAFT:
            raise ValueError(f"the longest draft must be 0 to {MAX_DRAFT} tokens, got {self.max_draft}")

    @property
    def num_layers(self) -> int:
        return self.device.num_layers

    @property
    def speculating(self) -> bool:
        """Whether a round trip may carry drafts: an acceptance above 0 and room for at least one."""
        return bool(self.acceptance) and self.max_draft > 0

    def for_rows(self, one: float, prompt: float, rows: int) -> float:
        """A frame's size or codec time for `rows` states, from its value for one row and for the prompt's
        L_in rows: linear in rows, the header (or per-call part) paid once."""
        if rows == 1:
            return one
        if self.prompt_tokens == 1:  # nothing to interpolate from: as many one-row frames (an overestimate)
            return one * rows
        return one + (prompt - one) * (rows - 1) / (self.prompt_tokens - 1)


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens a round with k drafts yields on average, each draft accepted with probability `acceptance`
    given the ones before (as client/speculative.py, which imports torch: this module must not)."""
    a = min(max(acceptance, 0.0), 1.0)
    return float(k + 1) if a == 1.0 else (1 - a ** (k + 1)) / (1 - a)


@dataclass(frozen=True)
class Prediction:
    """Predicted cost of one way to run the model. Times are per decode round trip (1 + draft_k rows);
    bytes and tokens/s are per generated token."""

    kind: str  # "split", "local-only" or "cloud-only"
    x: int
    y: int
    device_s: float
    cloud_s: float
    network_s: float
    ttft_s: float
    up_bytes: int  # per generated token
    down_bytes: int
    prompt_up_bytes: int  # once, for the prompt
    prompt_down_bytes: int
    tokens_per_s: float
    draft_k: int = 0  # drafts per round trip (speculative decoding); 0: plain decoding
    tokens_per_round_trip: float = 1.0  # tokens a round trip yields on average

    @property
    def label(self) -> str:
        return f"{self.x}:{self.y}" if self.kind == "split" else self.kind

    @property
    def step_s(self) -> float:
        return self.device_s + self.cloud_s + self.network_s


def predict_split(s: Scenario, x: int, y: int) -> Prediction:
    """Split (X, Y) with X < Y: head and tail on the device, layers [X, Y) on the cloud.

    With speculation, every draft length k from 0 to `s.max_draft` is costed, and the one with the most
    expected tokens per second kept (the first on a tie: plain decoding unless drafts pay)."""
    n, length = s.num_layers, s.prompt_tokens
    if not 0 <= x < y <= n:
        raise ValueError(f"a split needs 0 <= X < Y <= N = {n}, got ({x}, {y}); X = Y is local-only")
    dev, cloud, link, wire = s.device, s.cloud, s.link, s.wire

    def device(tokens: int) -> float:
        return dev.embed_s(tokens) + dev.stack_s(0, x, tokens) + dev.stack_s(y, n, tokens) + dev.lm_head_s(tokens)

    def device_rows(rows: int) -> float:
        """A decode step of `rows` new rows on the device: embed, head, tail, and logits for every row."""
        return (dev.embed_rows_s(rows) + dev.stack_rows_s(0, x, rows) + dev.stack_rows_s(y, n, rows)
                + dev.lm_head_rows_s(rows))

    def round_trip(k: int) -> tuple[float, float, float, float, float]:
        """(device, cloud, network seconds, up, down bytes) of a round trip with k drafts: k + 1 rows."""
        rows = k + 1
        up = s.for_rows(wire.step_up, wire.prompt_up, rows)
        down = s.for_rows(wire.step_down, wire.prompt_down, rows)
        device_s = device_rows(rows) + s.for_rows(*s.codec_device_s, rows)
        cloud_s = cloud.stack_rows_s(x, y, rows) + s.for_rows(*s.codec_cloud_s, rows)
        network_s = link.rtt_s + link.transfer_s(up + down) + s.step_overhead_s
        return device_s, cloud_s, network_s, up, down

    def option(k: int) -> tuple[float, int, float, tuple[float, float, float, float, float]]:
        trip, tokens = round_trip(k), expected_tokens(s.acceptance or 0.0, k)
        return tokens / (trip[0] + trip[1] + trip[2]), k, tokens, trip

    # max keeps the first of equals: the fewest drafts
    rate, k, tokens, trip = max((option(k) for k in range(s.max_draft + 1 if s.speculating else 1)),
                                key=lambda o: o[0])
    device_s, cloud_s, network_s, up, down = trip
    ttft = (device(length) + s.codec_device_s[1] + cloud.stack_s(x, y, length) + s.codec_cloud_s[1] + link.rtt_s
            + link.transfer_s(wire.prompt_up + wire.prompt_down) + s.step_overhead_s)
    return Prediction("split", x, y, device_s, cloud_s, network_s, ttft, round(up / tokens), round(down / tokens),
                      wire.prompt_up, wire.prompt_down, rate, k, tokens)


def predict_local_only(s: Scenario) -> Prediction:
    """Every layer on the device: nothing crosses the network.

    Predicted without speculation. The client speculates here too, but with no round trip to share,
    drafts save only what verifying several rows in one pass saves over one pass per token; left out,
    so with a high acceptance this row is, if anything, an underestimate."""
    n = s.num_layers
    step = s.device.whole_model_s()
    return Prediction("local-only", n, n, step, 0.0, 0.0, s.device.whole_model_s(s.prompt_tokens), 0, 0, 0, 0,
                      1 / step)


def predict_cloud_only(s: Scenario) -> Prediction:
    """Every layer on the cloud, text on the wire: the server streams tokens, so no round trip per token."""
    down = CLOUD_ONLY_BYTES_PER_TOKEN
    prompt_up = CLOUD_ONLY_REQUEST_BYTES + CLOUD_ONLY_BYTES_PER_PROMPT_TOKEN * s.prompt_tokens
    cloud = s.cloud.whole_model_s()
    step = max(cloud, s.link.transfer_s(down))
    ttft = s.cloud.whole_model_s(s.prompt_tokens) + s.link.rtt_s + s.link.transfer_s(prompt_up + down)
    return Prediction("cloud-only", 0, 0, 0.0, cloud, step - cloud, ttft, 0, down, prompt_up, 0, 1 / step)


# ---- leakage -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PrivacyTarget:
    """The most an attacker may recover: `max_recovery` of `metric`, by an attacker kind or one named attack."""

    max_recovery: float | None = None  # None: no target (speed only)
    attacker: str = "with-weights"
    attack: str | None = None  # one attack instead of the attacker's strongest
    metric: str = "top1"

    def __post_init__(self):
        if self.max_recovery is not None and not 0 <= self.max_recovery <= 1:
            raise ValueError(f"the maximum recovery is a share from 0 to 1 (or 0% to 100%), got {self.max_recovery}")
        if self.attacker not in ATTACKERS:
            raise ValueError(f"unknown attacker {self.attacker!r}; choose one of {', '.join(ATTACKERS)}")
        if self.attack is not None and self.attack not in ATTACKS:
            raise ValueError(f"unknown attack {self.attack!r}; choose one of {', '.join(ATTACKS)}")
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; choose one of {', '.join(METRICS)}")

    def describe(self) -> str:
        who = f"the {self.attack} attack" if self.attack else {
            "with-weights": "an attacker with the public weights (every attack)",
            "without-weights": "an attacker without the weights (learned probes only)"}[self.attacker]
        bound = "" if self.max_recovery is None else f" at most {self.max_recovery:.0%}"
        return f"{self.metric} token recovery{bound} by {who}"


@dataclass(frozen=True)
class Leak:
    """What a way of running leaks: the share recovered (None: not assessed) and by what, where."""

    value: float | None
    attack: str = ""
    target: str = ""
    layer: int | None = None  # the state that leaks most
    direction: str = ""  # uplink or downlink

    @property
    def label(self) -> str:
        if self.value is None:
            return "unknown"
        if not self.attack:
            return f"{self.value:.0%} ({self.target})" if self.target else f"{self.value:.0%}"
        return f"{self.value:.1%} {self.attack} ({self.direction} L{self.layer}, {self.target})"


NOTHING_SENT = Leak(0.0, "", "nothing on the wire")
TEXT_SENT = Leak(1.0, "", "text in the clear")


def point_leak(assessment: Assessment, layer: int, target: PrivacyTarget, direction: str) -> Leak:
    """The strongest measured recovery from the state at `layer` (over both targets)."""
    if target.attack is None:
        best = assessment.best(layer, target.attacker, target.metric)
    else:
        found = [s for t in TARGETS if (s := assessment.score(layer, target.attack, t)) is not None]
        best = max(found, key=lambda s: getattr(s, target.metric), default=None)
    if best is None:
        return Leak(None, layer=layer, direction=direction)
    return Leak(getattr(best, target.metric), best.attack, best.target, layer, direction)


def split_leak(assessment: Assessment, x: int, y: int, target: PrivacyTarget) -> Leak:
    """A split leaks the worse of its uplink (state at X) and downlink (state at Y); unknown if either is."""
    up, down = point_leak(assessment, x, target, "uplink"), point_leak(assessment, y, target, "downlink")
    if up.value is None or down.value is None:
        return up if up.value is None else down
    return down if down.value > up.value else up


# ---- the search ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    prediction: Prediction
    leak: Leak
    meets: bool | None  # None: no target, or leakage unknown

    @property
    def label(self) -> str:
        return self.prediction.label


@dataclass
class Plan:
    scenario: Scenario
    target: PrivacyTarget
    splits: list[Candidate]  # fastest first
    local_only: Candidate
    cloud_only: Candidate
    recommended: Candidate | None
    assessed: bool
    notes: list[str] = field(default_factory=list)

    def least_leaking(self, count: int = 5) -> list[Candidate]:
        known = [c for c in self.splits if c.leak.value is not None]
        return sorted(known, key=lambda c: (c.leak.value, -c.prediction.tokens_per_s))[:count]


def candidate_splits(n: int, *, min_body_layers: int = 1, stride: int = 1) -> list[tuple[int, int]]:
    """Every (X, Y) with 0 <= X < Y <= N, at least `min_body_layers` on the cloud, X and Y on multiples of
    `stride` (N always allowed for Y)."""
    if not 1 <= min_body_layers <= n:
        raise ValueError(f"--min-body-layers must be 1 to {n}, got {min_body_layers}")
    if not 1 <= stride <= n:
        raise ValueError(f"--stride must be 1 to {n}, got {stride}")
    points = sorted({*range(0, n + 1, stride), n})
    return [(x, y) for x in points for y in points if y - x >= min_body_layers]


def make_plan(scenario: Scenario, assessment: Assessment | None, target: PrivacyTarget,
              splits: list[tuple[int, int]] | None = None) -> Plan:
    """Predict every candidate, score its leakage, and pick the fastest that meets the target."""
    n = scenario.num_layers
    if assessment is not None and assessment.num_layers != n:
        raise ValueError(f"the assessment is of a {assessment.num_layers}-layer model ({assessment.model}); "
                         f"the plan is for {n} layers")
    pairs = candidate_splits(n) if splits is None else splits
    if not pairs:
        raise ValueError("no candidate split: loosen --min-body-layers or --stride")

    def judge(leak: Leak) -> bool | None:
        if target.max_recovery is None or leak.value is None:
            return None
        return leak.value <= target.max_recovery

    candidates = []
    for x, y in dict.fromkeys(pairs):
        leak = split_leak(assessment, x, y, target) if assessment is not None else Leak(None)
        candidates.append(Candidate(predict_split(scenario, x, y), leak, judge(leak)))
    # fastest first; on a tie, fewer bytes, then more layers kept on the device at the shallower end
    candidates.sort(key=lambda c: (-c.prediction.tokens_per_s, c.prediction.up_bytes + c.prediction.down_bytes,
                                   -min(c.prediction.x, n - c.prediction.y)))
    local = Candidate(predict_local_only(scenario), NOTHING_SENT, judge(NOTHING_SENT))
    cloud = Candidate(predict_cloud_only(scenario), TEXT_SENT, judge(TEXT_SENT))
    plan = Plan(scenario, target, candidates, local, cloud, None, assessment is not None)

    if target.max_recovery is None or assessment is None:
        plan.recommended = candidates[0]
    else:
        plan.recommended = next((c for c in candidates if c.meets), None)
        unknown = sum(c.leak.value is None for c in candidates)
        if unknown:
            plan.notes.append(f"{unknown} of {len(candidates)} splits use a layer the assessment did not measure; "
                              "they count as not meeting the target")
    best = plan.recommended
    if best is not None and local.prediction.tokens_per_s >= best.prediction.tokens_per_s:
        plan.notes.append(f"local-only ({local.prediction.tokens_per_s:.2f} tokens/s) is at least as fast as the "
                          f"recommended split and sends nothing: split only if the device cannot hold the whole model")
    return plan
