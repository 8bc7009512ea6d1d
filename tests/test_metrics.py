"""The body server's Prometheus counters (lambdasplit.server.metrics): every name dashboards read, one
registry per server (several servers in one process never mix their counts), gauges read when scraped."""

from __future__ import annotations

from lambdasplit.server.metrics import COUNTERS, GAUGES, HISTOGRAMS, Metrics

# what /metrics has always shown: dashboards and the tests read these names
NAMES = ["lambdasplit_sessions_opened_total", "lambdasplit_sessions_refused_total", "lambdasplit_steps_total",
         "lambdasplit_step_errors_total", "lambdasplit_bytes_received_total", "lambdasplit_bytes_sent_total",
         "lambdasplit_unauthorized_total", "lambdasplit_step_seconds", "lambdasplit_compute_seconds",
         "lambdasplit_batch_size", "lambdasplit_sessions", "lambdasplit_kv_cache_bytes",
         "lambdasplit_kv_reserved_bytes", "lambdasplit_kv_budget_bytes", "lambdasplit_rss_bytes"]


def samples(text: str) -> dict[str, float]:
    return {name: float(value) for name, value in (line.rsplit(" ", 1) for line in text.splitlines()
                                                   if line and not line.startswith("#"))}


def types(text: str) -> dict[str, str]:
    return {line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE")}


def test_every_name_and_type_is_kept():
    metrics = Metrics()
    metrics.gauges.update({name: (lambda: 7) for name in GAUGES})
    declared = types(metrics.render())
    for name in NAMES:
        assert name in declared, name
    assert {declared[f"lambdasplit_{n}"] for n in HISTOGRAMS} == {"histogram"}
    assert {declared[f"lambdasplit_{n}"] for n in GAUGES} == {"gauge"}
    assert {declared[f"lambdasplit_{n}"] for n in COUNTERS} == {"counter"}
    assert "process_resident_memory_bytes" in declared and "python_info" in declared


def test_counts_labels_histograms_and_gauges():
    metrics = Metrics()
    held = [0]
    metrics.gauges["kv_cache_bytes"] = lambda: held[0]
    for _ in range(3):
        metrics.inc("steps_total", transport="ws")
    metrics.inc("sessions_refused_total", reason="busy")
    metrics.inc("bytes_sent_total", 11612160)
    metrics.inc("rollback_positions_total", 4)
    metrics.inc("something_new_total", code="x")  # a counter no one declared is shown, not dropped
    for size in (1, 3, 3, 20):
        metrics.observe("batch_size", size)
    held[0] = 4096  # gauges are read at each scrape
    values = samples(metrics.render())
    assert values['lambdasplit_steps_total{transport="ws"}'] == 3
    assert values['lambdasplit_steps_total{transport="http"}'] == 0
    assert values['lambdasplit_sessions_refused_total{reason="busy"}'] == 1
    assert values["lambdasplit_bytes_sent_total"] == 11612160 and values["lambdasplit_rollback_positions_total"] == 4
    assert values['lambdasplit_something_new_total{code="x"}'] == 1
    assert values["lambdasplit_batch_size_count"] == 4 and values["lambdasplit_batch_size_sum"] == 27
    assert values['lambdasplit_batch_size_bucket{le="4.0"}'] == 3
    assert values['lambdasplit_batch_size_bucket{le="+Inf"}'] == 4
    assert values["lambdasplit_kv_cache_bytes"] == 4096
    assert not any(name.endswith("_created") for name in values)


def test_servers_in_one_process_keep_their_own_counts():
    a, b = Metrics(), Metrics()
    a.inc("sessions_opened_total")
    a.observe("step_seconds", 0.01)
    assert samples(a.render())["lambdasplit_sessions_opened_total"] == 1
    assert samples(b.render())["lambdasplit_sessions_opened_total"] == 0
    assert samples(b.render())["lambdasplit_step_seconds_count"] == 0
