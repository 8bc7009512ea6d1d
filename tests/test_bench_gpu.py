"""`lambdasplit bench gpu`, the prepared GPU check: its CPU dry run end to end through the real command, the
one-line error where there is no CUDA device, and --device on every bench."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lambdasplit.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_bench_takes_device():
    benches = _subparsers(_subparsers(build_parser())["bench"])
    assert "gpu" in benches
    for name, parser in benches.items():
        assert "--device" in parser._option_string_actions, f"bench {name} has no --device"
    assert benches["gpu"].parse_args([]).device == "cuda"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_no_cuda_is_one_clear_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "gpu", "--device", "cuda"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert "no CUDA device" in err and "--device cpu" in err, err


@pytest.mark.slow
def test_cpu_dry_run(tmp_path):
    out = tmp_path / "gpu-check.json"
    r = subprocess.run([sys.executable, "-m", "lambdasplit", "bench", "gpu", "--device", "cpu", "--formats", "fp32",
                        "--tokens", "6", "--sessions", "1,2", "--prompts", "1", "--rtt", "10", "--json", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(out.read_text())
    assert report["meta"]["body_device"] == "cpu" and report["meta"]["client"] == "cpu fp32"
    (agreement,) = report["agreement"]
    assert agreement["body"] == "cpu fp32" and agreement["agreement"] == 1.0  # a lossless wire: exact
    assert [t["sessions"] for t in report["throughput"]] == [1, 2]
    assert all(t["tokens_per_s"] > 0 and t["decode_steps"] == t["sessions"] * 5 for t in report["throughput"])
    (memory,) = report["memory"]
    assert memory["kv_bytes_per_position"] > 0 and memory["kv_bytes_per_session"] > 0
    assert memory["gpu_bytes_per_session"] is None and "instead" in memory["gpu_source"]
    spec = report["speculation"]
    assert spec["rtt_ms"] == 10 and spec["off_tokens_per_s"] > 0 and spec["on_tokens_per_s"] > 0
    assert spec["identical"] is True
    for heading in ("greedy agreement", "decode tokens/s", "KV per session", "speed-up"):
        assert heading in r.stdout
