"""Many users at once: decode steps of concurrent sessions share one forward pass on the server, and each
user still gets exactly the greedy answer they would get alone. Also `bench concurrency`, run small."""

from __future__ import annotations

import json
import threading

import pytest
from helpers import metric
from test_cli import cli

from lambdasplit.client.generate import SplitClient
from lambdasplit.server.process import ServerProcess

PROMPTS = ["What is the difference between AI, ML and DL?", "Hi", "Name three colours.", "Count to five."]
TOKENS = 12


@pytest.mark.parametrize("transport", ["ws", pytest.param("http", marks=pytest.mark.slow)])
def test_concurrent_sessions_are_batched_and_exact(smol_dir, transport):
    local = SplitClient(smol_dir, server=None, split=(1, 29), wire="fp32")
    reference = [local.generate(p, max_new_tokens=TOKENS, stop_at_eos=False).token_ids for p in PROMPTS]
    with ServerProcess(str(smol_dir), "1:29", "--max-batch", "8") as server:
        clients = [SplitClient(smol_dir, server=server.url, split=(1, 29), wire="fp32", transport=transport)
                   for _ in PROMPTS]
        got: dict[int, list[int]] = {}
        errors = []
        start = threading.Barrier(len(PROMPTS))

        def run(k: int) -> None:
            try:
                start.wait()
                got[k] = clients[k].generate(PROMPTS[k], max_new_tokens=TOKENS, stop_at_eos=False).token_ids
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(k,)) for k in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        passes = metric(server.url, "lambdasplit_batch_size_count")
        rows = metric(server.url, "lambdasplit_batch_size_sum")
    assert not errors, errors
    assert [got[k] for k in range(len(PROMPTS))] == reference
    assert rows == len(PROMPTS) * TOKENS  # every step ran, once
    assert passes < rows  # and some of them shared a forward pass


@pytest.mark.slow
def test_unbatched_server_runs_one_step_per_pass(smol_dir):
    with ServerProcess(str(smol_dir), "1:29", "--max-batch", "1") as server:
        clients = [SplitClient(smol_dir, server=server.url, split=(1, 29), wire="fp32") for _ in range(2)]
        threads = [threading.Thread(target=c.generate, args=("Hi",), kwargs=dict(max_new_tokens=6)) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert metric(server.url, "lambdasplit_batch_size_sum") == metric(server.url, "lambdasplit_batch_size_count")


@pytest.mark.slow
def test_bench_concurrency_small(tmp_path):
    r = cli("bench", "concurrency", "--clients", "1,3", "--tokens", "6", "--out", str(tmp_path), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads((tmp_path / "concurrency.json").read_text())["rows"]
    assert [(row["mode"], row["clients"]) for row in rows] == [("batched", 1), ("batched", 3), ("unbatched", 1),
                                                               ("unbatched", 3)]
    for row in rows:
        assert row["steps"] == 6 * row["clients"] and row["max_abs_diff"] < 0.5
    assert rows[1]["mean_batch"] > 1 and rows[3]["mean_batch"] == 1
    assert (tmp_path / "concurrency.png").read_bytes()[:4] == b"\x89PNG"
    assert "EMULATED" in (tmp_path / "concurrency.md").read_text()
