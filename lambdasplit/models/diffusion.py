"""Text-to-image latent diffusion, cut in three (Λ-Split's second application).

    device                                          network                         cloud
    prompt ─ tokenizer(s) ─ text encoder(s) ──(embeddings, once)──────────────▶ U-Net + guidance
    seed ─ Gaussian latent ───────────────────(initial latent, once)──────────▶ mirror latent
    image ◀─ VAE decode ◀─ scheduler step ◀──(predicted noise, every step)──── ┘ (and the same step
                                                                                 on the mirror)

Each side loads only its own components: the head the tokenizers and text encoders, the body the
U-Net, the tail the VAE. Both ends build the same deterministic scheduler, and both step it with the
*dequantized* noise, the bytes the device actually receives, so their latents stay bit-identical
whatever the codec. Stable Diffusion 1.x/2.x (one text encoder) and SDXL (two, with pooled
embeddings and added time ids) are supported; the device's text encoding is diffusers' own
`encode_prompt`, so with a lossless wire the split makes the same image as the unsplit pipeline.

Where each part computes: the U-Net on the server's device in fp32, bf16 or fp16 (`body_format`: fp16 on
CUDA, fp32 elsewhere by default); the text encoders and the VAE on the device's, in fp32. The seeded initial
latent and every scheduler step stay float32 on the CPU on both ends, whatever the devices: a GPU may fuse a
multiply and an add, and the mirror latent must stay bit-identical to the device's.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import IMAGE_GUIDANCE, IMAGE_STEPS
from ..util.extras import require
from .formats import FORMATS, WeightFormat, WeightFormatError, parse_format
from .source import is_diffusion_folder
from .weights import WeightIndex

KINDS = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
}
"""The deterministic schedulers both ends can step in lockstep: one U-Net call per step and no random
draws (ancestral and SDE samplers draw noise each step, which would have to be shared)."""
MAX_STEPS = 1000
MAX_GUIDANCE = 50.0


class DiffusionModelError(ValueError):
    """A folder that is not a usable diffusion pipeline, or options it cannot honour."""


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DiffusionModelError(f"cannot read {path}: {exc}") from None


@dataclass(frozen=True)
class PipelineFacts:
    """What both ends must agree on, read from the pipeline's JSON files alone (no weights loaded)."""
    folder: Path
    kind: str  # "sd" | "sdxl"
    name: str
    latent_channels: int
    sample_size: int  # the U-Net's default latent side
    vae_scale_factor: int  # image pixels per latent pixel
    cross_attention_dim: int
    pooled_dim: int  # SDXL: width of the pooled text embedding (0 for SD)
    scheduler_class: str

    @classmethod
    def read(cls, folder: str | Path) -> "PipelineFacts":
        folder = Path(folder)
        if not is_diffusion_folder(folder):
            raise DiffusionModelError(f"{folder} is not a diffusers pipeline folder (model_index.json and unet/)")
        index = _read(folder / "model_index.json")
        kind = KINDS.get(index.get("_class_name", ""))
        if kind is None:
            raise DiffusionModelError(f"{folder}: {index.get('_class_name')!r} pipelines are not supported; "
                                      f"supported: {', '.join(KINDS)}")
        unet = _read(folder / "unet" / "config.json")
        vae = _read(folder / "vae" / "config.json")
        scheduler = _read(folder / "scheduler" / "scheduler_config.json")
        if unet.get("time_cond_proj_dim") is not None:
            raise DiffusionModelError(f"{folder}: guidance-distilled U-Nets (time_cond_proj_dim) are not supported")
        size = unet.get("sample_size", 64)
        size = size if isinstance(size, int) else int(size[0])
        pooled = 0
        if kind == "sdxl":
            pooled = int(unet["projection_class_embeddings_input_dim"]) - 6 * int(unet["addition_time_embed_dim"])
        info = folder / "lambdasplit.json"
        name = _read(info).get("name", folder.name) if info.is_file() else folder.name
        return cls(folder=folder, kind=kind, name=name, latent_channels=int(unet.get("in_channels", 4)),
                   sample_size=size, vae_scale_factor=2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1),
                   cross_attention_dim=int(unet.get("cross_attention_dim", 768)), pooled_dim=pooled,
                   scheduler_class=scheduler.get("_class_name", ""))

    @property
    def default_size(self) -> int:
        return self.sample_size * self.vae_scale_factor

    def latent_shape(self, height: int | None, width: int | None, batch: int = 1) -> tuple[int, int, int, int]:
        """(batch, channels, h, w) of the latent for an image of height x width pixels."""
        height, width = height or self.default_size, width or self.default_size
        f = self.vae_scale_factor
        for what, n in (("height", height), ("width", width)):
            if n <= 0 or n % f or n > 4096:
                raise DiffusionModelError(f"{what} {n} must be a positive multiple of {f} (this model's VAE "
                                          "downsampling), at most 4096")
        return batch, self.latent_channels, height // f, width // f

    def uses_guidance(self, guidance: float) -> bool:
        """Classifier-free guidance doubles the U-Net batch (unconditional and conditional), as diffusers does."""
        return guidance > 1.0

    def fingerprint(self) -> str:
        """sha256 of the U-Net's config and weights: what the body computes with."""
        unet = self.folder / "unet"
        index = WeightIndex(unet)
        h = hashlib.sha256(json.dumps(_read(unet / "config.json"), sort_keys=True).encode())
        h.update(index.digest(index.keys_with_prefix("")).encode())
        return h.hexdigest()


