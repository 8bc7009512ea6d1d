"""An independent judge of the digits model: which digit does a generated picture show?

The judge is a support vector classifier (scikit-learn) trained on the real 8×8 digits of the training split,
knowing nothing of the diffusion model. `label_images` brings any picture to the 8×8, 0..16 grid of
`load_digits` (`data.to_raw`) and asks it. `accuracy` draws pictures with the *unsplit* diffusers
`StableDiffusionPipeline`, one seed per picture, prompts cycling "a handwritten digit 0" … "9", and returns
the fraction that the judge reads as the digit asked for.

    python -m lambdasplit.digits.classify lambdasplit/data/digits        # the figure for the shipped model
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..util.extras import require
from . import GUIDANCE, STEPS, data


@lru_cache(maxsize=4)
def judge(seed: int = 0):
    """The classifier, trained on the real 8×8 digits of the seeded training split (about a second)."""
    SVC = require("sklearn.svm", "bench").SVC
    train, _ = data.split(seed)
    return SVC(gamma=0.001, C=10.0).fit(train.raw.reshape(len(train), -1), train.labels)


def heldout_accuracy(seed: int = 0, upscaled: bool = True) -> float:
    """The judge's accuracy on the held-out real digits: as 8×8 grids, or (`upscaled`) after the 32×32
    pictures' round trip (`data.to_images` then `label_images`' path), which is how it sees generated ones."""
    _, held = data.split(seed)
    if upscaled:
        labels = label_images((held.images + 1) / 2, seed=seed)
    else:
        labels = judge(seed).predict(held.raw.reshape(len(held), -1))
    return float(np.mean(labels == held.labels))


def label_images(images, seed: int = 0) -> np.ndarray:
    """The digit each picture shows, as the judge reads it.

    `images`: PIL images, or a tensor / array in [0, 1] shaped (N, C, H, W) or (N, H, W, C); dark ink on
    light paper, any size (32×32 is the model's)."""
    raw = data.to_raw(images)
    return judge(seed).predict(raw.reshape(len(raw), -1)).astype(np.int64)


def generate(model_folder: str | Path, n: int = 100, steps: int = STEPS, guidance: float = GUIDANCE, seed: int = 0,
             batch: int = 50):
    """`n` pictures from the unsplit StableDiffusionPipeline: prompt i is "a handwritten digit {i % 10}",
    drawn with torch.Generator seeded `seed + i`. Returns (pictures (n, 32, 32, 3) in [0, 1], prompted digits)."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model_folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    asked = np.arange(n) % 10
    out = []
    for start in range(0, n, batch):
        index = range(start, min(n, start + batch))
        prompts = [data.prompt(asked[i]) for i in index]
        generators = [torch.Generator().manual_seed(seed + i) for i in index]
        with torch.no_grad():
            result = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                          output_type="np")
        out.append(np.asarray(result.images))
    return np.concatenate(out), asked


def accuracy(model_folder: str | Path, n: int = 100, steps: int = STEPS, guidance: float = GUIDANCE,
             seed: int = 0) -> float:
    """The fraction of `n` generated pictures that the judge reads as the prompted digit."""
    images, asked = generate(model_folder, n, steps, guidance, seed)
    return float(np.mean(label_images(images) == asked))


def grid(images, columns: int = 10, zoom: int = 3):
    """One PIL image of the pictures in rows of `columns`, each enlarged `zoom` times."""
    from PIL import Image

    images = np.asarray(images)
    n, h, w = images.shape[:3]
    rows = -(-n // columns)
    sheet = np.ones((rows * (h + 2), columns * (w + 2), 3))
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        sheet[r * (h + 2) + 1:r * (h + 2) + 1 + h, c * (w + 2) + 1:c * (w + 2) + 1 + w] = im[..., :3]
    picture = Image.fromarray((sheet * 255).round().astype(np.uint8))
    return picture.resize((picture.width * zoom, picture.height * zoom), Image.NEAREST)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lambdasplit.digits.classify",
        description="Measure how often the digits model draws the digit it is asked for: N pictures from the "
                    "unsplit diffusers pipeline, read by an independent classifier trained on real digits.")
    parser.add_argument("model", nargs="?", default=None,
                        help="the pipeline folder (default: the shipped lambdasplit/data/digits)")
    parser.add_argument("--n", type=int, default=100, help="pictures to draw (default 100)")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"DDIM steps (default {STEPS})")
    parser.add_argument("--guidance", type=float, default=GUIDANCE,
                        help=f"classifier-free guidance scale (default {GUIDANCE})")
    parser.add_argument("--seed", type=int, default=0, help="picture i is drawn with seed SEED + i (default 0)")
    parser.add_argument("--grid", metavar="PNG", help="also save the pictures as one grid image")
    args = parser.parse_args(argv)
    from . import DEFAULT_MODEL

    folder = Path(args.model) if args.model else DEFAULT_MODEL
    print(f"judge (SVC on the real 8x8 digits of the training split): held-out accuracy "
          f"{heldout_accuracy(upscaled=False):.1%} as 8x8 grids, {heldout_accuracy(upscaled=True):.1%} "
          f"through the 32x32 round trip")
    start = time.perf_counter()
    images, asked = generate(folder, args.n, args.steps, args.guidance, args.seed)
    seconds = time.perf_counter() - start
    labels = label_images(images)
    hits = labels == asked
    per_digit = " ".join(f"{d}:{int(hits[asked == d].sum())}/{int((asked == d).sum())}" for d in range(10))
    print(f"generated ({args.n} pictures, DDIM {args.steps} steps, guidance {args.guidance:g}, seeds "
          f"{args.seed}..{args.seed + args.n - 1}, {seconds:.1f} s): {hits.mean():.1%} read as the prompted digit")
    print(f"per digit: {per_digit}")
    if args.grid:
        grid(images).save(args.grid)
        print(f"grid: {args.grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
