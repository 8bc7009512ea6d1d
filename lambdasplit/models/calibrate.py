"""Hidden states at split points, collected on text: the input of PCA bases (and of privacy studies).

The shipped texts are original or public-domain prose, code, notes and dialogue
(`lambdasplit/data/calibration.txt`); `heldout.txt` is kept apart for perplexity and never used
to fit anything.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from tqdm import tqdm

from .llm import load_split
from .prompting import encode_prompt


def shipped_text(name: str) -> str:
    """'calibration' or 'heldout': a text file that ships inside the package."""
    return resources.files("lambdasplit.data").joinpath(f"{name}.txt").read_text(encoding="utf-8")


def calibration_texts(text: str | None = None) -> list[str]:
    """Paragraphs of the calibration text, each used raw and as a chat turn."""
    return [p.strip() for p in (text or shipped_text("calibration")).split("\n\n") if p.strip()]


def collect_hidden(folder: Path, points: list[int], texts: list[str], *, chat: bool = True,
                   max_tokens: int = 512, progress: bool = True) -> dict[int, torch.Tensor]:
    """Hidden states entering each layer in `points`, for every token of every text: {point: (N, D)}.

    Each text is run on its own (no cache), raw and, when the tokenizer has a chat template and
    `chat` is set, as a user message with the generation prompt, as the device would send it.
    """
    from transformers import AutoTokenizer

    points = sorted(set(points))
    model = load_split(folder, points[0], points[-1], parts=("head", "body"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    sequences = []
    for text in texts:
        sequences.append(tokenizer(text)["input_ids"][:max_tokens])
        if chat and tokenizer.chat_template:
            sequences.append(encode_prompt(tokenizer, text)[:max_tokens])
    rows: dict[int, list[torch.Tensor]] = {p: [] for p in points}
    with torch.inference_mode():
        for ids in tqdm(sequences, desc="calibration states", unit="text", disable=not progress, leave=False):
            hidden = model.head(torch.tensor([ids]), None, 0)
            rows[points[0]].append(hidden[0])
            for start, stop in zip(points, points[1:]):
                hidden = model.body(hidden, None, 0, start, stop)
                rows[stop].append(hidden[0])
    return {p: torch.cat(r).float() for p, r in rows.items()}


def fit_basis(folder: Path, points: list[int], rank: int, out: Path, *, text: str | None = None,
              progress: bool = True) -> Path:
    """Fit a rank-`rank` PCA basis of the hidden states at `points` on calibration text; write it to `out`."""
    from ..wire.lowrank import fit_pca, save_basis
    from .llm import load_config
    from .source import model_name

    config = load_config(folder)
    if not 1 <= rank <= config.hidden_size:
        raise ValueError(f"rank must be between 1 and the hidden size {config.hidden_size}, got {rank}")
    bad = [p for p in points if not 0 <= p <= config.num_hidden_layers]
    if bad:
        raise ValueError(f"split points {bad} are outside 0..{config.num_hidden_layers}")
    states = collect_hidden(folder, points, calibration_texts(text), progress=progress)
    fits = {p: fit_pca(rows, rank) for p, rows in states.items()}
    tokens = next(iter(states.values())).shape[0]
    about = (f"PCA of the hidden states entering layers {sorted(states)} on {tokens} calibration tokens "
             f"({'given text' if text else 'lambdasplit/data/calibration.txt'}, raw and chat-templated)")
    return save_basis(out, fits, model=model_name(folder), hidden_size=config.hidden_size, about=about)


def default_basis_path(folder: Path, points: list[int], rank: int) -> Path:
    """Where the benchmarks keep the basis they fit on the shipped calibration text."""
    import hashlib

    from .source import cache_root, model_name

    digest = hashlib.sha256(shipped_text("calibration").encode()).hexdigest()[:8]
    name = f"{model_name(folder)}-p{'-'.join(map(str, sorted(set(points))))}-r{rank}-{digest}.safetensors"
    return cache_root() / "bases" / name.replace("/", "_")
