"""Devices and weight formats, on the CPU: selection, clear refusals, each format's fidelity bound, the
split's exactness within a format, GGUF caching at the compute format, and the body server's weights.

The bounds were measured on the embedded SmolLM2-135M (`lambdasplit bench decode`, docs/performance.md):
teacher-forced greedy agreement with fp32 over 256 tokens was bf16 97%, fp16 99.6%, int8 94%, int4 89%.
The tests hold each format to a bound below its measurement on a shorter text, so they fail when a format
breaks (a wrong scale or layout gives a few percent), not when a token flips.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import post_json
from safetensors import safe_open

from lambdasplit.client.generate import SplitClient
from lambdasplit.data import PAPER_PROMPT
from lambdasplit.models.device import DeviceError, available_devices, resolve_device
from lambdasplit.models.formats import (
    FORMATS,
    Int4Linear,
    Int8Linear,
    WeightFormatError,
    check_format,
    choose_format,
    default_format,
    parse_format,
    weight_bytes,
)
from lambdasplit.models.llm import load_split
from lambdasplit.models.source import resolve_model
from lambdasplit.server.process import ServerProcess
from lambdasplit.wire.protocol import SessionRequest

CPU = torch.device("cpu")


# ---- devices -----------------------------------------------------------------------------------

def test_auto_is_the_cpu_here():
    assert available_devices()[0] == "cpu"
    assert resolve_device("auto") == CPU and resolve_device(None) == CPU and resolve_device("CPU") == CPU


@pytest.mark.parametrize("spec, words", [("cuda", ["not available", "this machine has: cpu"]),
                                         ("cuda:3", ["not available", "cpu"]),
                                         ("mps", ["not available", "cpu"]),
                                         ("tpu", ["unknown device 'tpu'", "auto|cpu|cuda|cuda:N|mps"]),
                                         ("cpu:1", ["one CPU device"])])
def test_a_missing_device_is_refused_naming_those_there_are(spec, words):
    if spec in available_devices():
        pytest.skip(f"{spec} exists here")
    with pytest.raises(DeviceError) as err:
        resolve_device(spec)
    for word in words:
        assert word in str(err.value)


@pytest.mark.slow
def test_the_cli_refuses_a_missing_device_before_loading(tmp_path):
    from test_cli import cli, failed_clearly

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    failed_clearly(cli("serve", "--device", "cuda:1", timeout=60), "lambdasplit serve: error:", "not available", "cpu")
    failed_clearly(cli("generate", "hi", "--device", "cuda", "--max-new-tokens", "1", timeout=120),
                   "lambdasplit generate: error:", "not available", "cpu")


# ---- formats -----------------------------------------------------------------------------------

def test_format_names_and_aliases(monkeypatch):
    monkeypatch.delenv("LAMBDASPLIT_WEIGHTS")  # the suite pins fp32 (tests/conftest.py); here, the real defaults
    assert parse_format("bfloat16") is FORMATS["bf16"] and parse_format(torch.float16) is FORMATS["fp16"]
    assert parse_format("INT8").bits == 8 and parse_format("int4").group_size == 32
    with pytest.raises(WeightFormatError, match="unknown weight format 'int3'.*fp32, bf16, fp16, int8, int4"):
        parse_format("int3")
    assert default_format(CPU).name == "int4"  # the measured CPU default (docs/devices.md)
    assert default_format(CPU, need_float=True).name == "fp32"
    assert default_format(torch.device("cuda", 0)).name == "bf16"


def test_the_default_can_be_named_once_for_every_side(monkeypatch):
    monkeypatch.setenv("LAMBDASPLIT_WEIGHTS", "bf16")
    assert default_format(CPU).name == "bf16" and default_format(torch.device("cuda", 0)).name == "bf16"
    assert choose_format("int8", CPU).name == "int8"  # what is asked for wins
    monkeypatch.setenv("LAMBDASPLIT_WEIGHTS", "int8")
    assert default_format(CPU).name == "int8" and default_format(CPU, need_float=True).name == "fp32"
    monkeypatch.setenv("LAMBDASPLIT_WEIGHTS", "")
    assert default_format(CPU).name == "int4"
    monkeypatch.setenv("LAMBDASPLIT_WEIGHTS", "int5")
    with pytest.raises(WeightFormatError, match=r"\$LAMBDASPLIT_WEIGHTS: unknown weight format 'int5'"):
        default_format(CPU)


def test_int4_refuses_widths_its_groups_do_not_divide():
    check_format(FORMATS["int4"], CPU, [576, 1536])
    with pytest.raises(WeightFormatError, match="int4 groups 32 input columns.*\\[100\\].*int8 or bf16"):
        check_format(FORMATS["int4"], CPU, [576, 100])


@pytest.mark.parametrize("name, bound", [("int8", 0.01), ("int4", 0.12)])
def test_quantized_products_stay_close(name, bound):
    """y = x W^T through the format's kernel, against fp32, relative to |y|."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(576, 1536, bias=True)
    x = torch.randn(5, 576)
    q = (Int8Linear(layer) if name == "int8" else Int4Linear(layer, 32))
    with torch.inference_mode():
        want, got = layer(x), q(x)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert ((got - want).norm() / want.norm()).item() < bound
    ratio = q.weight_bytes / (layer.weight.numel() * 4)
    assert ratio < (0.26 if name == "int8" else 0.16), ratio


