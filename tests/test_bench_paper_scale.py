"""`lambdasplit bench paper-scale` on the tiny shape: the same code path as the 7B run, end to end through the
real CLI and a real body server process; and the synthetic checkpoint it writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lambdasplit.bench.paper_scale import GiB, default_split, estimate
from lambdasplit.models.formats import parse_format
from lambdasplit.models.llm import Split
from lambdasplit.models.synthetic import (
    LLAMA2_7B,
    TINY,
    checkpoint_folder,
    ensure_checkpoint,
    is_complete,
    random_tensor,
)

ROOT = Path(__file__).resolve().parents[1]


def cli(cache: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LAMBDASPLIT_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "lambdasplit", "bench", "paper-scale", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=env)


@pytest.mark.slow
def test_tiny_end_to_end_is_exact_and_reports_everything(tmp_path):
    out = tmp_path / "paper-scale.json"
    r = cli(tmp_path / "cache", "--config", "tiny", "--tokens", "6", "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "needs about" in r.stdout and "GiB of memory available" in r.stdout  # said before it starts
    assert "writing synthetic-llama" in r.stderr  # the progress bar
    data = json.loads(out.read_text())
    assert data["config"]["layers"] == TINY.layers and data["split"] == "1:3" and data["tokens"] == 6
    assert data["body_weights"] == "bf16" and data["device_weights"] == "int8" and data["threads"] == 1
    assert data["checkpoint"]["written_now"] is True and data["checkpoint"]["bytes"] == TINY.checkpoint_bytes
    assert {"date", "machine", "cores", "torch"} <= set(data["meta"])
    split, local = data["split_run"], data["local_run"]
    # exactness: the fp32 wire is lossless, so the split decodes exactly what the unsplit model does
    assert len(split["ids"]) == 6 and split["ids"] == local["ids"] and data["exact"] is True
    assert len(set(split["ids"])) > 1, "the tiny model repeats one token: a weak exactness check"
    for run in (split, local):
        assert run["tokens_per_s"] > 0 and run["prefill_s"] > 0
    assert split["client_rss_bytes"] > 0 and split["server_rss_bytes"] > 0 and local["rss_bytes"] > 0
    # one D-wide fp32 state each way per decode step, plus framing and headers
    assert 4 * TINY.hidden < split["up_bytes_per_token"] < 4 * TINY.hidden + 2000
    assert 4 * TINY.hidden < split["down_bytes_per_token"] < 4 * TINY.hidden + 2000
    assert split["up_bytes"] > data["prompt_tokens"] * 4 * TINY.hidden
    # the estimate made before starting is what each side then held (models/llm.py decides how it holds them)
    assert data["estimate"]["device_bytes"] == pytest.approx(split["device_parameter_bytes"], rel=0.05)
    assert data["estimate"]["body_bytes"] == pytest.approx(split["body_parameter_bytes"], rel=0.05)
    assert local["parameter_bytes"] == split["device_parameter_bytes"] + split["body_parameter_bytes"]
    share = split["device_parameter_bytes"] / (split["device_parameter_bytes"] + split["body_parameter_bytes"])
    assert split["device_share"] == pytest.approx(share)
    # the checkpoint stays, and is reused
    folder = checkpoint_folder(TINY, tmp_path / "cache")
    assert is_complete(folder, TINY) and ensure_checkpoint(TINY, tmp_path / "cache") == (folder, False)


def test_refuses_what_does_not_fit_before_it_starts(tmp_path):
    r = cli(tmp_path / "cache", "--layers", "4000", "--dry-run", timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "would need" in r.stderr and "GiB of memory" in r.stderr
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


def test_the_7b_estimate():
    """What the lead's run on a 24 GiB machine needs: the bf16 body (10.6 GiB) and the int8 head and tail
    (1.4 GiB) fit; an int8 body, loaded one layer at a time and quantized as it goes, fits in less."""
    split = Split.parse(default_split(32), 32)
    assert str(split) == "2:30" and LLAMA2_7B.parameters == 6_738_415_616
    need = estimate(LLAMA2_7B, split, parse_format("bf16"), parse_format("int8"), written=False)
    assert need.disk_bytes == LLAMA2_7B.checkpoint_bytes == 2 * 6_738_415_616
    assert need.body_bytes == 28 * 2 * (4 * 4096 ** 2 + 3 * 4096 * 11008 + 2 * 4096)
    assert 0.08 < need.device_bytes / (need.device_bytes + need.body_bytes) < 0.12  # about a tenth
    assert 13 * GiB < need.ram_bytes < 16 * GiB
    int8 = estimate(LLAMA2_7B, split, parse_format("int8"), parse_format("int8"), written=True)
    assert int8.body_bytes < 0.51 * need.body_bytes and int8.ram_bytes < need.ram_bytes


def test_random_weights_are_seeded_per_tensor():
    a = random_tensor("model.layers.0.mlp.up_proj.weight", (64, 32), seed=0)
    assert a.equal(random_tensor("model.layers.0.mlp.up_proj.weight", (64, 32), seed=0))
    assert not a.equal(random_tensor("model.layers.0.mlp.up_proj.weight", (64, 32), seed=1))
    assert not a.equal(random_tensor("model.layers.1.mlp.up_proj.weight", (64, 32), seed=0))
    assert 0.015 < a.float().std().item() < 0.025
    assert random_tensor("model.layers.0.input_layernorm.weight", (32,), seed=0).eq(1).all()


def test_an_incomplete_checkpoint_is_not_reused(tmp_path):
    folder, written = ensure_checkpoint(TINY, tmp_path, progress=False)
    assert written and is_complete(folder, TINY)
    shard = next(folder.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-1])
    assert not is_complete(folder, TINY)
    assert ensure_checkpoint(TINY, tmp_path, progress=False) == (folder, True)
    assert is_complete(folder, TINY) and not list(tmp_path.glob("models/.*.partial"))
