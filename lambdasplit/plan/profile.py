"""A machine's cost model for one model: how long each part of a split takes there, measured.

`measure_profile` loads the whole model as the project's own parts (head with no layers, a body
holding every layer, tail with no layers) and times, in the order a real decode step runs them:

- the embedding lookup;
- each decoder layer on its own (`LayerStack.forward(start=i, stop=i+1)`), for one new token over
  a KV cache of `context` positions (decode), and for a `prefill_tokens`-token prompt (prefill);
- the whole stack in one call, to separate the per-call cost (causal masks, rotary tables) from
  the layers' own: a stack [a, b) then costs one call plus its layers;
- the final norm and LM head on the last position;
- decode steps of several rows at once (the next token and its speculative drafts: `rows`, by
  default 2, 4, 9 and 16 new rows over the same `context` cached positions): each layer on its own,
  and the final norm and LM head on every row (the client's tail computes logits for all of them).
  A CPU's BLAS multiplies one row by a matrix-vector kernel and several by a matrix product, so a
  2-row step costs far more than one row more at the prefill's rate (on this project's machine, one
  thread, `profile` gave layers [1, 29) 48 ms for 1 row, 74 ms for 2, 99 ms for 16);
- the wire codecs, one frame encoded and decoded, at 1 row and at `prefill_tokens` rows.

Each figure is the median over `repeats` sweeps after `warmup` sweeps (the multi-row steps: over at
most `ROW_REPEATS`, to keep them to a second or two). Layers are timed in turn,
not each many times in a row, so that their weights are as cold in the CPU caches as they are in
a real pass. A `Profile` is JSON; `Profile.scaled(k)` is the same machine k times slower, which is
how a device given only as a speed factor is modelled.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..util.jsonfile import read_json, write_json

PROFILE_VERSION = 2  # 2: multi-row decode steps (decode_rows, lm_head_rows)
READABLE_VERSIONS = (1, 2)  # a version 1 file loads, its multi-row costs estimated (see Profile.extra_row_s)
DEFAULT_CONTEXT = 64
DEFAULT_PREFILL_TOKENS = 64
DEFAULT_REPEATS = 9  # passes are cheap (under a second here) and the median of 9 rides out short bursts of other load
DEFAULT_ROWS = (2, 4, 9, 16)  # multi-row decode steps timed: 1 + k drafts for k up to the client's 15
ROW_REPEATS = 3  # a sweep of the multi-row steps takes about half a second here: the median of 3 at most
NOISY_SPREAD = 0.25
_TIME_FIELDS = ("decode_call_s", "prefill_call_s", "embed_decode_s", "embed_prefill_s",
                "lm_head_decode_s", "lm_head_prefill_s")


class ProfileError(ValueError):
    """A profile file that cannot be used: unreadable, not a profile, or for another model."""


@dataclass(frozen=True)
class Profile:
    """Seconds each part of a model takes on one machine (times `slowdown`, for a scaled profile)."""

    model: str
    num_layers: int
    hidden_size: int
    dtype: str
    context: int  # KV positions behind each timed decode step
    prefill_tokens: int  # prompt length of the prefill timings
    decode_layer_s: tuple[float, ...]  # layer i, one new token, net of the per-call cost
    prefill_layer_s: tuple[float, ...]  # layer i, the whole prefill_tokens prompt
    decode_call_s: float  # per LayerStack.forward call: masks and rotary tables (decode)
    prefill_call_s: float
    embed_decode_s: float
    embed_prefill_s: float
    lm_head_decode_s: float  # final norm + LM head on the last position
    lm_head_prefill_s: float
    codec_s: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)
    # codec name -> (encode 1 row, decode 1 row, encode prefill_tokens rows, decode prefill_tokens rows)
    decode_rows: dict[int, tuple[float, ...]] = field(default_factory=dict)
    # rows r >= 2 -> layer i on a decode step of r new rows, net of the per-call cost (decode_call_s);
    # empty in a version 1 profile: multi-row steps are then estimated (extra_row_s)
    lm_head_rows: dict[int, float] = field(default_factory=dict)  # rows r >= 2 -> final norm + LM head on r rows
    repeats: int = DEFAULT_REPEATS
    spread: float = 0.0  # how much timings that should agree did not (see _spread): high when other load interfered
    machine: dict = field(default_factory=dict)  # cores, threads, torch, cpu, platform, date
    slowdown: float = 1.0  # how many times slower than what was measured

    # ---- costs --------------------------------------------------------------------------------
    def stack_s(self, start: int, stop: int, tokens: int = 1) -> float:
        """Seconds for layers [start, stop) in one call on `tokens` new tokens (1: a decode step).

        Prefill of L tokens is scaled linearly from the measured prefill_tokens: close for prompts
        of tens to a few hundred tokens, where the matrix products dominate attention.
        """
        self._check_range(start, stop)
        if start == stop:
            return 0.0
        if tokens <= 1:
            return self.decode_call_s + sum(self.decode_layer_s[start:stop])
        return self.prefill_call_s + sum(self.prefill_layer_s[start:stop]) * tokens / self.prefill_tokens

    def embed_s(self, tokens: int = 1) -> float:
        return self.embed_decode_s if tokens <= 1 else self.embed_prefill_s * tokens / self.prefill_tokens

    def lm_head_s(self, tokens: int = 1) -> float:
        """Final norm + LM head: on the last position only, so a prompt costs about what one token does."""
        return self.lm_head_decode_s if tokens <= 1 else self.lm_head_prefill_s

    def whole_model_s(self, tokens: int = 1) -> float:
        """The unsplit model on this machine: embeddings, every layer in one call, norm and LM head."""
        return self.embed_s(tokens) + self.stack_s(0, self.num_layers, tokens) + self.lm_head_s(tokens)

    def stack_rows_s(self, start: int, stop: int, rows: int = 1) -> float:
        """Seconds for layers [start, stop) in one call on a decode step of `rows` new rows (a speculative
        round: the next token and its drafts) over the profile's cached context.

        Interpolated linearly in rows between the measured row counts (`decode_rows`; 1 row: the
        decode step). Beyond the largest measured, and for a profile without multi-row timings, each
        further row adds the estimate of `extra_row_s`. Not `stack_s(start, stop, rows)`: that scales
        the prefill, and is far below a decode step for a few rows.
        """
        self._check_range(start, stop)
        if start == stop:
            return 0.0
        measured = {1: sum(self.decode_layer_s[start:stop]),
                    **{r: sum(times[start:stop]) for r, times in self.decode_rows.items()}}
        return self.decode_call_s + _interpolate(measured, rows, self.extra_row_s(start, stop))

    def lm_head_rows_s(self, rows: int = 1) -> float:
        """Final norm + LM head on every one of `rows` rows (a speculative round needs logits for each):
        interpolated as `stack_rows_s`, between 1 row (lm_head_decode_s) and `lm_head_rows`."""
        measured = {1: self.lm_head_decode_s, **self.lm_head_rows}
        return _interpolate(measured, rows, self.extra_row_s(0, 0, lm_head=True))

    def embed_rows_s(self, rows: int = 1) -> float:
        """The embedding lookup of `rows` new tokens: the one-token lookup, each further one at the prefill's rate."""
        return self.embed_decode_s + max(0, rows - 1) * self.extra_row_s(0, 0, embed=True)

    def extra_row_s(self, start: int, stop: int, *, embed: bool = False, lm_head: bool = False) -> float:
        """The ESTIMATE of what each row beyond the first adds to a decode step through layers [start, stop),
        and the embedding and the LM head if asked: the fallback where nothing was measured (a version 1
        profile, or rows beyond the largest measured count; `stack_rows_s` and `lm_head_rows_s` use it).

        An extra row is costed at the prefill's rate per token: the weights are read once for every
        row, so a row adds only its arithmetic. For the LM head, an extra row is assumed to cost the
        share of a decode step it costs the layers. Far too low for two or three rows on a CPU, where
        leaving the one-row kernels costs something of its own (measured on this project's machine, one
        thread: the 30 layers and the LM head take 55% longer on 2 rows than on 1, where this estimate
        adds under a tenth); closer between many rows, where the matrix products are already in use.
        """
        self._check_range(start, stop)
        seconds = sum(self.prefill_layer_s[start:stop]) / self.prefill_tokens
        if embed:
            seconds += self.embed_prefill_s / self.prefill_tokens
        if lm_head:
            decode = sum(self.decode_layer_s)
            per_token = sum(self.prefill_layer_s) / self.prefill_tokens
            seconds += self.lm_head_decode_s * per_token / decode if decode > 0 else 0.0
        return seconds

    def codec_time(self, name: str, rows: int) -> tuple[float, float] | None:
        """(encode, decode) seconds of one frame of `rows` states in this codec; None if not measured.

        Interpolated linearly in rows between the 1-row and the prefill_tokens-row timings."""
        times = self.codec_s.get(name)
        if times is None:
            return None
        e1, d1, ep, dp = times
        share = 0.0 if self.prefill_tokens <= 1 else max(0, rows - 1) / (self.prefill_tokens - 1)
        return e1 + (ep - e1) * share, d1 + (dp - d1) * share

    def _check_range(self, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= self.num_layers:
            raise ValueError(f"layers [{start}, {stop}) are outside this profile's 0..{self.num_layers}")

    # ---- variants -----------------------------------------------------------------------------
    def scaled(self, k: float) -> "Profile":
        """The same machine k times slower (k < 1: faster); every time is multiplied by k."""
        if not k > 0 or k != k or k == float("inf"):
            raise ValueError(f"a speed factor must be a positive number, got {k}")
        times = {name: getattr(self, name) * k for name in _TIME_FIELDS}
        return replace(self, **times, decode_layer_s=tuple(t * k for t in self.decode_layer_s),
                       prefill_layer_s=tuple(t * k for t in self.prefill_layer_s),
                       codec_s={n: tuple(t * k for t in v) for n, v in self.codec_s.items()},
                       decode_rows={r: tuple(t * k for t in v) for r, v in self.decode_rows.items()},
                       lm_head_rows={r: t * k for r, t in self.lm_head_rows.items()},
                       slowdown=self.slowdown * k)

    def describe(self) -> str:
        """One line: what was measured where, and what the whole model costs per token there."""
        m = self.machine
        where = f"{m.get('cpu') or 'unknown CPU'}, {m.get('threads', '?')} threads, torch {m.get('torch', '?')}"
        speed = "" if self.slowdown == 1 else f", times x {self.slowdown:g}"
        noisy = (f"; NOISY: the passes differed by {self.spread:.0%}, other load may have interfered "
                 "(measure again on a quiet machine)" if self.spread > NOISY_SPREAD else "")
        return (f"{self.model} {self.dtype} on {where} ({m.get('date', 'undated')}{speed}): "
                f"{self.whole_model_s() * 1e3:.1f} ms per token for the whole model "
                f"({sum(self.decode_layer_s) * 1e3 / self.num_layers:.2f} ms a layer, LM head "
                f"{self.lm_head_decode_s * 1e3:.1f} ms){noisy}")

    def check_model(self, num_layers: int, hidden_size: int, role: str) -> None:
        """Refuse a profile measured on another architecture than the one being planned."""
        if (self.num_layers, self.hidden_size) != (num_layers, hidden_size):
            raise ProfileError(f"the {role} profile is for {self.model} ({self.num_layers} layers, D = "
                               f"{self.hidden_size}); the model being planned has {num_layers} layers, D = "
                               f"{hidden_size}. Measure one with: lambdasplit profile --model M --out FILE")

    # ---- files --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = asdict(self)
        data["version"] = PROFILE_VERSION
        data["decode_layer_s"], data["prefill_layer_s"] = list(self.decode_layer_s), list(self.prefill_layer_s)
        data["codec_s"] = {n: list(v) for n, v in self.codec_s.items()}
        data["decode_rows"] = {str(r): list(v) for r, v in sorted(self.decode_rows.items())}
        data["lm_head_rows"] = {str(r): t for r, t in sorted(self.lm_head_rows.items())}
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str = "profile") -> "Profile":
        if not isinstance(data, dict) or data.get("version") not in READABLE_VERSIONS:
            found = data.get("version") if isinstance(data, dict) else type(data).__name__
            raise ProfileError(f"{source} is not a lambdasplit profile of version {PROFILE_VERSION} (found "
                               f"version {found!r}); make one with: lambdasplit profile --out FILE")
        try:
            n = int(data["num_layers"])
            layers = {k: tuple(float(t) for t in data[k]) for k in ("decode_layer_s", "prefill_layer_s")}
            codecs = {str(k): tuple(float(t) for t in v) for k, v in dict(data.get("codec_s", {})).items()}
            rows = {int(r): tuple(float(t) for t in v) for r, v in dict(data.get("decode_rows", {})).items()}
            head_rows = {int(r): float(t) for r, t in dict(data.get("lm_head_rows", {})).items()}
            profile = cls(model=str(data["model"]), num_layers=n, hidden_size=int(data["hidden_size"]),
                          dtype=str(data["dtype"]), context=int(data["context"]),
                          prefill_tokens=int(data["prefill_tokens"]), **layers,
                          **{k: float(data[k]) for k in _TIME_FIELDS}, codec_s=codecs,
                          decode_rows=rows, lm_head_rows=head_rows,
                          repeats=int(data.get("repeats", 0)), spread=float(data.get("spread", 0.0)),
                          machine=dict(data.get("machine", {})),
                          slowdown=float(data.get("slowdown", 1.0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProfileError(f"{source} is not a valid profile: missing or bad field ({type(exc).__name__}: "
                               f"{exc})") from None
        bad = [k for k, v in layers.items() if len(v) != n] + [f"decode_rows[{r}]" for r, v in rows.items()
                                                              if len(v) != n]
        if any(r < 2 for r in (*rows, *head_rows)):
            raise ProfileError(f"{source}: decode_rows and lm_head_rows are for 2 rows or more (1 row is the "
                               "decode step)")
        if bad or n < 1 or profile.prefill_tokens < 1:
            raise ProfileError(f"{source}: {', '.join(bad) or 'num_layers/prefill_tokens'} must hold one time per "
                               f"layer ({n} layers) and a positive prompt length")
        times = [*profile.decode_layer_s, *profile.prefill_layer_s, *(getattr(profile, k) for k in _TIME_FIELDS),
                 *(t for v in codecs.values() for t in v), *(t for v in rows.values() for t in v),
                 *head_rows.values()]
        if any(not 0 <= t < 3600 for t in times) or any(len(v) != 4 for v in codecs.values()):
            raise ProfileError(f"{source}: times must be seconds between 0 and 3600, four per codec")
        return profile

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        data = read_json(path, "profile", ProfileError)
        return cls.from_dict(data, source=str(path))


# ---- measuring ----------------------------------------------------------------------------------
def machine_facts() -> dict:
    """Where a profile was measured: enough to tell whether a cached one still describes this machine."""
    import torch

    return {"cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu": _cpu_name(), "platform": platform.platform(), "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_profile(folder: str | Path, dtype: str = "float32", *, context: int = DEFAULT_CONTEXT,
                    prefill_tokens: int = DEFAULT_PREFILL_TOKENS, repeats: int = DEFAULT_REPEATS, warmup: int = 1,
                    codecs: tuple[str, ...] = (), rows: tuple[int, ...] = DEFAULT_ROWS,
                    progress: bool = True) -> Profile:
    """Measure this machine's Profile for the model in `folder` (see the module's docstring)."""
    import torch
    from tqdm import tqdm

    from ..models.llm import DTYPES, load_config, load_split
    from ..models.source import model_name
    from .wirecost import costing_codec, time_codec

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    rows = tuple(sorted(set(rows)))
    if any(r < 2 for r in rows):
        raise ValueError(f"multi-row decode steps need 2 rows or more, got {rows}")
    if repeats < 1 or warmup < 0 or context < 1 or prefill_tokens < 2:
        raise ValueError(f"need repeats >= 1, warmup >= 0, context >= 1 and prefill tokens >= 2; got {repeats}, "
                         f"{warmup}, {context} and {prefill_tokens}")
    folder = Path(folder)
    config = load_config(folder)
    n, d = config.num_hidden_layers, config.hidden_size
    codec_objects = [costing_codec(name, d) for name in dict.fromkeys(codecs)]  # bad names fail before loading
    positions = int(getattr(config, "max_position_embeddings", 2048))
    if context + max(prefill_tokens, *rows) + 1 > positions:
        raise ValueError(f"context {context} + {max(prefill_tokens, *rows)} tokens exceed the model's {positions} "
                         "positions")
    model = load_split(folder, 0, n, parts=("head", "body", "tail"), dtype=dtype)
    stack = model.body.layers
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    sweeps = warmup + repeats
    row_sweeps = (warmup + min(repeats, ROW_REPEATS)) if rows else 0
    bar = tqdm(total=sweeps * 2 + row_sweeps + len(codec_objects), desc="profiling", unit="pass",
               disable=not progress)
    decode: list[list[float]] = []  # per sweep: embed, layer 0..n-1, whole stack, lm head
    prefill: list[list[float]] = []
    multi: dict[int, list[list[float]]] = {r: [] for r in rows}  # per sweep: layer 0..n-1, lm head on r rows
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation notices, not the user's concern
        token = torch.randint(vocab, (1, 1), generator=generator)
        prompt = torch.randint(vocab, (1, prefill_tokens), generator=generator)
        cache = stack.new_cache()
        stack(model.head(torch.randint(vocab, (1, context), generator=generator), None, 0), cache, 0)
        one, many = model.head(token, None, context), model.head(prompt, None, 0)
        for sweep in range(sweeps):
            decode_row = _decode_pass(model, token, one, cache, context)
            bar.update()
            prefill_row = _prefill_pass(model, prompt, many)
            bar.update()
            if sweep >= warmup:
                decode.append(decode_row)
                prefill.append(prefill_row)
        drafts = {r: torch.randint(vocab, (1, r), generator=generator) for r in rows}
        hidden = {r: model.head(ids, None, context) for r, ids in drafts.items()}
        for sweep in range(row_sweeps):
            for r in rows:
                times = _rows_pass(model, hidden[r], cache, context)
                if sweep >= warmup:
                    multi[r].append(times)
            bar.update()
    codec_s = {}
    for codec in codec_objects:
        codec_s[codec.name] = (*time_codec(codec, 1, d, 10 * repeats), *time_codec(codec, prefill_tokens, d, repeats))
        bar.update()
    bar.close()
    dec, pre = _medians(decode), _medians(prefill)
    dec_call, dec_layers = _split_call_cost(dec[1:n + 1], dec[n + 1])
    pre_call, pre_layers = _split_call_cost(pre[1:n + 1], pre[n + 1])
    multi_med = {r: _medians(sweeps_r) for r, sweeps_r in multi.items() if sweeps_r}
    decode_rows = {r: tuple(max(0.0, t - dec_call) for t in m[:n]) for r, m in multi_med.items()}
    lm_head_rows = {r: m[n] for r, m in multi_med.items()}
    return Profile(model=model_name(folder), num_layers=n, hidden_size=d, dtype=dtype, context=context,
                   prefill_tokens=prefill_tokens, decode_layer_s=dec_layers, prefill_layer_s=pre_layers,
                   decode_call_s=dec_call, prefill_call_s=pre_call, embed_decode_s=dec[0], embed_prefill_s=pre[0],
                   lm_head_decode_s=dec[-1], lm_head_prefill_s=pre[-1], codec_s=codec_s,
                   decode_rows=decode_rows, lm_head_rows=lm_head_rows, repeats=repeats,
                   spread=_spread(decode, n), machine=machine_facts())


def _decode_pass(model, token, hidden, cache, context: int) -> list[float]:
    """One timed decode step, part by part: embed, each layer alone, every layer in one call, LM head.
    `cache` holds `context` positions, and is trimmed back to them after each use."""
    from ..models.llm import truncate_cache  # imports torch: the planner imports this module torch-free
    stack, n = model.body.layers, model.config.num_hidden_layers
    row = [_timed(lambda: model.head(token, None, context))]
    for i in range(n):
        row.append(_timed(lambda: stack(hidden, cache, context, i, i + 1)))
    truncate_cache(cache, context)
    row.append(_timed(lambda: stack(hidden, cache, context)))
    truncate_cache(cache, context)
    row.append(_timed(lambda: model.tail(hidden, None, context)))
    return row


def _rows_pass(model, hidden, cache, context: int) -> list[float]:
    """One timed decode step of hidden's r rows (a speculative round): each layer alone over the cache's
    `context` positions, then the final norm and LM head on all r rows. The cache is trimmed back after."""
    from ..models.llm import truncate_cache

    stack, n = model.body.layers, model.config.num_hidden_layers
    row = [_timed(lambda: stack(hidden, cache, context, i, i + 1)) for i in range(n)]
    truncate_cache(cache, context)
    row.append(_timed(lambda: model.tail(hidden, None, context, last_only=False)))
    return row


def _prefill_pass(model, prompt, hidden) -> list[float]:
    """One timed prefill of the prompt, part by part, each layer and the whole stack on empty caches."""
    stack, n = model.body.layers, model.config.num_hidden_layers
    caches = [stack.new_cache() for _ in range(n + 1)]
    row = [_timed(lambda: model.head(prompt, None, 0))]
    for i in range(n):
        row.append(_timed(lambda: stack(hidden, caches[i], 0, i, i + 1)))
    row.append(_timed(lambda: stack(hidden, caches[n], 0)))
    row.append(_timed(lambda: model.tail(hidden, None, 0)))
    return row


def _interpolate(measured: dict[int, float], rows: int, per_row: float) -> float:
    """The time of `rows` rows from times measured at some row counts (1 always among them): linear between
    the nearest measured counts either side; beyond the largest, `per_row` for each further row."""
    counts = sorted(measured)
    rows = max(1, rows)
    if rows in measured:
        return measured[rows]
    below = max(c for c in counts if c < rows)
    above = min((c for c in counts if c > rows), default=None)
    if above is None:
        return measured[below] + (rows - below) * per_row
    share = (rows - below) / (above - below)
    return measured[below] + (measured[above] - measured[below]) * share


def _medians(rows: list[list[float]]) -> list[float]:
    return [statistics.median(column) for column in zip(*rows)]


def _split_call_cost(singles: list[float], whole: float) -> tuple[float, tuple[float, ...]]:
    """Per-call cost c and net layer times l_i from single-layer calls t_i = c + l_i and one call
    over all n layers, T = c + sum(l_i): c = (sum(t_i) - T) / (n - 1), kept between 0 and half the
    fastest layer's time, so that noise cannot make a layer free."""
    n = len(singles)
    call = min(max(0.0, (sum(singles) - whole) / (n - 1)), min(singles) / 2) if n > 1 else 0.0
    return call, tuple(t - call for t in singles)


def _spread(decode: list[list[float]], n: int) -> float:
    """How far timings that should agree are apart: whole decode passes (slowest - fastest) / median,
    and same-shaped layers (interquartile range / median); the larger. About 0.1 on a quiet machine."""
    passes = [row[0] + row[n + 1] + row[-1] for row in decode]  # embed + every layer in one call + LM head
    layers = sorted(statistics.median(column) for column in zip(*(row[1:n + 1] for row in decode)))
    quartiles = statistics.quantiles(layers, n=4) if n >= 2 else [layers[0]] * 3
    return max((max(passes) - min(passes)) / statistics.median(passes),
               (quartiles[2] - quartiles[0]) / statistics.median(layers))


# ---- this machine's cached profile ----------------------------------------------------------------
def cached_profile_path(folder: str | Path, dtype: str) -> Path:
    """Where this machine's profile of a model is kept, so that `plan` measures it only once."""
    from ..models.source import cache_root, model_name

    return cache_root() / "profiles" / f"{model_name(Path(folder)).replace('/', '_')}-{dtype}.json"


def still_valid(profile: Profile, facts: dict) -> bool:
    """A cached profile describes this machine while its cores, threads and torch are unchanged, and holds
    what this version measures (multi-row decode steps: a version 1 profile is measured again, once)."""
    return (bool(profile.decode_rows) and bool(profile.lm_head_rows)
            and all(profile.machine.get(k) == facts.get(k) for k in ("cores", "threads", "torch", "cpu")))


def this_machine(folder: str | Path, dtype: str = "float32", *, remeasure: bool = False,
                 progress: bool = True, codecs: tuple[str, ...] = ()) -> tuple[Profile, Path, bool]:
    """This machine's profile of a model: cached, or measured now and cached. Returns (profile, path, measured)."""
    path = cached_profile_path(folder, dtype)
    if not remeasure and path.is_file():
        try:
            profile = Profile.load(path)
            if still_valid(profile, machine_facts()):
                return profile, path, False
        except ProfileError:
            pass  # a stale or damaged cache is measured again
    profile = measure_profile(folder, dtype, codecs=codecs, progress=progress)
    return profile, profile.save(path), True
