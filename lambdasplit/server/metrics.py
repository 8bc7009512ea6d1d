"""The body server's counters, in the Prometheus text format (GET /metrics).

A few counters, gauges and histograms with fixed buckets, written by hand: no client library, and
nothing here ever holds a tensor, a frame or a prompt; only counts, sizes and durations.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from collections.abc import Callable

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.buckets):
            self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip(self.buckets, self.counts):
            running += n
            out.append(f'{name}_bucket{{le="{bound:g}"}} {running}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return out


class Metrics:
    """What one server counts. Thread-safe: the event loop and the compute thread both write."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters: dict[tuple[str, tuple], float] = defaultdict(float)
        self.step_seconds = Histogram(LATENCY_BUCKETS)
        self.compute_seconds = Histogram(LATENCY_BUCKETS)
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.gauges: dict[str, Callable[[], float]] = {}

    def inc(self, name: str, value: float = 1, **labels: str) -> None:
        with self._lock:
            self.counters[(name, tuple(sorted(labels.items())))] += value

    def observe(self, histogram: str, value: float) -> None:
        with self._lock:
            getattr(self, histogram).observe(value)

    def render(self) -> str:
        with self._lock:
            counters = dict(self.counters)
            histograms = [(n, getattr(self, n)) for n in ("step_seconds", "compute_seconds", "batch_size")]
            lines = []
            for name, help_text in _COUNTERS.items():
                lines += [f"# HELP lambdasplit_{name} {help_text}", f"# TYPE lambdasplit_{name} counter"]
                series = [(labels, v) for (n, labels), v in counters.items() if n == name] or [((), 0)]
                for labels, value in sorted(series):
                    lines.append(f"lambdasplit_{name}{_labels(labels)} {_number(value)}")
            for name, hist in histograms:
                lines += [f"# HELP lambdasplit_{name} {_HISTOGRAMS[name]}", f"# TYPE lambdasplit_{name} histogram"]
                lines += hist.lines(f"lambdasplit_{name}")
        for name, read in self.gauges.items():
            lines += [f"# HELP lambdasplit_{name} {_GAUGES.get(name, name)}", f"# TYPE lambdasplit_{name} gauge",
                      f"lambdasplit_{name} {_number(read())}"]
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    """Exact for counts and bytes (`%g` would round 11612160 to 1.16122e+07)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _labels(labels: tuple) -> str:
    if not labels:
        return ""
    escaped = (f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in labels)
    return "{" + ",".join(escaped) + "}"


_COUNTERS = {
    "sessions_opened_total": "Sessions opened.",
    "sessions_refused_total": "Session requests refused, by reason.",
    "steps_total": "Steps run, by transport.",
    "step_errors_total": "Steps refused or failed, by error code.",
    "bytes_received_total": "Frame bytes received from clients.",
    "bytes_sent_total": "Frame bytes sent to clients.",
    "unauthorized_total": "Requests refused for a missing or unknown token.",
}
_HISTOGRAMS = {
    "step_seconds": "Time from a step's arrival to its reply being ready (queueing, decoding, body, encoding).",
    "compute_seconds": "Time of one forward pass through the body (one batch).",
    "batch_size": "Sessions served by one forward pass.",
}
_GAUGES = {
    "sessions": "Sessions open now.",
    "kv_cache_bytes": "Bytes the open sessions' KV caches hold now.",
    "kv_reserved_bytes": "KV-cache bytes reserved by open sessions.",
    "kv_budget_bytes": "The KV-cache memory budget (0: none).",
    "rss_bytes": "Resident memory of the server process.",
}
