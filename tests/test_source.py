"""Where weights come from: the embedded GGUF, its safetensors cache, folders, .gguf paths, Hub ids."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors import safe_open

from lambdasplit.models import source
from lambdasplit.models.source import ModelSourceError, model_name, resolve_model


def test_embedded_model_is_cached_as_plain_safetensors(smol_dir):
    config = json.loads((smol_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert "quantization_config" not in config  # the cache holds plain float32 weights
    assert (smol_dir / "model.safetensors").is_file() and (smol_dir / "tokenizer.json").is_file()
    assert model_name(smol_dir) == "SmolLM2-135M-Instruct"
    with safe_open(str(smol_dir / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"


def test_second_resolve_reuses_the_cache(smol_dir):
    before = (smol_dir / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(None) == smol_dir == resolve_model("smollm2") == resolve_model("default")
    assert (smol_dir / "model.safetensors").stat().st_mtime_ns == before


def test_gguf_path_resolves_to_the_same_cache(smol_dir):
    gguf = source._embedded_gguf("smollm2")
    assert gguf.suffix == ".gguf" and gguf.is_file()
    assert resolve_model(str(gguf)) == smol_dir


@pytest.mark.slow
def test_conversion_from_gguf_into_a_fresh_cache(tmp_path, smol_dir):
    """The one-time GGUF -> safetensors conversion, run for real into an empty cache folder."""
    code = ("from lambdasplit.models.source import resolve_model; print(resolve_model(None, quiet=True))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LAMBDASPLIT_CACHE": str(tmp_path)},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    folder = tmp_path / "models" / out.stdout.strip().rsplit("/", 1)[-1]
    assert folder.is_dir() and not list((tmp_path / "models").glob(".convert-*"))  # no staging left behind
    with safe_open(str(folder / "model.safetensors"), "pt") as new, \
            safe_open(str(smol_dir / "model.safetensors"), "pt") as old:
        assert set(new.keys()) == set(old.keys())
        for key in ("model.layers.7.mlp.down_proj.weight", "model.norm.weight"):
            assert new.get_tensor(key).equal(old.get_tensor(key))


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelSourceError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "nope.gguf"))


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_folder_with_pickled_weights_only_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ModelSourceError, match="safetensors"):
        resolve_model(str(tmp_path))


def test_unreachable_hub_id_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="'nobody/no-such-model' is not a local path .* could not be fetched"):
        resolve_model("nobody/no-such-model")


@pytest.mark.parametrize("spec", ["a/b/c", "./missing-folder", "plainword"])
def test_nonsense_specs(spec):
    with pytest.raises(ModelSourceError, match="is not a folder"):
        resolve_model(spec)
