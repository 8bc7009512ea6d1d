"""`lambdasplit bench table1`, run as the real command on a few tokens: every row of the paper's Table I
through real server processes behind the emulated link, with traffic that must match the arithmetic
of what each row sends."""

from __future__ import annotations

import csv
import json

import pytest
from test_cli import cli, failed_clearly

from lambdasplit.bench.table1 import PAPER_SPLITS, Row, caching_reductions, markdown, paper_markdown, scale_split

TOKENS = 4
D, FP16 = 576, 2


def test_paper_ratios_scale_to_the_model():
    assert [scale_split(x, y, 32) for x, y in PAPER_SPLITS] == list(PAPER_SPLITS)  # the paper's own model
    assert [scale_split(x, y, 30) for x, y in PAPER_SPLITS] == [(1, 29), (4, 26), (8, 23)]  # 2:28, 8:22, 15:15
    assert [scale_split(x, y, 4) for x, y in PAPER_SPLITS] == [(1, 3)] * 3  # at least a layer at each end
    with pytest.raises(ValueError, match="cannot be split"):
        scale_split(1, 31, 2)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    out = tmp_path_factory.mktemp("table1")
    r = cli("bench", "table1", "--tokens", str(TOKENS), "--out", str(out), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    meta_rows = json.loads((out / "table1.json").read_text())
    return out, r.stdout, meta_rows["meta"], [Row(**row) for row in meta_rows["rows"]]


@pytest.mark.slow
def test_writes_table_csv_json_and_chart(table):
    out, stdout, meta, rows = table
    assert (out / "table1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "table1.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows) == 8
    md = (out / "table1.md").read_text()
    assert md.startswith("| Method | Local : Cloud (layers) | Transmission data | Uplink (MB)")
    assert "2:30 -> 2:28 (split 1:29), 8:24 -> 8:22 (split 4:26), 16:16 -> 15:15 (split 8:23)" in stdout
    assert [r.method for r in rows] == ["cloud-only"] + ["Λ-Split w/o caching"] * 3 + ["Λ-Split w/ caching"] * 3 + \
        ["local-only"]
    assert [r.ratio for r in rows] == ["0 : 30", "2 : 28", "8 : 22", "15 : 15", "2 : 28", "8 : 22", "15 : 15",
                                       "30 : 0"]
    assert meta["device_slowdown"] == 1 and "EMULATED" not in md


@pytest.mark.slow
def test_every_row_generates_the_tokens_and_adds_up(table):
    _, _, meta, rows = table
    for r in rows:
        assert r.tokens == TOKENS and r.prompt_tokens == meta["prompt_tokens"] > 5
        assert r.total_s == pytest.approx(r.communication_s + r.local_s + r.cloud_s, abs=1e-6)
        assert r.tokens_per_s == pytest.approx(TOKENS / r.total_s)
        assert r.total_mb == pytest.approx(r.up_mb + r.down_mb)
    cloud, local = rows[0], rows[-1]
    assert cloud.local_s == 0 and cloud.cloud_s > 0
    assert local.cloud_s == 0 and local.total_mb == 0 and local.communication_s == 0
    for r in rows[1:-1]:
        assert r.local_s > 0 and r.cloud_s > 0 and r.communication_s > 0


@pytest.mark.slow
def test_traffic_is_what_each_row_must_send(table):
    _, _, meta, rows = table
    n_in = meta["prompt_tokens"]
    steps = [n_in] + [1] * (TOKENS - 1)  # the prompt, then one new token per step (the last is not fed back)
    cached = sum(steps) * D * FP16
    uncached = sum(n_in + i for i in range(TOKENS)) * D * FP16  # the whole sequence, every step
    for r in rows:
        payload = {"Λ-Split w/o caching": uncached, "Λ-Split w/ caching": cached}.get(r.method)
        if payload is None:
            continue
        for mb in (r.up_mb, r.down_mb):  # the states themselves, plus headers: at most ~2 kB per step and the opening
            assert payload <= mb * 1e6 <= payload + 2000 * TOKENS + 4000, (r, payload)
        # the proxy also forwards the closing handshake, after the client has read its sockets' counters
        assert r.link_up_mb == pytest.approx(r.up_mb, abs=1e-4) and r.link_down_mb == pytest.approx(r.down_mb, abs=1e-4)
    # the prompt went up as text: a request of a few hundred bytes, not states
    assert rows[0].up_mb * 1e6 < 1000 and rows[0].down_mb * 1e6 < 200 * TOKENS + 1000
    cut = caching_reductions(rows)
    assert set(cut) == {"1:29", "4:26", "8:23"}
    assert all(0.5 < v < 1 - cached / uncached * 0.9 for v in cut.values()), cut


@pytest.mark.slow
def test_emulated_device_is_labelled_and_slower(tmp_path):
    r = cli("bench", "table1", "--tokens", "3", "--rows", "local-only", "--device-slowdown", "3", "--out",
            str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "EMULATED 3x slower" in r.stdout
    assert "EMULATED 3x slower device" in (tmp_path / "table1.md").read_text()
    (row,) = json.loads((tmp_path / "table1.json").read_text())["rows"]
    compute = row["local_s"] - row["emulated_wait_s"]
    assert row["device_slowdown"] == 3 and 1.5 * compute < row["emulated_wait_s"] <= 2 * compute


@pytest.mark.slow
def test_capture_agrees_with_the_socket_counts(tmp_path):
    r = cli("bench", "table1", "--tokens", "3", "--rows", "cache", "--ratios", "2:30,16:16", "--capture", "--out",
            str(tmp_path))
    if r.returncode != 0 and "--capture:" in r.stderr:
        pytest.skip(f"no packet capture here: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "table1.json").read_text())["rows"]
    assert [row["split"] for row in rows] == ["1:29", "8:23"]
    for row in rows:
        for way in ("up", "down"):
            assert row[f"capture_{way}_mb"] == pytest.approx(row[f"{way}_mb"], rel=0.02)
    assert "Packet capture" in (tmp_path / "table1.md").read_text()


def test_markdown_layouts():
    assert paper_markdown().count("\n") == 9 and "| Λ-Split w/ caching | 2 : 30 | Latest part" in paper_markdown()
    row = Row("local-only", 30, 0, "", "-", 11, 3, 0, 0, 0, 0, 1.5, 0, 1.5, 2, 4.0, 1.0)
    assert "EMULATED 4x slower device" in markdown([row], 4.0) and "EMULATED" not in markdown([row])


@pytest.mark.slow
@pytest.mark.parametrize("args, words", [
    (["--rows", "cloud,cache"], ["--rows takes"]),
    (["--tokens", "0"], ["--tokens must be at least 1"]),
    (["--ratios", "3:29"], ["--ratios takes", "2:30,8:24,16:16"]),
    (["--link", "fast"], ["neither a rate"]),
])
def test_bad_arguments(args, words):
    failed_clearly(cli("bench", "table1", *args, timeout=120), *words)
