"""`lambdasplit bench fig5`: the paper's Fig. 5 on the embedded image model, measured over the real server.

For each codec of the predicted noise (the downlink, every step), over many prompts and seeds: the
noise bytes per step and per image, and PSNR and SSIM of the image against the one made with the
lossless fp32 wire from the same prompt and seed (the paper: FP16 41 dB / 0.99, INT8 29 dB / 0.83).
For the digits model an independent classifier also reads every image, so the table says whether
the digit survived the codec. Output: fig5.md/.csv/.json, a grid of images per codec (fig5-grid.png)
and the noise an eavesdropper sees at one step (fig5-noise.png, and one RGBA picture per codec).
"""

from __future__ import annotations

import contextlib
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..util.extras import check
from ..util.report import machine_meta, write_report

check("skimage", "bench")  # its metrics and judge come after the images: say so before the run
check("sklearn", "bench")

PAPER = {"fp16": (41.0, 0.99), "int8": (29.0, 0.83)}  # Λ-Split paper, Fig. 5 (SDXL, vs the FP32 image)
DEFAULT_CODECS = ("fp32,fp16,int8,int8:tensor,int6,int4,int2,had+int8,had+int4,had+int2,int8+out:4,int4+out:4,"
                  "int8+zstd")


@dataclass
class Row:
    codec: str
    images: int
    bytes_per_step: float  # downlink frame bytes per step (header included), mean
    bytes_per_image: float  # all steps' noise frames of one image
    reduction: float  # noise traffic (whole frames) saved against fp32
    payload_per_step: float  # the noise itself, less each frame's header
    payload_reduction: float
    psnr_db: float  # mean over images (inf when identical: reported as such)
    psnr_sd: float
    ssim: float
    ssim_sd: float
    accuracy: float | None = None  # share of images the digit classifier reads as the prompted digit
    paper: str = ""


def _scores(reference: np.ndarray, image: np.ndarray) -> tuple[float, float]:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    if np.array_equal(reference, image):
        return float("inf"), 1.0
    return (float(peak_signal_noise_ratio(reference, image, data_range=1.0)),
            float(structural_similarity(reference, image, data_range=1.0, channel_axis=-1)))


def _mean_sd(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if np.isfinite(v)]
    if len(finite) < len(values):  # any identical image makes the mean infinite, as it should
        return float("inf"), 0.0
    return statistics.fmean(finite), statistics.pstdev(finite) if len(finite) > 1 else 0.0


def _digit_of(prompt: str) -> int | None:
    m = re.search(r"\b(\d)\b", prompt)
    return int(m.group(1)) if m else None


def _judge(model_name: str):
    """The digit classifier for the embedded digits model (None for other models)."""
    if "digit" not in model_name:
        return None
    try:
        from ..digits.classify import label_images
    except ImportError:
        return None
    return label_images


