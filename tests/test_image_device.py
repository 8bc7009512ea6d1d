"""Where the text-to-image parts compute, and in which format: the U-Net on the server's --device in fp32, bf16 or
fp16 (fp16 by default on CUDA, fp32 elsewhere; int8 / int4 refused), the text encoders and the VAE on the
device's --device. Everything here runs on the CPU: `auto` means the CPU, and `cuda` is refused clearly.

The embedded digits model is served by real `lambdasplit serve` processes on loopback in fp32, bf16 and fp16;
the bf16 and fp16 images are compared with the fp32 one, pixel by pixel."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from test_cli import cli, failed_clearly

from lambdasplit.cli import main
from lambdasplit.client.images import ImageClient, ImageConnection
from lambdasplit.models.device import DeviceError, resolve_device
from lambdasplit.models.diffusion import ImageOptions, PipelineFacts, body_format
from lambdasplit.models.formats import WeightFormatError
from lambdasplit.models.source import resolve_image_model
from lambdasplit.server.image_sessions import ImageRuntime
from lambdasplit.server.process import ServerProcess

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a CUDA device that is not there")
PROMPT = "a handwritten digit 4"
OPTIONS = ImageOptions(steps=8, guidance=5.0, seed=4)
# Mean absolute difference from the fp32 image, in 0..255 pixel levels. Measured on this CPU over the ten digits,
# seeds 0..9, batch 2, 25 steps: bf16 0.41..1.70 (mean 0.96), fp16 0.04..0.21 (mean 0.10).
BOUND = {"bf16": 3.0, "fp16": 0.5}


@pytest.fixture(scope="module")
def digits_servers():
    """The digits U-Net served in each float format, on the CPU (the three start side by side)."""
    formats = ("fp32", "bf16", "fp16")
    with ThreadPoolExecutor(len(formats)) as pool:
        starting = {w: pool.submit(ServerProcess, "digits", "0:0", "--device", "cpu", "--weights", w) for w in formats}
    try:
        yield {w: future.result() for w, future in starting.items()}
    finally:
        for future in starting.values():
            if future.exception() is None:
                future.result().stop()


@pytest.fixture(scope="module")
def images(digits_servers):
    """One batch of two images through each server, the wire lossless both ways (only the U-Net's format differs)."""
    client = ImageClient("digits", server=digits_servers["fp32"].url, up="fp32", down="fp32", device="cpu")
    out = {}
    for weights, server in digits_servers.items():
        client.server = server.url
        result = client.generate(PROMPT, OPTIONS, batch=2)  # the mirror check passes: the ends did not drift
        assert result.body_weights == weights
        out[weights] = client.tail.decode(result.latent, output_type="np") * 255
    return out


def test_auto_is_the_cpu_here_and_each_device_has_its_default_format():
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert resolve_device("auto") == torch.device("cpu")
    assert body_format(None, torch.device("cpu")).name == "fp32"
    assert body_format(None, torch.device("cuda", 0)).name == "fp16"
    assert body_format(None, torch.device("mps")).name == "fp32"
    assert body_format("float32", torch.device("cpu")).name == "fp32"  # the older dtype names still work
    assert body_format(torch.bfloat16, torch.device("cpu")).name == "bf16"


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_a_quantized_unet_is_refused_naming_the_float_formats(weights, monkeypatch):
    monkeypatch.setattr("lambdasplit.server.image_sessions.ImageBody", _must_not_load)
    with pytest.raises(WeightFormatError, match=f"{weights} weights .* fp32, bf16 or fp16"):
        ImageRuntime(PipelineFacts.read(resolve_image_model("digits")), weights, "cpu")


def test_a_float_format_the_device_cannot_run_is_refused_before_loading(monkeypatch):
    """fp16 runs on this CPU (torch 2.13, if slowly); where it does not, the startup probe refuses it and names
    the formats that do run."""
    conv2d = torch.nn.functional.conv2d

    def no_half(x, *args, **kw):
        if x.dtype == torch.float16:
            raise RuntimeError('"slow_conv2d_cpu" not implemented for \'Half\'')
        return conv2d(x, *args, **kw)

    monkeypatch.setattr(torch.nn.functional, "conv2d", no_half)
    monkeypatch.setattr("lambdasplit.server.image_sessions.ImageBody", _must_not_load)
    with pytest.raises(WeightFormatError, match=r"U-Net cannot run in fp16 on cpu .*Half.*; use fp32 or bf16$"):
        ImageRuntime(PipelineFacts.read(resolve_image_model("digits")), "fp16", "cpu")


@no_gpu
def test_a_missing_device_is_refused_before_anything_loads(monkeypatch):
    monkeypatch.setattr("lambdasplit.client.images.ImageHead", _must_not_load)
    with pytest.raises(DeviceError, match="this machine has: cpu"):
        ImageClient("digits", server="http://127.0.0.1:9", device="cuda")
    monkeypatch.setattr("lambdasplit.server.image_sessions.ImageBody", _must_not_load)
    with pytest.raises(DeviceError, match="'cuda:1' is not available"):
        ImageRuntime(PipelineFacts.read(resolve_image_model("digits")), None, "cuda:1")


@no_gpu
def test_the_cli_refuses_a_missing_device_clearly(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["imagine", PROMPT, "--server", "http://127.0.0.1:9", "--device", "cuda", "-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err
    assert err.startswith("lambdasplit imagine: error: device 'cuda' is not available") and "this machine has: cpu" in err


def test_the_server_says_where_and_how_it_runs_the_unet(digits_servers):
    for weights, server in digits_servers.items():
        with ImageConnection(server.url) as conn:
            info = conn.image_info()
        assert (info.weights, info.device, info.holds) == (weights, "cpu", ["unet"])
        assert f"{weights} on cpu" in "\n".join(server.log)  # the ready line


@pytest.mark.parametrize("weights", ["bf16", "fp16"])
def test_a_half_precision_unet_draws_nearly_the_fp32_image(images, weights):
    diff = np.abs(images[weights] - images["fp32"])
    assert images[weights].shape == (2, 32, 32, 3)
    assert 0 < diff.mean() < BOUND[weights], diff.mean()
    assert diff.max() < 16 * BOUND[weights], diff.max()


def test_imagine_reports_the_format_of_the_servers_unet(digits_servers, tmp_path, capsys):
    out = tmp_path / "four.png"
    main(["imagine", PROMPT, "--server", digits_servers["bf16"].url, "--device", "cpu", "--steps", "4", "--quiet",
          "-o", str(out)])
    assert "U-Net on the server, bf16" in capsys.readouterr().err and out.is_file()


@pytest.mark.slow
def test_serve_refuses_int8_for_a_unet_clearly():
    r = cli("serve", "--model", "digits", "--port", "0", "--weights", "int8")
    failed_clearly(r, "lambdasplit serve: error:", "int8 weights", "fp32, bf16 or fp16")


@pytest.mark.slow
def test_demo_image_passes_device_and_weights_to_its_server(tmp_path):
    r = cli("demo", "--image", "--device", "cpu", "--weights", "bf16", "--steps", "4", "-o", str(tmp_path / "d.png"),
            timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "bf16 on cpu" in r.stdout and "U-Net on the server, bf16" in r.stdout


def _must_not_load(*args, **kwargs):
    raise AssertionError("weights loaded before the device and format were checked")