@pytest.fixture(scope="module")
def teacher(smol_dir):
    """fp32's greedy continuation of the paper's prompt: the text each format is forced along."""
    client = SplitClient(smol_dir, server=None, split=(1, 29), speculate="off", weights="fp32")
    ids = client.encode_prompt(PAPER_PROMPT)
    return ids, list(client.generate_ids(ids, max_new_tokens=48, stop_at_eos=False))


@pytest.mark.parametrize("name, bound", [("fp32", 1.0), ("bf16", 0.9), ("fp16", 0.95), ("int8", 0.85),
                                         ("int4", 0.75)])
def test_each_format_agrees_with_fp32_within_its_bound(smol_dir, teacher, name, bound):
    ids, out = teacher
    model = load_split(smol_dir, 0, 30, parts=("head", "body", "tail"), weights=name)
    with torch.inference_mode():
        cache = model.head.layers.new_cache()
        x = torch.tensor([ids + out])
        logits = model.tail(model.body(model.head(x, cache, 0), cache, 0), cache, 0, last_only=False)[0]
    chosen = logits[len(ids) - 1:-1].argmax(-1).tolist()
    agreement = sum(a == b for a, b in zip(chosen, out)) / len(out)
    assert agreement >= bound, f"{name}: {agreement:.1%} of fp32's greedy tokens"
    report = model.parameter_report()["total"]
    fp32_bytes = 134_515_008 * 4
    assert report["bytes"] <= fp32_bytes * {"fp32": 1, "bf16": 0.5, "fp16": 0.5, "int8": 0.4, "int4": 0.3}[name]
    assert model.weight_bytes_per_token() == weight_bytes(model.head.layers) + weight_bytes(model.body.layers) + \
        weight_bytes(model.tail.layers) + weight_bytes(model.tail.norm) + weight_bytes(model.tail.lm_head)


def test_a_quantized_device_refuses_adapters(smol_dir, tmp_path):
    with pytest.raises(ValueError, match="adapters need float weights"):
        SplitClient(smol_dir, server=None, split=(1, 29), weights="int8", adapter=tmp_path)


# ---- GGUF at the compute format ---------------------------------------------------------------

