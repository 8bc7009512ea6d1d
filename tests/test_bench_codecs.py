"""`lambdasplit fit-basis` and `lambdasplit bench codecs`, run as real subprocesses on the embedded
model (small settings: the full bench is for docs/wire.md, not for CI)."""

from __future__ import annotations

import csv
import json

import pytest
from test_cli import cli, failed_clearly

from lambdasplit.wire.lowrank import Basis


@pytest.fixture(scope="module")
def basis_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("basis") / "smol-2-28.safetensors"
    r = cli("fit-basis", "--split", "2:28", "--rank", "48", "-o", str(path), timeout=400)
    assert r.returncode == 0, r.stderr
    assert "sha256" in r.stdout and str(path) in r.stdout
    return path


@pytest.mark.slow
def test_fit_basis_writes_a_loadable_basis(basis_file):
    basis = Basis.load(basis_file)
    assert basis.points == [2, 28] and basis.hidden_size == 576 and basis.max_rank == 48
    assert basis.model == "SmolLM2-135M-Instruct"
    for p in basis.points:
        # orthonormal directions, sorted by the variance they keep
        comps = basis.components[p]
        gram = comps.T @ comps
        assert (gram - __import__("torch").eye(48)).abs().max() < 1e-4
        var = basis.variances[p]
        assert bool((var[:-1] >= var[1:]).all())
        assert 0.3 < basis.explained(p, 48) <= 1.0


@pytest.mark.slow
def test_bench_codecs_small_run(basis_file, tmp_path):
    out = tmp_path / "bench"
    r = cli("bench", "codecs", "--split", "2:28", "--codecs", "fp32,int8,had+int3,pca:32", "--pairs", "int8,had+int3", "--tokens", "6",
            "--prompts", "1", "--ppl-tokens", "96", "--basis", str(basis_file), "--out", str(out), timeout=500)
    assert r.returncode == 0, r.stderr
    for name in ("codecs.md", "codecs.csv", "codecs.json", "codecs.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "codecs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {(row["codec"], row["direction"]): row for row in csv.DictReader(open(out / "codecs.csv"))}
    assert set(rows) == {(c, d) for c in ("fp32", "int8", "had+int3", "pca:32+fp16") for d in ("up", "down")} | {
        ("int8,had+int3", "both")}
    both = rows[("int8,had+int3", "both")]  # int8 up and had+int3 down in one run: the bytes add up
    assert float(both["payload_bytes"]) == (576 + 8) + (576 * 3 / 8 + 8)
    assert float(both["frame_bytes"]) == float(rows[("int8", "up")]["frame_bytes"]) + float(
        rows[("had+int3", "down")]["frame_bytes"])
    for d in ("up", "down"):
        fp32, int8, int3, pca = (rows[(c, d)] for c in ("fp32", "int8", "had+int3", "pca:32+fp16"))
        # the lossless wire agrees with itself and changes nothing
        assert float(fp32["agree_free"]) == 1.0 and float(fp32["rel_error"]) == 0.0
        assert abs(float(fp32["ppl"]) - float(fp32["ppl_fp32"])) < 1e-3
        # bytes really shrink with the bits: 576 values of 4, 1, 3/8 bytes, 32 coefficients of 2 bytes
        b = {k: float(v["payload_bytes"]) for k, v in (("fp32", fp32), ("int8", int8), ("int3", int3), ("pca", pca))}
        assert b["fp32"] == 576 * 4 and b["int8"] == 576 + 8 and b["int3"] == 576 * 3 / 8 + 8 and b["pca"] == 64
        assert 0 < float(int8["rel_error"]) < float(int3["rel_error"])
        assert float(int8["us_model"]) > 0 and float(int8["us_4096"]) > 0
    meta = json.loads((out / "codecs.json").read_text())["meta"]
    assert meta["split"] == "2:28" and meta["tokens"] == 6
    assert "| `int8` | up |" in (out / "codecs.md").read_text()


def test_bench_codecs_rejects_unknown_codec(tmp_path):
    r = cli("bench", "codecs", "--codecs", "fp32,int7", "--out", str(tmp_path), timeout=120)
    failed_clearly(r, "int7")


@pytest.mark.slow
def test_fit_basis_rejects_bad_arguments(tmp_path):
    failed_clearly(cli("fit-basis", "--rank", "0", "-o", str(tmp_path / "b.st"), timeout=120), "rank")
    failed_clearly(cli("fit-basis", "--points", "3,99", "-o", str(tmp_path / "b.st"), timeout=120), "99")
    failed_clearly(cli("fit-basis", "--points", "a,b", "-o", str(tmp_path / "b.st"), timeout=120), "--points")
