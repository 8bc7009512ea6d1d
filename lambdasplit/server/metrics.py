"""The body server's counters, in the Prometheus text format (GET /metrics), through prometheus_client.

Each server (each Metrics) has a registry of its own, so several servers in one process (the tests) never
mix their counts, plus the standard process_* and python_info metrics of the process. Nothing here ever
holds a tensor, a frame or a prompt; only counts, sizes and durations.

Under Ray Serve every replica is a process with its own Metrics, and its /metrics is that replica's
(ray_serve.RayBody.replica_metrics reaches one by name): a replica can run on any node, and its gauges are
read from its own sessions when scraped, which prometheus_client's multiprocess mode (one shared folder of
files per host, no callback gauges) cannot do.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

# the Prometheus text format every scraper reads (prometheus_client's default, 1.0.0, is newer than some)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "lambdasplit_"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

disable_created_metrics()  # no *_created series: the counters read as they always have


class Metrics:
    """What one server counts: counters by name (with labels), three histograms, and gauges read when
    scraped (`gauges`: name -> a function returning the value, filled in by the server's context).
    Thread-safe: the event loop and the compute thread both write."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()  # for counters made on first use
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.counters: dict[str, Counter] = {}
        for name, (help_text, labels) in COUNTERS.items():
            self._counter(name, help_text, labels)
        for transport in ("ws", "http"):  # shown as 0 before the first step, as they always were
            self.counters["steps_total"].labels(transport=transport)
        self.histograms = {name: Histogram(PREFIX + name, help_text, buckets=buckets, registry=self.registry)
                           for name, (help_text, buckets) in HISTOGRAMS.items()}
        self.gauges: dict[str, Callable[[], float]] = {}
        self.registry.register(_Gauges(self.gauges))

    def _counter(self, name: str, help_text: str, labels: tuple[str, ...]) -> Counter:
        counter = Counter(PREFIX + name, help_text, labelnames=labels, registry=self.registry)
        self.counters[name] = counter
        return counter

    def inc(self, name: str, value: float = 1, **labels: str) -> None:
        """Add `value` to the counter `name` (a name not in COUNTERS gets a counter of its own, with these labels)."""
        counter = self.counters.get(name)
        if counter is None:
            with self._lock:
                counter = self.counters.get(name) or self._counter(name, name.replace("_", " ") + ".",
                                                                   tuple(sorted(labels)))
        (counter.labels(**labels) if labels else counter).inc(value)

    def observe(self, histogram: str, value: float) -> None:
        self.histograms[histogram].observe(value)

    def render(self) -> str:
        """The Prometheus text of every metric (CONTENT_TYPE)."""
        return generate_latest(self.registry).decode()


class _Gauges:
    """A collector over the gauges' functions, read at each scrape."""

    def __init__(self, gauges: dict[str, Callable[[], float]]):
        self.gauges = gauges

    def describe(self):
        return []

    def collect(self):
        for name, read in list(self.gauges.items()):
            yield GaugeMetricFamily(PREFIX + name, GAUGES.get(name, name), value=float(read()))


COUNTERS = {
    "sessions_opened_total": ("Sessions opened.", ()),
    "sessions_refused_total": ("Session requests refused, by reason.", ("reason",)),
    "steps_total": ("Steps run, by transport.", ("transport",)),
    "step_errors_total": ("Steps refused or failed, by error code.", ("code",)),
    "bytes_received_total": ("Frame bytes received from clients.", ()),
    "bytes_sent_total": ("Frame bytes sent to clients.", ()),
    "unauthorized_total": ("Requests refused for a missing or unknown token.", ()),
    "rollback_positions_total": ("KV-cache positions rolled back (speculative drafts the device rejected).", ()),
    "images_total": ("Images made (text-to-image server).", ()),
    "images_abandoned_total": ("Images whose device went away before the last step.", ()),
}
HISTOGRAMS = {
    "step_seconds": ("Time from a step's arrival to its reply being ready (queueing, decoding, body, encoding).",
                     LATENCY_BUCKETS),
    "compute_seconds": ("Time of one forward pass through the body (one batch).", LATENCY_BUCKETS),
    "batch_size": ("Sessions served by one forward pass.", BATCH_BUCKETS),
}
GAUGES = {
    "sessions": "Sessions open now.",
    "kv_cache_bytes": "Bytes the open sessions' KV caches hold now.",
    "kv_reserved_bytes": "KV-cache bytes reserved by open sessions.",
    "kv_budget_bytes": "The KV-cache memory budget (0: none).",
    "rss_bytes": "Resident memory of the server process.",
}