def run_fig5(args) -> list[Row]:
    import torch

    from ..client.images import ImageClient
    from ..models.diffusion import ImageOptions, noise_picture
    from ..models.source import resolve_image_model
    from ..server.process import ServerProcess
    from .harness import compute_meta, serve_compute

    folder = resolve_image_model(args.model)
    codecs = [c.strip() for c in (args.codecs or DEFAULT_CODECS).split(",") if c.strip()]
    if "fp32" not in codecs:
        codecs.insert(0, "fp32")  # the reference every other codec is scored against
    prompts = args.prompt or [f"a handwritten digit {d}" for d in range(10)]
    seeds = list(range(args.seed, args.seed + args.seeds))
    noise_step = args.noise_step if args.noise_step >= 0 else args.steps + args.noise_step
    (out := Path(args.out)).mkdir(parents=True, exist_ok=True)
    print(f"bench fig5: {folder.name}, {len(prompts)} prompts x {len(seeds)} seeds, {args.steps} steps, guidance "
          f"{args.guidance}, codecs {', '.join(codecs)}, device {compute_meta(args)['device']}", flush=True)
    with contextlib.ExitStack() as stack:
        url = args.server or stack.enter_context(ServerProcess(str(folder), "0:0", *serve_compute(args))).url
        base = ImageClient(str(folder), server=url, up=args.up, down="fp32", device=args.device)
        judge = _judge(base.facts.name)
        images: dict[str, list[np.ndarray]] = {c: [] for c in codecs}
        pictures: dict[str, list] = {c: [] for c in codecs}
        step_bytes: dict[str, list[float]] = {c: [] for c in codecs}
        payload_bytes: dict[str, list[float]] = {c: [] for c in codecs}
        noise: dict[str, torch.Tensor] = {}
        for p, prompt in enumerate(prompts):
            for seed in seeds:
                options = ImageOptions(steps=args.steps, guidance=args.guidance, seed=seed).check()
                for codec in codecs:
                    client = base.with_wire(down=codec)
                    kept = {}

                    def on_step(event, kept=kept):
                        if event.index == noise_step:
                            kept["noise"] = event.noise.clone()

                    result = client.generate(prompt, options, on_step=on_step)
                    images[codec].append(np.asarray(result.images[0], dtype=np.float32) / 255.0)
                    pictures[codec].append(result.images[0])
                    step_bytes[codec].extend(result.step_bytes)
                    payload_bytes[codec].extend(result.step_payload_bytes)
                    if p == 0 and seed == seeds[0]:
                        noise[codec] = kept["noise"]
            print(f"  {prompt!r}: {len(seeds)} seeds x {len(codecs)} codecs done", flush=True)

    digits = [_digit_of(p) for p in prompts for _ in seeds]
    fp32_per_step = statistics.fmean(step_bytes["fp32"])
    fp32_payload = statistics.fmean(payload_bytes["fp32"])
    rows = []
    for codec in codecs:
        scores = [_scores(ref, img) for ref, img in zip(images["fp32"], images[codec])]
        psnr, psnr_sd = _mean_sd([s[0] for s in scores])
        ssim, ssim_sd = _mean_sd([s[1] for s in scores])
        per_step, payload = statistics.fmean(step_bytes[codec]), statistics.fmean(payload_bytes[codec])
        accuracy = None
        if judge is not None and all(d is not None for d in digits):
            labels = judge(pictures[codec])
            accuracy = float(np.mean([int(a) == d for a, d in zip(labels, digits)]))
        paper = PAPER.get(codec)
        rows.append(Row(codec, len(scores), per_step, per_step * args.steps, 1 - per_step / fp32_per_step,
                        payload, 1 - payload / fp32_payload, psnr, psnr_sd, ssim, ssim_sd, accuracy,
                        f"{paper[0]:.0f} dB / {paper[1]:.2f}" if paper else ""))

    _grid(out / "fig5-grid.png", codecs, pictures, columns=min(10, len(pictures["fp32"])))
    _noise_pictures(out, noise, noise_picture, noise_step)
    meta = {**machine_meta(), "model": folder.name, "prompts": prompts, "seeds": seeds, "steps": args.steps,
            "guidance": args.guidance, "up": args.up, "noise_step": noise_step,
            "device": compute_meta(args)["device"], "weights": result.body_weights}
    table = _table(rows)
    caption = (f"{folder.name}: {len(prompts)} prompts x {len(seeds)} seeds, {args.steps} steps, guidance "
               f"{args.guidance}; the noise comes down every step in the row's codec, the embeddings and the initial "
               f"latent go up once in {args.up}. PSNR and SSIM against the image the lossless fp32 wire makes from "
               f"the same prompt and seed (mean ± standard deviation over images). Bytes are whole frames, header "
               f"included. Paper: Λ-Split's Fig. 5 (SDXL). {meta['date']}, {meta['machine']}, torch {meta['torch']}; "
               f"device {meta['device']}, U-Net weights {meta['weights']}.")
    write_report(out, "fig5", rows, table, caption, meta)
    return rows


def _table(rows: list[Row]) -> str:
    def db(value: float, sd: float) -> str:
        return "identical" if not np.isfinite(value) else f"{value:.1f} ± {sd:.1f}"

    accuracy = any(r.accuracy is not None for r in rows)
    head = ("| noise codec | frame bytes/step | vs fp32 | noise payload/step | vs fp32 | bytes/image | PSNR dB | SSIM |"
            + (" digit read |" if accuracy else ""))
    lines = [head + " paper (PSNR / SSIM) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if accuracy else "") + "---|"]
    for r in rows:
        ssim = "1.000" if not np.isfinite(r.psnr_db) else f"{r.ssim:.3f} ± {r.ssim_sd:.3f}"
        cells = [r.codec, f"{r.bytes_per_step:.0f}", f"−{r.reduction * 100:.1f}%", f"{r.payload_per_step:.0f}",
                 f"−{r.payload_reduction * 100:.1f}%", f"{r.bytes_per_image:.0f}", db(r.psnr_db, r.psnr_sd), ssim]
        if accuracy:
            cells.append("–" if r.accuracy is None else f"{r.accuracy * 100:.0f}%")
        cells.append(r.paper or "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _grid(path: Path, codecs: list[str], pictures: dict[str, list], columns: int, cell: int = 64) -> None:
    """Rows: codecs; columns: the first `columns` images (the same prompts and seeds in every row)."""
    from PIL import Image, ImageDraw

    label = 110
    grid = Image.new("RGB", (label + columns * cell, len(codecs) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for r, codec in enumerate(codecs):
        draw.text((6, r * cell + cell // 2 - 6), codec, fill="black")
        for c, picture in enumerate(pictures[codec][:columns]):
            grid.paste(picture.convert("RGB").resize((cell, cell), Image.NEAREST), (label + c * cell, r * cell))
    grid.save(path)


def _noise_pictures(out: Path, noise: dict, noise_picture, step: int, cell: int = 128) -> None:
    """Fig. 5(b): the noise of one step of the first image, as the network carries it in each codec."""
    from PIL import Image, ImageDraw

    strip = Image.new("RGBA", (len(noise) * cell, cell + 18), (255, 255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for i, (codec, tensor) in enumerate(noise.items()):
        picture = noise_picture(tensor).resize((cell, cell), Image.NEAREST)
        picture.save(out / f"fig5-noise-{re.sub(r'[^a-z0-9]+', '_', codec)}.png")
        strip.alpha_composite(picture, (i * cell, 18))
        draw.text((i * cell + 4, 3), codec, fill="black")
    strip.save(out / "fig5-noise.png")
    print(f"noise of step {step} per codec: {out / 'fig5-noise.png'}")
