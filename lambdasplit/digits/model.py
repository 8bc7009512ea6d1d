"""The parts of the digits pipeline, built small: a word-level CLIP tokenizer, a CLIP text encoder, a VAE,
a U-Net and a DDIM scheduler, all stock diffusers / transformers classes.

The tokenizer is a real `CLIPTokenizer` whose BPE vocabulary knows only the words in `data.VOCABULARY`: its
merges build each of them from its characters, so every known word is one token. A word it does not know
falls apart into pieces; a character outside the known words is the unk token (<|endoftext|>, as in CLIP).
The pieces that only exist as steps of the merges never occur in training, and `tie_pieces_to_unk` gives
them the unk token's embedding, so that the text encoder reads an unknown word as unk too.
"""

from __future__ import annotations

import json
from pathlib import Path

from .data import VOCABULARY

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 16  # tokens per prompt, <|startoftext|> and <|endoftext|> included
END = "</w>"     # CLIP's end-of-word mark

# the shape of the models (kept here so that train.py and the tests agree)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
VAE = dict(block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8)
UNET = dict(block_out_channels=(32, 64, 64), layers_per_block=1, attention_head_dim=4, norm_num_groups=16)
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02)


def word_pieces(word: str) -> list[str]:
    """How CLIP's BPE starts a word: its characters, the last one marked as the end of the word."""
    return [*word[:-1], word[-1] + END]


def bpe_vocabulary(words=VOCABULARY) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary (token → id) and the merges (in rank order) that make each word a single token.

    Ids: <|startoftext|> 0, <|endoftext|> 1, then the whole words in order, then the characters and the
    partial words the merges pass through."""
    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    for w in words:
        vocab.setdefault(w + END, len(vocab))
    merges: list[tuple[str, str]] = []
    seen = set()
    for w in words:
        pieces = word_pieces(w)
        for p in pieces:
            vocab.setdefault(p, len(vocab))
        left = pieces[0]
        for right in pieces[1:]:
            if (left, right) not in seen:
                seen.add((left, right))
                merges.append((left, right))
            left = left + right
            vocab.setdefault(left, len(vocab))
    return vocab, merges


def write_tokenizer(folder: str | Path) -> Path:
    """Write a CLIPTokenizer folder (vocab.json, merges.txt and its configs) and check that it reads
    every known word as one token."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = bpe_vocabulary()
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "do_lower_case": True,
              "errors": "replace", "add_prefix_space": False, "clean_up_tokenization_spaces": False, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    check_tokenizer(load_tokenizer(folder))
    return folder


def load_tokenizer(folder: str | Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder))


def check_tokenizer(tokenizer) -> None:
    """Every known word must be one token, its own whole-word id."""
    vocab = tokenizer.get_vocab()
    for w in VOCABULARY:
        ids = tokenizer(w, add_special_tokens=False)["input_ids"]
        if ids != [vocab[w + END]]:
            raise AssertionError(f"the tokenizer splits {w!r} into {tokenizer.convert_ids_to_tokens(ids)}")


def piece_ids(tokenizer) -> list[int]:
    """Ids of the tokens that are not whole known words nor special: characters and partial words."""
    vocab = tokenizer.get_vocab()
    whole = {vocab[w + END] for w in VOCABULARY} | {vocab[BOS], vocab[EOS]}
    return sorted(set(vocab.values()) - whole)


def text_encoder(vocab: dict[str, int]):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=len(vocab), max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu",
                            bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS],
                            projection_dim=TEXT["hidden_size"], **TEXT)
    return CLIPTextModel(config)


def tie_pieces_to_unk(encoder, tokenizer) -> None:
    """Give every partial-word token the embedding of the unk token (see the module's docstring)."""
    import torch

    table = encoder.get_input_embeddings().weight
    unk = tokenizer.convert_tokens_to_ids(tokenizer.unk_token)
    with torch.no_grad():
        table[piece_ids(tokenizer)] = table[unk].clone()


def vae():
    from diffusers import AutoencoderKL

    n = len(VAE["block_out_channels"])
    return AutoencoderKL(in_channels=3, out_channels=3, sample_size=32,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         **VAE)


def unet():
    from diffusers import UNet2DConditionModel

    n = len(UNET["block_out_channels"])
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4,
                                down_block_types=("CrossAttnDownBlock2D",) * n,
                                up_block_types=("CrossAttnUpBlock2D",) * n,
                                cross_attention_dim=TEXT["hidden_size"], **UNET)


def scheduler():
    """The sampler that ships: DDIM over the training betas, as Stable Diffusion 1.x configures it."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         prediction_type="epsilon", timestep_spacing="leading")


def noise_schedule():
    """The training-time forward process (same betas)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULE, clip_sample=False, prediction_type="epsilon")
