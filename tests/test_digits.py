"""The embedded text-to-image model (lambdasplit/data/digits): its tokenizer, its folder as diffusers and
transformers load it offline, the training script end to end (--quick), and the judge of its pictures."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from lambdasplit.digits import DEFAULT_MODEL, classify, data, model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


def _tokenizer(folder=DEFAULT_MODEL):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), subfolder="tokenizer", local_files_only=True)


def test_tokenizer_reads_whole_words():
    tok = _tokenizer()
    vocab = tok.get_vocab()
    assert type(tok).__name__ == "CLIPTokenizer" and tok.model_max_length == model.MAX_LENGTH
    ids = tok("a handwritten digit 7")["input_ids"]
    assert ids == [vocab[model.BOS], vocab["a</w>"], vocab["handwritten</w>"], vocab["digit</w>"], vocab["7</w>"],
                   vocab[model.EOS]]
    for word in data.VOCABULARY:  # every known word is its own single token, whatever the case
        assert tok(word.upper(), add_special_tokens=False)["input_ids"] == [vocab[word + "</w>"]]
    assert tok("a handwritten seven")["input_ids"][3] == vocab["seven</w>"]
    unk = tok.convert_tokens_to_ids(tok.unk_token)
    assert tok.unk_token == model.EOS
    assert set(tok("qqq", add_special_tokens=False)["input_ids"]) == {unk}  # unknown characters are unk
    padded = tok("", padding="max_length", max_length=tok.model_max_length)["input_ids"]
    assert padded == [vocab[model.BOS]] + [vocab[model.EOS]] * (model.MAX_LENGTH - 1)


def test_unknown_word_pieces_read_as_unk():
    from transformers import CLIPTextModel

    tok = _tokenizer()
    encoder = CLIPTextModel.from_pretrained(str(DEFAULT_MODEL), subfolder="text_encoder", local_files_only=True)
    table = encoder.get_input_embeddings().weight
    unk = tok.convert_tokens_to_ids(tok.unk_token)
    pieces = model.piece_ids(tok)
    assert pieces and torch.equal(table[pieces], table[unk].expand(len(pieces), -1))
    assert not torch.equal(table[tok.get_vocab()["seven</w>"]], table[unk])


def _check_folder(folder, *, trained: bool):
    """Loads component by component and as a StableDiffusionPipeline, offline; returns the pipeline."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["requires_safety_checker"] is False
    assert index["safety_checker"] == [None, None]
    unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae", local_files_only=True)
    encoder = CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder", local_files_only=True)
    tok = _tokenizer(folder)
    scheduler = DDIMScheduler.from_config(DDIMScheduler.load_config(str(folder), subfolder="scheduler"))
    assert unet.config.sample_size == 8 and unet.config.in_channels == unet.config.out_channels == 4
    assert unet.config.cross_attention_dim == encoder.config.hidden_size
    assert vae.config.latent_channels == 4 and vae.config.in_channels == 3
    assert vae.config.scaling_factor != 1.0 and 0.05 < vae.config.scaling_factor < 50
    assert scheduler.config.prediction_type == "epsilon"
    assert encoder.config.vocab_size == len(tok) and encoder.config.max_position_embeddings == tok.model_max_length
    for part in (unet, vae, encoder):
        assert all(p.dtype == torch.float32 for p in part.parameters())
    weights = sum(f.stat().st_size for f in folder.rglob("*.safetensors"))
    assert weights <= 8_000_000, weights

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    assert pipe.safety_checker is None and isinstance(pipe.scheduler, DDIMScheduler)
    assert all(p.dtype == torch.float32 for p in pipe.unet.parameters())
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["a handwritten digit 3", "a handwritten seven"], num_inference_steps=3, guidance_scale=4.0,
               generator=[torch.Generator().manual_seed(i) for i in range(2)], output_type="np")
    images = np.asarray(out.images)
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
    if trained:  # paper and ink: not a flat picture
        assert images.min() < 0.3 and images.max() > 0.7
    return pipe


def test_shipped_folder_loads_offline():
    _check_folder(DEFAULT_MODEL, trained=True)
    report = json.loads((DEFAULT_MODEL / "training.json").read_text())
    assert report["quick"] is False and report["seed"] == 0


@pytest.mark.slow
def test_train_quick_writes_a_loadable_folder(tmp_path):
    out = tmp_path / "digits"
    run = subprocess.run([sys.executable, "-m", "lambdasplit.digits.train", "--quick", "--quiet", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "wrote" in run.stdout
    _check_folder(out, trained=False)
    assert json.loads((out / "training.json").read_text())["quick"] is True
    assert [p.name for p in tmp_path.iterdir()] == ["digits"]  # the build folder was renamed, nothing left over


def test_train_help():
    run = subprocess.run([sys.executable, "-m", "lambdasplit.digits.train", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0 and "--unet-steps" in run.stdout and "--quick" in run.stdout


def test_judge_reads_real_digits_through_the_32x32_path():
    from PIL import Image

    _, held = data.split(0)
    pictures = (held.images + 1) / 2  # the same 32×32 pictures the model is trained on, in [0, 1]
    assert pictures.shape[1:] == (3, 32, 32)
    assert np.mean(classify.label_images(pictures) == held.labels) >= 0.9
    as_pil = [Image.fromarray((p.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for p in pictures[:40]]
    assert np.mean(classify.label_images(as_pil) == held.labels[:40]) >= 0.9
    assert np.array_equal(classify.label_images(as_pil), classify.label_images(pictures[:40].permute(0, 2, 3, 1)))
