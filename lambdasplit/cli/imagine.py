"""`lambdasplit imagine`: text to image through a body server (and `demo --image`, which starts one)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..data import IMAGE_GUIDANCE, IMAGE_PROMPT, IMAGE_STEPS
from ..models.source import DEFAULT_IMAGE_MODEL
from .options import add_compute, add_connection, client_token


def register(sub) -> None:
    p = sub.add_parser("imagine", help="make an image through a body server that holds only the U-Net",
                       description="Text to image with Λ-Split: the text encoders and the VAE run here, the U-Net "
                                   "on --server (a body server started with a diffusion model: lambdasplit serve "
                                   "--model digits). The prompt's embeddings and the initial latent go up once; "
                                   "the predicted noise comes down every step in --codec; the image is decoded "
                                   "here and never crosses the network.")
    p.add_argument("prompt", help=f"what to draw, e.g. {IMAGE_PROMPT!r}")
    p.add_argument("--server", required=True, metavar="URL", help="the body server, e.g. http://127.0.0.1:8470")
    add_connection(p, retries=False)
    p.add_argument("--batch", type=int, default=1, help="images from the one prompt (default 1)")
    add_image_options(p)
    add_compute(p, "text encoders and VAE", weights=False)  # the U-Net's device and format are the server's
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def add_image_options(parser: argparse.ArgumentParser, group=None) -> None:
    """The generation options `imagine` and `demo --image` share (those `parser` already has are kept: the
    demo's --model and --seed mean the same for images)."""
    g = group or parser

    def add(*names, **kw):
        if not any(n in parser._option_string_actions for n in names):
            g.add_argument(*names, **kw)

    add("--model", default=None, metavar="M",
        help=f"a diffusers pipeline folder (Stable Diffusion 1.x/2.x or SDXL), a Hub id, or "
             f"'{DEFAULT_IMAGE_MODEL}' (the embedded default, a small model of handwritten digits)")
    add("--steps", type=int, default=IMAGE_STEPS, help=f"denoising steps (default {IMAGE_STEPS})")
    add("--guidance", type=float, default=IMAGE_GUIDANCE,
        help=f"classifier-free guidance scale; <= 1 turns it off (default {IMAGE_GUIDANCE})")
    add("--seed", type=int, default=0, help="seed of the initial latent (default 0)")
    add("--scheduler", default="default", help="default (the pipeline's own), ddim, euler, dpm++, unipc, pndm or lms")
    add("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    add("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    add("--negative", default=None, metavar="TEXT", help="negative prompt (with guidance)")
    add("--codec", default="fp16", metavar="CODEC",
        help="codec of the noise that comes down every step: fp32 (lossless), fp16 (default), bf16, int8, int6, "
             "int4, int2, with had / out:K / zstd parts (see docs/wire.md)")
    add("--up", default="fp16", metavar="CODEC",
        help="codec of the text embeddings and initial latent that go up once (default fp16)")
    add("-o", "--output", dest="out", default="imagine.png", metavar="PNG",
        help="where to write the image (a batch writes NAME-0.png, NAME-1.png, ...; default imagine.png)")
    add("--out", dest="out", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # the older spelling
    add("--every", type=int, default=0, metavar="K",
        help="also save the image every K steps (decoded from the latent so far) into --frames")
    add("--frames", default=None, metavar="DIR", help="folder for --every (default: beside --output)")
    add("--noise-step", type=int, action="append", default=[], metavar="N",
        help="save the noise received at step N (0-based; -1: the last) as an RGBA picture, one channel per colour, "
             "as the paper's Fig. 5(b); repeatable")


def run(args) -> None:
    from ..client.images import ImageClient

    client = ImageClient(args.model, server=args.server, up=args.up, down=args.codec, token=client_token(args),
                         ca_bundle=args.ca_bundle, device=args.device)
    result, outputs, saved = make_image(client, args.prompt, args, batch=args.batch, quiet=args.quiet)
    print(summary(result, outputs, saved), file=sys.stderr)


def run_image_demo(args, prompt: str) -> None:
    """`demo --image`: a body server with the U-Net on a free loopback port, one image through it."""
    from ..client.images import ImageClient, ImageConnection
    from ..models.device import resolve_device
    from ..models.diffusion import body_format
    from ..models.source import resolve_image_model
    from ..server.process import ServerProcess

    device = resolve_device(args.device)  # a device or format the U-Net cannot take fails here, before any load
    weights = body_format(args.weights, device).name
    folder = resolve_image_model(args.model)
    print(f"lambdasplit demo --image: {folder.name}\n  device: tokenizer + text encoder + initial latent (head), "
          f"scheduler step + VAE decoder (tail)\n  cloud:  the U-Net (body)", flush=True)
    print("starting a body server on a free loopback port ...", flush=True)
    with ServerProcess(str(folder), "0:0", "--device", str(device), "--weights", weights) as server:
        with ImageConnection(server.url) as conn:
            info = conn.image_info()
        print(f"  body server at {server.url}: holds {info.parameters / 1e6:.2f} M parameters ({', '.join(info.holds)}, "
              f"{info.weights} on {info.device})", flush=True)
        client = ImageClient(str(folder), server=server.url, up=args.up, down=args.codec, device=str(device))
        print(f"> {prompt}", flush=True)
        result, outputs, saved = make_image(client, prompt, args)
    print(summary(result, outputs, saved))


def _options(args):
    from ..models.diffusion import ImageOptions

    return ImageOptions(steps=args.steps, guidance=args.guidance, scheduler=args.scheduler, height=args.height,
                        width=args.width, seed=args.seed or 0, negative=args.negative).check()


def make_image(client, prompt: str, args, *, batch: int = 1, quiet: bool = False, out=sys.stderr):
    """Generate with a progress bar, saving what --every and --noise-step ask for; return the result."""
    from tqdm import tqdm

    from ..models.diffusion import noise_picture

    options = _options(args)
    base = Path(args.out)
    frames = Path(args.frames) if args.frames else base.parent / f"{base.stem}-steps"
    wanted = {n if n >= 0 else options.steps + n for n in args.noise_step}
    if bad := sorted(n for n in wanted if not 0 <= n < options.steps):
        raise ValueError(f"--noise-step {bad[0]} is outside the {options.steps} steps")
    if args.every < 0:
        raise ValueError("--every must be >= 0")
    bar = tqdm(total=options.steps, desc="denoising", unit="step", disable=quiet, file=out, leave=False)
    saved = []

    def on_step(event):
        bar.update(1)
        bar.set_postfix_str(f"{len(event.frame)} B/step down")
        if event.index in wanted:
            path = base.parent / f"{base.stem}-noise-step{event.index}.png"
            noise_picture(event.noise).resize((event.noise.shape[-1] * 16, event.noise.shape[-2] * 16), 0).save(path)
            saved.append(path)
        if args.every and ((event.index + 1) % args.every == 0 or event.index + 1 == event.steps):
            frames.mkdir(parents=True, exist_ok=True)
            path = frames / f"step{event.index + 1:04d}.png"
            client.tail.decode(event.latent)[0].save(path)
            saved.append(path)

    try:
        result = client.generate(prompt, options, batch=batch, on_step=on_step)
    finally:
        bar.close()
    base.parent.mkdir(parents=True, exist_ok=True)
    outputs = [base] if len(result.images) == 1 else [base.with_name(f"{base.stem}-{i}{base.suffix or '.png'}")
                                                       for i in range(len(result.images))]
    for image, path in zip(result.images, outputs):
        image.save(path)
    return result, outputs, saved


def summary(result, outputs, saved) -> str:
    t = result.traffic
    lines = [f"wrote {', '.join(map(str, outputs))}" + (f" (+ {len(saved)} pictures: {saved[0].parent})" if saved else ""),
             f"{result.steps} steps in {result.seconds:.1f} s (U-Net on the server, {result.body_weights}: "
             f"{result.cloud_s:.1f} s)",
             f"up, once: {result.frame_bytes_up} B ({result.up_codec}: the prompt's embeddings and the initial latent)",
             f"down: {result.noise_bytes_per_step:.0f} B per step, {result.frame_bytes_down} B in all "
             f"({result.down_codec} noise)"]
    if t is not None and t.counted_at_socket:
        lines.append(f"on the sockets, headers included: {t.socket_up} B up, {t.socket_down} B down")
    return "\n".join(lines)