@dataclass(frozen=True)
class ImageOptions:
    steps: int = IMAGE_STEPS
    guidance: float = IMAGE_GUIDANCE
    scheduler: str = "default"  # "default": the pipeline's own, if deterministic
    height: int | None = None  # None: the model's default size
    width: int | None = None
    seed: int = 0
    negative: str | None = None

    def check(self) -> "ImageOptions":
        if not 1 <= self.steps <= MAX_STEPS:
            raise DiffusionModelError(f"steps must be 1..{MAX_STEPS}, got {self.steps}")
        if not 0.0 <= self.guidance <= MAX_GUIDANCE:
            raise DiffusionModelError(f"guidance must be 0..{MAX_GUIDANCE}, got {self.guidance}")
        if self.scheduler != "default" and self.scheduler not in SCHEDULERS:
            raise DiffusionModelError(f"unknown scheduler {self.scheduler!r}; known: default, {', '.join(SCHEDULERS)}")
        return self


def make_scheduler(facts: PipelineFacts, name: str, steps: int):
    """The scheduler both ends step, with its timesteps set; refused if it draws random noise."""
    diffusers = require("diffusers", "images")

    config = _read(facts.folder / "scheduler" / "scheduler_config.json")
    class_name = facts.scheduler_class if name == "default" else SCHEDULERS.get(name)
    if class_name not in SCHEDULERS.values():
        raise DiffusionModelError(
            f"scheduler {name!r} ({class_name}) cannot run split: both ends must take the same deterministic step. "
            f"Choose one of: {', '.join(SCHEDULERS)}")
    scheduler = getattr(diffusers, class_name).from_config(config)
    scheduler.set_timesteps(steps, device="cpu")
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    return scheduler


