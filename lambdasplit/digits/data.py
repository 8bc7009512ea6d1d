"""scikit-learn's handwritten digits as a text-to-image data set: 32×32 RGB pictures and their prompts.

`sklearn.datasets.load_digits` holds 1797 grey 8×8 digits whose pixels count ink from 0 to 16. Here each
becomes dark ink on white paper, upscaled bilinearly to 32×32, in [-1, 1], with three identical channels so
that the model's VAE is an ordinary RGB one. `to_raw` goes back: any 32×32 picture to the 8×8, 0..16 grid
of `load_digits`, which is what the judge in `classify` reads.

The canonical prompt is "a handwritten digit N"; training also uses a few variants ("a handwritten seven",
"a handwritten number 7", ...) built from the same small vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..util.extras import require

SIZE = 32  # the side of the pictures, in pixels
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VOCABULARY = ("a", "handwritten", "digit", "number", *"0123456789", *WORDS)  # every word the tokenizer knows


def prompt(label: int) -> str:
    """The canonical prompt for a digit: "a handwritten digit 7"."""
    return f"a handwritten digit {int(label)}"


def variants(label: int) -> list[str]:
    """Other ways of asking for the same digit, all within `VOCABULARY`."""
    n, word = int(label), WORDS[int(label)]
    return [f"a handwritten digit {word}", f"a handwritten number {n}", f"a handwritten number {word}",
            f"a handwritten {word}", f"a handwritten {n}", f"digit {n}", f"number {word}", word, str(n)]


def training_prompts(labels, generator: torch.Generator, *, canonical: float = 0.6, empty: float = 0.1) -> list[str]:
    """A prompt per label: "" with probability `empty` (for classifier-free guidance), else the canonical
    prompt with probability `canonical`, else one of its variants; drawn from `generator` (reproducible)."""
    labels = [int(v) for v in labels]
    u = torch.rand(len(labels), generator=generator).tolist()
    pick = torch.randint(0, len(variants(0)), (len(labels),), generator=generator).tolist()
    out = []
    for label, r, k in zip(labels, u, pick):
        if r < empty:
            out.append("")
        elif r < empty + (1 - empty) * canonical:
            out.append(prompt(label))
        else:
            out.append(variants(label)[k])
    return out


def to_images(raw: np.ndarray | torch.Tensor) -> torch.Tensor:
    """8×8 digits in 0..16 (ink), shape (N, 8, 8) or (N, 64) → (N, 3, 32, 32) float32 pictures in [-1, 1]:
    white paper (+1), black ink (-1), bilinearly upscaled."""
    x = torch.as_tensor(np.asarray(raw, dtype=np.float32)).reshape(-1, 1, 8, 8)
    x = 1.0 - 2.0 * (x / 16.0)
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return x.clamp(-1.0, 1.0).expand(-1, 3, -1, -1).contiguous()


def to_raw(images) -> np.ndarray:
    """Pictures → (N, 8, 8) float64 in 0..16, the grid and range of `load_digits`.

    `images`: one PIL image or a list of them; or a tensor/array in [0, 1], shaped (N, C, H, W), (N, H, W, C)
    with C in 1, 3, 4, or (N, H, W) / (H, W). Colour becomes grey (the mean of R, G, B; alpha is ignored),
    the side is resized to 32 and then averaged over 4×4 blocks, and dark ink on white paper becomes
    ink counts from 0 to 16.
    """
    grey = _grey(images)  # (N, H, W) in [0, 1]
    if grey.shape[1:] != (SIZE, SIZE):
        t = torch.as_tensor(grey, dtype=torch.float32)[:, None]
        grey = F.interpolate(t, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)[:, 0].numpy()
    n = grey.shape[0]
    block = SIZE // 8
    small = grey.reshape(n, 8, block, 8, block).mean(axis=(2, 4))
    return np.clip((1.0 - small) * 16.0, 0.0, 16.0).astype(np.float64)


def _grey(images) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow comes with diffusers
        Image = None
    if Image is not None and isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)) and images and Image is not None and isinstance(images[0], Image.Image):
        return np.stack([np.asarray(im.convert("L"), dtype=np.float64) / 255.0 for im in images])
    a = images.detach().cpu().float().numpy() if isinstance(images, torch.Tensor) else np.asarray(images, dtype=np.float64)
    a = a.astype(np.float64)
    if a.ndim == 2:
        a = a[None]
    if a.ndim == 3:
        return a
    if a.ndim != 4:
        raise ValueError(f"expected pictures shaped (N, C, H, W) or (N, H, W, C), got {a.shape}")
    if a.shape[1] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 1, -1)  # channels last
    channels = a[..., :3] if a.shape[-1] >= 3 else a[..., :1]
    return channels.mean(axis=-1)


@dataclass(frozen=True)
class Digits:
    raw: np.ndarray       # (N, 8, 8) float64, ink 0..16, as load_digits gives it
    images: torch.Tensor  # (N, 3, 32, 32) float32 in [-1, 1]
    labels: np.ndarray    # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index) -> "Digits":
        index = np.asarray(index)
        return Digits(self.raw[index], self.images[torch.as_tensor(index)], self.labels[index])


def load() -> Digits:
    """All 1797 digits (bundled with scikit-learn: nothing is downloaded)."""
    d = require("sklearn.datasets", "bench").load_digits()
    raw = d.images.astype(np.float64)
    return Digits(raw, to_images(raw), d.target.astype(np.int64))


def split(seed: int = 0, heldout: float = 0.1) -> tuple[Digits, Digits]:
    """A seeded, stratified train / held-out split (90 % / 10 % by default)."""
    train_test_split = require("sklearn.model_selection", "bench").train_test_split
    digits = load()
    index = np.arange(len(digits))
    train, held = train_test_split(index, test_size=heldout, random_state=seed, stratify=digits.labels)
    return digits.subset(np.sort(train)), digits.subset(np.sort(held))
