"""Train the embedded digits model and write it as a diffusers pipeline folder.

    python -m lambdasplit.digits.train --out lambdasplit/data/digits          # the shipped model (~11 min, 2 cores)
    python -m lambdasplit.digits.train --out /tmp/digits --quick               # seconds: checks the script works

Two phases, both on the CPU, seeded and reproducible (same seed, same machine, same thread count: same
weights). First the VAE learns to squeeze the 32×32 pictures into 4×8×8 latents; its `scaling_factor` is set
to 1 / std of the training latents. Then the text encoder and the U-Net learn together to predict the noise
added to those latents (DDPM forward process, epsilon prediction), with the prompt dropped to "" 10 % of the
time so that classifier-free guidance works. The U-Net and text encoder written are an exponential moving
average of their weights. The folder is built beside `--out` and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import data, model

DEFAULTS = dict(vae_steps=600, unet_steps=1500, vae_batch=64, unet_batch=128, vae_lr=2e-3, unet_lr=1e-3,
                kl_weight=1e-3, ema=0.999, drop_prompt=0.1)
QUICK = dict(vae_steps=8, unet_steps=12, vae_batch=16, unet_batch=32)


def _batches(n: int, size: int, generator: torch.Generator):
    """Index batches, epoch after epoch, each epoch in a fresh seeded order (the last short batch of an
    epoch is dropped)."""
    while True:
        order = torch.randperm(n, generator=generator)
        for i in range(0, n - size + 1, size):
            yield order[i:i + size]


def _lr(step: int, steps: int, base: float, warmup: int = 50) -> float:
    """Linear warm-up, then cosine decay to 5 % of `base`."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def _progress(iterable, desc: str, quiet: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, disable=quiet, dynamic_ncols=True, mininterval=1.0)