def scheduler_step(scheduler, noise: torch.Tensor, t: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """One denoising step; the same call on both ends, in float32 on the CPU, so both stay bit-identical."""
    scheduler.scale_model_input(latent, t)  # sets the step index on schedulers that keep one; result unused
    return scheduler.step(noise.float(), t, latent, return_dict=False)[0]


def latent_digest(latent: torch.Tensor) -> str:
    """A short hash of a latent's exact bits: the two ends compare theirs after the last step."""
    return hashlib.sha256(latent.detach().float().contiguous().numpy().tobytes()).hexdigest()[:32]


# ---- what travels: latent-shaped tensors go as (batch x channels, h x w) rows, one row per channel ----------
def to_rows(latent: torch.Tensor) -> torch.Tensor:
    b, c, h, w = latent.shape
    return latent.reshape(b * c, h * w)


def from_rows(rows: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
    return rows.reshape(shape)


@dataclass
class Conditioning:
    """The head's output: what the U-Net is conditioned on (the unconditional half first with guidance)."""
    embeds: torch.Tensor  # (B', L, cross_attention_dim)
    pooled: torch.Tensor | None = None  # SDXL: (B', pooled_dim)
    time_ids: torch.Tensor | None = None  # SDXL: (B', 6)

    def parts(self) -> dict[str, torch.Tensor]:
        out = {"prompt_embeds": self.embeds}
        if self.pooled is not None:
            out["pooled"] = self.pooled
            out["time_ids"] = self.time_ids
        return out


def part_names(kind: str) -> list[str]:
    """The uplink frames of an image session, in order; the initial latent comes last."""
    return ["prompt_embeds"] + (["pooled", "time_ids"] if kind == "sdxl" else []) + ["latent"]


UNET_FORMATS = ("fp32", "bf16", "fp16")


def body_format(name: str | WeightFormat | torch.dtype | None, device: torch.device) -> WeightFormat:
    """The format a U-Net is served in: fp32, bf16 or fp16 (None: fp16 on CUDA, fp32 elsewhere). Refused,
    before any weight loads, when it is quantized or when the device cannot run a U-Net's operations in it."""
    if name is None:
        return FORMATS["fp16" if device.type == "cuda" else "fp32"]
    fmt = parse_format(name)
    if fmt.quantized:
        raise WeightFormatError(f"{fmt.name} weights are for a language model's linear layers; a U-Net is served "
                                "in fp32, bf16 or fp16: use fp16 on CUDA, fp32 or bf16 on a CPU")
    problem = _probe_unet_ops(fmt.dtype, device)
    if problem:
        usable = [n for n in UNET_FORMATS if n != fmt.name and not _probe_unet_ops(FORMATS[n].dtype, device)]
        raise WeightFormatError(f"a U-Net cannot run in {fmt.name} on {device} with torch {torch.__version__} "
                                f"({problem}); use {' or '.join(usable) or 'another device'}")
    return fmt


def _probe_unet_ops(dtype: torch.dtype, device: torch.device) -> str:
    """Run a U-Net's kinds of operation (convolution, group norm, SiLU, attention, linear, upsampling) once on
    a tiny tensor in `dtype` on `device`; '' if they run and agree with float32, else what went wrong."""
    import torch.nn.functional as F

    def block(x, w, lin):
        y = F.silu(F.group_norm(F.conv2d(x, w, padding=1), 4))
        q = y.flatten(2).transpose(1, 2)
        y = y + F.linear(F.scaled_dot_product_attention(q, q, q), lin).transpose(1, 2).reshape(y.shape)
        return F.interpolate(y, scale_factor=2.0, mode="nearest")

    g = torch.Generator().manual_seed(0)
    x, w, lin = torch.randn(1, 8, 6, 6, generator=g), torch.randn(8, 8, 3, 3, generator=g) / 8, torch.eye(8)
    try:
        got = block(*(t.to(device, dtype) for t in (x, w, lin))).float().cpu()
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return first[:200]
    err = (got - block(x, w, lin)).abs().max().item()
    return "" if err < 0.1 else f"a probe block is off by {err:.3g}"


def _quiet_pipeline(cls, folder: Path, **none_components):
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # "you have disabled the safety checker", component-type notes
    dlogging.disable_progress_bar()  # loading a few small components needs no progress bars
    tlogging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls.from_pretrained(folder, **none_components)
    finally:
        dlogging.set_verbosity(level)
        dlogging.enable_progress_bar()
        tlogging.enable_progress_bar()


class ImageHead:
    """The device's first part: tokenizers and text encoders (on `device`), and the seeded initial latent (drawn
    on the CPU, so that a seed makes the same image on any device)."""

    def __init__(self, facts: PipelineFacts, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        diffusers = require("diffusers", "images")

        self.facts, self.dtype, self.device = facts, dtype, torch.device(device)
        skip = {"unet": None, "vae": None}
        if facts.kind == "sd":
            skip.update(safety_checker=None, feature_extractor=None, image_encoder=None,
                        requires_safety_checker=False)
            cls = diffusers.StableDiffusionPipeline
        else:
            skip.update(image_encoder=None, feature_extractor=None, add_watermarker=False)
            cls = diffusers.StableDiffusionXLPipeline
        self.pipe = _quiet_pipeline(cls, facts.folder, torch_dtype=dtype, **skip)
        self.pipe.to(self.device)

    @torch.inference_mode()
    def encode(self, prompt: str, options: ImageOptions, batch: int = 1) -> Conditioning:
        """The conditioning, on the CPU (where frames are encoded)."""
        cfg = self.facts.uses_guidance(options.guidance)
        if self.facts.kind == "sd":
            embeds, negative = self.pipe.encode_prompt(prompt, self.device, batch, cfg, options.negative)
            return Conditioning((torch.cat([negative, embeds]) if cfg else embeds).cpu())
        embeds, negative, pooled, negative_pooled = (None if t is None else t.cpu() for t in self.pipe.encode_prompt(
            prompt, device=self.device, num_images_per_prompt=batch, do_classifier_free_guidance=cfg,
            negative_prompt=options.negative))
        b, _, h, w = self.facts.latent_shape(options.height, options.width, batch)
        size = (h * self.facts.vae_scale_factor, w * self.facts.vae_scale_factor)
        # original size, crop top-left (0, 0), target size: diffusers' defaults for a plain text-to-image call
        time_ids = torch.tensor([list(size + (0, 0) + size)], dtype=embeds.dtype)
        if cfg:
            embeds, pooled = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])
            time_ids = torch.cat([time_ids, time_ids])
        return Conditioning(embeds, pooled, time_ids.repeat(batch, 1))

    def initial_latent(self, scheduler, options: ImageOptions, batch: int = 1) -> torch.Tensor:
        """Gaussian noise from the seed, scaled for the scheduler: what diffusers' `prepare_latents` draws."""
        from diffusers.utils.torch_utils import randn_tensor

        shape = self.facts.latent_shape(options.height, options.width, batch)
        generator = torch.Generator("cpu").manual_seed(options.seed)
        return randn_tensor(shape, generator=generator, dtype=torch.float32) * scheduler.init_noise_sigma


class ImageBody:
    """The cloud's part: the U-Net, with classifier-free guidance, on `device` in `dtype`. Nothing else of the
    pipeline is loaded. Inputs arrive as float32 CPU tensors and are moved there; the noise goes back as float32
    on the CPU."""

    def __init__(self, facts: PipelineFacts, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        UNet2DConditionModel = require("diffusers", "images").UNet2DConditionModel

        self.facts, self.dtype, self.device = facts, dtype, torch.device(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.unet = UNet2DConditionModel.from_pretrained(facts.folder, subfolder="unet", torch_dtype=dtype)
        self.unet.to(self.device).eval().requires_grad_(False)

    def parameters(self) -> tuple[int, int]:
        params = list(self.unet.parameters())
        return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)

    def place(self, cond: Conditioning) -> Conditioning:
        """The conditioning on the U-Net's device, in its dtype (a session does this once)."""
        def move(t):
            return None if t is None else t.to(self.device, self.dtype)
        return Conditioning(move(cond.embeds), move(cond.pooled), move(cond.time_ids))

    @torch.inference_mode()
    def predict(self, scheduler, latent: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                guidance: float) -> torch.Tensor:
        """The guided noise prediction for `latent` at timestep `t`, as float32 on the CPU."""
        cfg = self.facts.uses_guidance(guidance)
        x = torch.cat([latent] * 2) if cfg else latent
        x = scheduler.scale_model_input(x, t).to(self.device, self.dtype)
        cond = self.place(cond)  # a no-op for placed conditioning
        added = None if cond.pooled is None else {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
        noise = self.unet(x, t.to(self.device), encoder_hidden_states=cond.embeds, added_cond_kwargs=added,
                          return_dict=False)[0].float()  # guidance in float32, also for a bf16 / fp16 U-Net
        if cfg:
            uncond, text = noise.chunk(2)
            noise = uncond + guidance * (text - uncond)
        return noise.cpu()


class ImageTail:
    """The device's last part: the VAE decoder on `device`, latent -> pixels."""

    def __init__(self, facts: PipelineFacts, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        require("diffusers", "images")
        from diffusers import AutoencoderKL
        from diffusers.image_processor import VaeImageProcessor

        self.facts, self.device = facts, torch.device(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.vae = AutoencoderKL.from_pretrained(facts.folder, subfolder="vae", torch_dtype=dtype)
        self.vae.eval().requires_grad_(False)
        if dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False):
            self.vae.to(torch.float32)
        self.vae.to(self.device)
        self.processor = VaeImageProcessor(vae_scale_factor=facts.vae_scale_factor)

    @torch.inference_mode()
    def decode(self, latent: torch.Tensor, output_type: str = "pil"):
        """Latent -> images ("pil": a list of PIL images; "np": (B, H, W, 3) floats in [0, 1]; "pt", on the CPU)."""
        config = self.vae.config
        dtype = next(self.vae.post_quant_conv.parameters()).dtype
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            c = latent.shape[1]
            mean = torch.tensor(mean).view(1, c, 1, 1)
            std = torch.tensor(std).view(1, c, 1, 1)
            latent = latent * std / config.scaling_factor + mean
        else:
            latent = latent / config.scaling_factor
        image = self.vae.decode(latent.to(self.device, dtype), return_dict=False)[0].cpu()
        return self.processor.postprocess(image, output_type=output_type, do_denormalize=[True] * image.shape[0])


def noise_picture(noise: torch.Tensor):
    """A (C, h, w) or (1, C, h, w) noise tensor as an RGBA picture (Fig. 5(b)): each channel scaled to 0..255
    over +-3 of its standard deviations; channels past the fourth are dropped, missing ones opaque/black."""
    import numpy as np

    Image = require("PIL.Image", "images")

    x = noise.detach().float().cpu()
    x = x[0] if x.dim() == 4 else x
    planes = []
    for c in range(4):
        if c < x.shape[0]:
            ch = x[c]
            sd = float(ch.std()) or 1.0
            planes.append(((ch - ch.mean()) / (6 * sd) + 0.5).clamp(0, 1))
        else:
            planes.append(torch.ones_like(x[0]) if c == 3 else torch.zeros_like(x[0]))
    rgba = (torch.stack(planes, -1).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(rgba, "RGBA")
