"""The embedded digits model end to end over loopback: `serve --model digits`, `imagine`, `demo --image` and
`bench fig5`, with an independent classifier judging the pictures."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_cli import cli

from lambdasplit.digits.classify import label_images
from lambdasplit.server.process import ServerProcess


@pytest.fixture(scope="module")
def digits_server():
    with ServerProcess("digits", "0:0") as server:
        yield server


def test_imagine_draws_the_prompted_digit(digits_server, tmp_path):
    out = tmp_path / "seven.png"
    r = cli("imagine", "a handwritten digit 7", "--server", digits_server.url, "--codec", "int8", "--batch", "4",
            "--steps", "20", "--every", "5", "--noise-step", "0", "--noise-step", "-1", "-o", str(out), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    images = [Image.open(tmp_path / f"seven-{i}.png") for i in range(4)]
    assert all(i.size == (32, 32) for i in images)
    labels = label_images(images)
    assert sum(int(label) == 7 for label in labels) >= 3, labels  # the model reads right ~9 times in 10
    frames = sorted((tmp_path / "seven-steps").glob("step*.png"))
    assert [f.name for f in frames] == ["step0005.png", "step0010.png", "step0015.png", "step0020.png"]
    noise = Image.open(tmp_path / "seven-noise-step19.png")
    assert noise.mode == "RGBA" and (tmp_path / "seven-noise-step0.png").is_file()
    assert "int8 noise" in r.stderr and "B per step" in r.stderr


@pytest.mark.slow
def test_imagine_refuses_bad_options_clearly(digits_server, tmp_path):
    r = cli("imagine", "a handwritten digit 1", "--server", digits_server.url, "--codec", "int9", "-o",
            str(tmp_path / "x.png"))
    assert r.returncode == 2 and "int9" in r.stderr
    r = cli("imagine", "a handwritten digit 1", "--server", digits_server.url, "--steps", "4", "--noise-step", "9",
            "-o", str(tmp_path / "x.png"))
    assert r.returncode == 2 and "--noise-step 9" in r.stderr


@pytest.mark.slow
def test_demo_image_runs_end_to_end(tmp_path):
    out = tmp_path / "demo.png"
    r = cli("demo", "--image", "--steps", "10", "-o", str(out), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "a handwritten digit 7" in r.stdout and "holds" in r.stdout and "unet" in r.stdout
    assert Image.open(out).size == (32, 32)


@pytest.mark.slow
def test_bench_fig5_writes_its_table_and_pictures(digits_server, tmp_path):
    r = cli("bench", "fig5", "--server", digits_server.url, "--prompt", "a handwritten digit 3", "--prompt",
            "a handwritten digit 8", "--seeds", "1", "--steps", "10", "--noise-step", "5", "--codecs", "fp16,int8,int2",
            "--out", str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {row["codec"]: row for row in json.loads((tmp_path / "fig5.json").read_text())["rows"]}
    assert list(rows) == ["fp32", "fp16", "int8", "int2"]
    assert rows["fp32"]["psnr_db"] == float("inf") or rows["fp32"]["psnr_db"] > 1e6
    assert rows["fp16"]["psnr_db"] > rows["int8"]["psnr_db"] > rows["int2"]["psnr_db"]
    assert rows["int8"]["payload_per_step"] < rows["fp32"]["payload_per_step"] / 3
    assert rows["fp16"]["accuracy"] is not None
    grid = Image.open(tmp_path / "fig5-grid.png")
    assert grid.size[1] == 4 * 64 and np.asarray(grid).std() > 10
    assert Image.open(tmp_path / "fig5-noise-int8.png").mode == "RGBA"
    assert "| int8 |" in (tmp_path / "fig5.md").read_text()