def train_vae(images: torch.Tensor, steps: int, batch: int, lr: float, kl_weight: float,
              generator: torch.Generator, quiet: bool = False):
    """The VAE: mean squared reconstruction error plus `kl_weight` × the KL term per latent value."""
    vae = model.vae().train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    batches = _batches(len(images), batch, generator)
    bar = _progress(range(steps), "vae", quiet)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        x = images[next(batches)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = mse + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == steps - 1:
            bar.set_postfix(mse=f"{mse.item():.4f}", kl=f"{kl.item():.3f}")
    return vae.eval()


@torch.no_grad()
def encode_all(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The posterior means of all pictures (the U-Net learns to make these)."""
    return torch.cat([vae.encode(images[i:i + batch]).latent_dist.mean for i in range(0, len(images), batch)])


class EMA:
    """An exponential moving average of some modules' parameters, with the usual warm-up of the decay."""

    def __init__(self, modules, decay: float):
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - d)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


def train_unet(latents: torch.Tensor, labels, tokenizer, steps: int, batch: int, lr: float, ema_decay: float,
               drop_prompt: float, generator: torch.Generator, quiet: bool = False):
    """The text encoder and the U-Net together: epsilon prediction on the DDPM forward process."""
    encoder = model.text_encoder(tokenizer.get_vocab()).train()
    unet = model.unet().train()
    schedule = model.noise_schedule()
    params = [*encoder.parameters(), *unet.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema = EMA([encoder, unet], ema_decay)
    labels = torch.as_tensor(labels)
    batches = _batches(len(latents), batch, generator)
    bar = _progress(range(steps), "text encoder + unet", quiet)
    smooth = None
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        index = next(batches)
        x0 = latents[index]
        prompts = data.training_prompts(labels[index], generator, empty=drop_prompt)
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, schedule.config.num_train_timesteps, (len(x0),), generator=generator)
        noisy = schedule.add_noise(x0, noise, t)
        states = encoder(ids)[0]
        pred = unet(noisy, t, encoder_hidden_states=states).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        if step % 20 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{smooth:.4f}")
    ema.copy_to_model()
    return encoder.eval(), unet.eval(), smooth


def write_pipeline(folder: Path, vae, encoder, unet, tokenizer_folder: Path) -> None:
    from diffusers import StableDiffusionPipeline

    tokenizer = model.load_tokenizer(tokenizer_folder)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=model.scheduler(), safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # no "cast with to()" advice: nothing here is meant to stay float32
    try:
        unet.to(torch.float16)  # half the bytes on disk; diffusers loads them back into float32 models
        vae.to(torch.float16)
        pipe.save_pretrained(folder, safe_serialization=True)
    finally:
        diffusers_logging.set_verbosity(level)
    # the tokenizer as written by hand (vocab.json + merges.txt), whatever save_pretrained chose to write
    shutil.rmtree(folder / "tokenizer")
    shutil.copytree(tokenizer_folder, folder / "tokenizer")


def _replace_dir(built: Path, out: Path) -> None:
    """Put the finished folder `built` at `out`, replacing what was there only once it is complete."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [built, *built.rglob("*")]:  # the usual modes, not mkdtemp's private 0700
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old."))
        os.rmdir(old)
        os.replace(out, old)
    os.replace(built, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def train(out: str | Path, seed: int = 0, quick: bool = False, quiet: bool = False, **overrides) -> dict:
    """Train and write the pipeline folder at `out`; returns what was done (also saved as training.json)."""
    settings = {**DEFAULTS, **(QUICK if quick else {}), **{k: v for k, v in overrides.items() if v is not None}}
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train_set, _ = data.split(seed)
    start = time.perf_counter()
    built = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.build."))
    try:
        tokenizer_folder = model.write_tokenizer(built / "_tokenizer")
        tokenizer = model.load_tokenizer(tokenizer_folder)

        vae = train_vae(train_set.images, settings["vae_steps"], settings["vae_batch"], settings["vae_lr"],
                        settings["kl_weight"], generator, quiet)
        latents = encode_all(vae, train_set.images)
        scaling = float(1.0 / latents.std())
        vae.register_to_config(scaling_factor=scaling)
        with torch.no_grad():
            vae_mse = F.mse_loss(vae.decode(latents[:256]).sample, train_set.images[:256]).item()
        vae_seconds = time.perf_counter() - start

        encoder, unet, loss = train_unet(latents * scaling, train_set.labels, tokenizer, settings["unet_steps"],
                                         settings["unet_batch"], settings["unet_lr"], settings["ema"],
                                         settings["drop_prompt"], generator, quiet)
        model.tie_pieces_to_unk(encoder, tokenizer)
        unet_seconds = time.perf_counter() - start - vae_seconds

        write_pipeline(built, vae, encoder, unet, tokenizer_folder)
        shutil.rmtree(tokenizer_folder)
        seconds = time.perf_counter() - start
        report = {"seed": seed, "quick": quick, "settings": settings, "train_images": len(train_set),
                  "scaling_factor": scaling, "vae_reconstruction_mse": vae_mse, "unet_final_loss": loss,
                  "seconds": {"vae": round(vae_seconds, 1), "text_encoder_unet": round(unet_seconds, 1),
                              "total": round(seconds, 1)},
                  "threads": torch.get_num_threads(), "torch": torch.__version__,
                  "weights_bytes": sum(f.stat().st_size for f in built.rglob("*.safetensors"))}
        (built / "training.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        _replace_dir(built, out)
    finally:
        if built.exists():
            shutil.rmtree(built, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lambdasplit.digits.train",
        description="Train the embedded text-to-image model on scikit-learn's handwritten digits (CPU, "
                    "seeded) and write it as a diffusers StableDiffusionPipeline folder. The defaults take "
                    "about 11 minutes on 2 CPU cores.")
    parser.add_argument("--out", required=True, help="the pipeline folder to write (replaced when complete)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the data order, the noise and "
                                                            "the initial weights (default 0)")
    parser.add_argument("--vae-steps", type=int, help=f"VAE optimizer steps (default {DEFAULTS['vae_steps']})")
    parser.add_argument("--unet-steps", type=int,
                        help=f"text encoder + U-Net optimizer steps (default {DEFAULTS['unet_steps']})")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny run (seconds) that checks the whole script; the model it writes draws noise")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = train(args.out, seed=args.seed, quick=args.quick, quiet=args.quiet,
                   vae_steps=args.vae_steps, unet_steps=args.unet_steps)
    s = report["seconds"]
    print(f"wrote {Path(args.out).resolve()} ({report['weights_bytes'] / 1e6:.2f} MB of weights) in {s['total']:.1f} s "
          f"(VAE {s['vae']:.1f} s, text encoder + U-Net {s['text_encoder_unet']:.1f} s, "
          f"{report['threads']} threads); VAE reconstruction MSE {report['vae_reconstruction_mse']:.4f}, "
          f"final noise-prediction loss {report['unet_final_loss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