def test_gguf_is_cached_at_the_compute_format_and_fingerprints_alike(smol_dir):
    bf16 = resolve_model(None, storage="bfloat16")
    assert bf16 != smol_dir and bf16.name.endswith("-bfloat16")
    with safe_open(str(bf16 / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    size = lambda folder: sum(p.stat().st_size for p in folder.glob("*.safetensors"))  # noqa: E731
    assert size(bf16) < 0.51 * size(smol_dir)
    assert json.loads((bf16 / "lambdasplit.json").read_text())["storage"] == "bfloat16"
    a = load_split(smol_dir, 1, 29, parts=("head",), weights="fp32")
    b = load_split(bf16, 1, 29, parts=("head",), weights="bf16")
    assert a.body_fingerprint() == b.body_fingerprint()  # one model, whichever dtype each side keeps


# ---- a body server in a quantized format ------------------------------------------------------

@pytest.fixture(scope="module")
def int8_server(smol_dir):
    with ServerProcess("smollm2", "1:29", "--weights", "int8", "--device", "cpu") as server:
        yield server


def test_the_split_is_exact_within_a_format(int8_server):
    """int8 on both sides with an fp32 wire gives exactly the unsplit int8 model's tokens."""
    local = SplitClient("smollm2", server=None, split=(1, 29), speculate="off", weights="int8")
    split = SplitClient("smollm2", server=int8_server.url, split=(1, 29), wire="fp32", speculate="off",
                        weights="int8", body_weights="int8")
    ids = local.encode_prompt(PAPER_PROMPT)
    want = list(local.generate_ids(ids, max_new_tokens=24, stop_at_eos=False))
    assert list(split.generate_ids(ids, max_new_tokens=24, stop_at_eos=False)) == want


def test_the_server_names_its_weights_and_refuses_other_expectations(int8_server):
    info = json.loads(__import__("urllib.request").request.urlopen(int8_server.url + "/v1/info").read())
    assert info["weights"] == "int8" and info["device"] == "cpu" and info["dtype"] == "float32"
    client = SplitClient("smollm2", server=int8_server.url, split=(1, 29), wire="fp32", speculate="off",
                         weights="fp32", body_weights="bf16")
    with pytest.raises(Exception, match="weights mismatch.*int8.*expects bf16"):
        list(client.generate_ids([1, 2, 3], max_new_tokens=2))
    fingerprint = client.model.body_fingerprint()
    for field in ("train", "private_lora"):
        value = True if field == "train" else {"rank": 4, "targets": ["q_proj"], "seed": 1}
        body = {**SessionRequest(model_fingerprint=fingerprint, x=1, y=29, cache=field != "train").model_dump(),
                field: value}
        status, answer = post_json(int8_server.url, "/v1/sessions", body)
        assert status == 409, answer
        assert answer["error"] == "mismatch" and "need float weights" in answer["message"], answer


@pytest.mark.parametrize("content", [b"GGUF" + b"x" * 60, "truncated"])
def test_a_gguf_file_transformers_cannot_read_is_refused_clearly(tmp_path, monkeypatch, content):
    from lambdasplit.models.source import ModelSourceError, _embedded_gguf

    monkeypatch.setenv("LAMBDASPLIT_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content if isinstance(content, bytes) else _embedded_gguf("smollm2").read_bytes()[:300_000])
    with pytest.raises(ModelSourceError, match="transformers cannot read bad.gguf.*safetensors folder"):
        resolve_model(bad, quiet=True)
    assert not list((tmp_path / "cache" / "models").glob("bad-*"))  # nothing half-written is left as a model


@pytest.mark.slow
def test_generate_reports_each_sides_weights(int8_server):
    """Each side its own format: an int4 device over an int8 body, and --stats names both."""
    from test_cli import cli

    r = cli("generate", "Hi", "--server", int8_server.url, "--weights", "int4", "--max-new-tokens", "3", "--stats",
            "--ignore-eos", timeout=180)
    assert r.returncode == 0, r.stderr
    assert "weights: head and tail int4, body int8" in r.stderr
    r = cli("generate", "Hi", "--server", int8_server.url, "--body-weights", "bf16", "--max-new-tokens", "2",
            timeout=180)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "weights mismatch" in r.stderr, r.stderr
