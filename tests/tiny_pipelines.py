"""Tiny randomly initialised Stable Diffusion and SDXL pipelines, built from configs (as diffusers' own tests
build theirs), saved as ordinary pipeline folders: the split must reproduce them exactly."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "house", "tree", "7", "handwritten", "digit"]


def tiny_tokenizer(max_length: int = 16):
    """A real CLIPTokenizer (BPE) whose small vocabulary merges each of WORDS from its characters."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges: list[tuple[str, str]] = []
    for c in sorted(set("".join(WORDS)) | set("abcdefghijklmnopqrstuvwxyz0123456789")):
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    for word in WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            merges.append((symbols[0], symbols[1]))
            symbols = [symbols[0] + symbols[1]] + symbols[2:]
            vocab.setdefault(symbols[0], len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), model_max_length=max_length)


def _text_config(tokenizer, hidden: int, projection: int = 0):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden, intermediate_size=37,
                          layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer),
                          max_position_embeddings=tokenizer.model_max_length, hidden_act="gelu",
                          projection_dim=projection or hidden)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[16, 32], in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         norm_num_groups=8, sample_size=32)


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def build_sd(folder: Path, seed: int = 0) -> Path:
    """A Stable Diffusion 1.x-shaped pipeline: one CLIP text encoder, 32x32 images, 4x16x16 latents."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=8)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=CLIPTextModel(_text_config(tokenizer, 32)),
                                   tokenizer=tokenizer, unet=unet, scheduler=_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return Path(folder)


def build_sdxl(folder: Path, seed: int = 0) -> Path:
    """An SDXL-shaped pipeline: two text encoders (hidden states concatenated), pooled embeddings from the
    second, and added time ids."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                                projection_class_embeddings_input_dim=6 * 8 + 16, cross_attention_dim=64,
                                norm_num_groups=8)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_text_config(tokenizer, 32)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer, 32, projection=16)),
        tokenizer=tokenizer, tokenizer_2=tiny_tokenizer(), unet=unet, scheduler=_scheduler(),
        add_watermarker=False)
    pipe.save_pretrained(folder)
    return Path(folder)


def unsplit_image(folder: Path, prompt: str, *, steps: int, guidance: float, seed: int, scheduler: str = "default"):
    """The image diffusers itself makes from the whole pipeline, as (B, H, W, 3) floats."""
    import diffusers

    from lambdasplit.models.diffusion import SCHEDULERS

    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    if scheduler != "default":
        pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                output_type="np").images
