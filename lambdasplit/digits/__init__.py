"""The embedded text-to-image model: a small latent diffusion model trained on scikit-learn's handwritten digits.

`data` turns `sklearn.datasets.load_digits` into 32×32 RGB images and prompts ("a handwritten digit 7"),
`train` builds and trains the diffusers pipeline folder (CLIP tokenizer and text encoder, VAE, U-Net, DDIM
scheduler) that ships in `lambdasplit/data/digits/`, and `classify` is an independent judge of what it draws.
"""

from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "data" / "digits"  # the shipped pipeline folder
STEPS = 25       # recommended DDIM steps for the shipped model (98 % of 100 pictures read as the prompted digit)
GUIDANCE = 4.0   # recommended classifier-free guidance scale
