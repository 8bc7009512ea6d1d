"""`lambdasplit export-web`: the head and tail as ONNX steps with explicit KV caches, run by ONNX Runtime and
compared with the PyTorch parts step by step (a prompt, then one token a step through the caches)."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import cli, failed_clearly
from test_families import build

from lambdasplit.browser.check import check_export
from lambdasplit.browser.export import export_web

IDS = torch.randint(3, 128, (40,), generator=torch.Generator().manual_seed(5)).tolist()


@pytest.mark.parametrize("name", ["llama", "gemma", "gpt2", "phi"])
def test_exported_parts_match_pytorch_through_their_caches(name, tmp_path):
    """Families with learned positions (GPT-2), scaled embeddings (Gemma) and partial rotary with a biased LM
    head (Phi-2) export too: the fp32 files give PyTorch's states to rounding and its greedy tokens exactly."""
    build(tmp_path / "model", name)
    manifest = export_web(tmp_path / "model", 1, 3, tmp_path / "web", int8=(name == "llama"), log=lambda _: None)
    assert manifest["split"] == [1, 3] and manifest["parts"]["head"]["layers"] == [0, 1]
    assert manifest["parts"]["tail"]["inputs"][0] == "hidden" and "mask" in manifest["parts"]["tail"]["inputs"]
    assert manifest["parts"]["tail"]["outputs"] == ["logits", "present.3.key", "present.3.value"]
    # a tied table (Gemma, GPT-2) is kept once, outside both fp32 files, which the check below then reads
    assert ("shared" in manifest) == (name in ("gemma", "gpt2"))
    if "shared" in manifest:
        assert (tmp_path / "web" / "embed.bin").stat().st_size == manifest["shared"]["bytes"]
        assert manifest["parts"]["head"]["external"] == manifest["parts"]["tail"]["external"] == ["embed.bin"]
    report = check_export(tmp_path / "model", tmp_path / "web", IDS, prompt_rows=8, int8=True)
    fp32 = report["fp32"]
    assert fp32["greedy_agreement"] == 1.0 and fp32["tokens"] == len(IDS) and fp32["steps"] == 1 + len(IDS) - 8
    assert fp32["head_state_max_rel"] < 1e-5 and fp32["tail_logits_max_abs"] < 1e-3
    if name == "llama":  # int8 weights: fewer bytes (a quarter on a real model), and a measured agreement
        part = manifest["parts"]["head"]
        assert part["int8_bytes"] < part["bytes"] * 0.6 and 0 < report["int8"]["greedy_agreement"] <= 1


@pytest.mark.parametrize("name, why", [("gemma3_text", "sliding_attention layers"), ("bloom", "ALiBi"),
                                       ("mixtral", "aten::histc")])
def test_what_the_export_cannot_reproduce_is_refused(tmp_path, name, why):
    build(tmp_path / "model", name, **({"sliding_window": None} if name == "mixtral" else {}))
    with pytest.raises(ValueError, match=why):
        export_web(tmp_path / "model", 1, 3, tmp_path / "web", int8=False, log=lambda _: None)
    assert not (tmp_path / "web" / "manifest.json").exists()


@pytest.mark.slow
def test_export_web_on_the_embedded_model(tmp_path):
    out = tmp_path / "web"
    r = cli("export-web", "--split", "1:29", "-o", str(out), "--check-tokens", "32", timeout=600)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == "SmolLM2-135M-Instruct" and manifest["num_layers"] == 30
    assert len(manifest["body_fingerprint"]) == 64
    assert manifest["check"]["fp32"]["greedy_agreement"] == 1.0
    for name in ("head.onnx", "tail.onnx", "head.int8.onnx", "tail.int8.onnx", "tokenizer.json"):
        assert (out / name).stat().st_size > 0, name
    table = 49152 * 576 * 4  # SmolLM2's tied embedding table: once, not in each fp32 part
    assert manifest["shared"] == {"file": "embed.bin", "bytes": table, "shape": [49152, 576]}
    assert (out / "embed.bin").stat().st_size == table and (out / "tail.onnx").stat().st_size < table / 4
    assert "fp32: greedy agreement with PyTorch 100.0% over 32 held-out tokens" in r.stdout
    failed_clearly(cli("export-web", "--check-tokens", "-1", "-o", str(out)), "--check-tokens")


@pytest.mark.slow
def test_export_web_serves_its_page_with_the_isolation_headers(tmp_path, smol_dir):
    """`export-web --serve`: the folder (parts, page, runtimes) on loopback, with the headers WASM threads need."""
    import subprocess
    import sys
    import urllib.request

    from test_families import with_tokenizer

    build(tmp_path / "model", "llama", vocab_size=49152)
    with_tokenizer(tmp_path / "model", smol_dir)
    proc = subprocess.Popen([sys.executable, "-m", "lambdasplit", "export-web", "--model", str(tmp_path / "model"),
                             "--split", "1:3", "-o", str(tmp_path / "web"), "--no-int8", "--check-tokens", "0",
                             "--server", "http://127.0.0.1:8470", "--backend", "wasm", "--serve", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("serving the page on "):
                url = line.split()[4]
                break
        else:
            pytest.fail(f"export-web --serve ended: {proc.wait()}")
        with urllib.request.urlopen(url) as page:
            assert page.headers["Cross-Origin-Opener-Policy"] == "same-origin"
            assert page.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
            assert b"device.js" in page.read()
        with urllib.request.urlopen(url + "ort-wasm-simd-threaded.wasm") as wasm:
            assert wasm.headers["Content-Type"] == "application/wasm" and wasm.read(4) == b"\0asm"
        with urllib.request.urlopen(url + "config.json") as config:
            assert json.load(config) == {"server": "http://127.0.0.1:8470", "int8": False, "backend": "wasm"}
    finally:
        proc.terminate()
        proc.wait(30)
