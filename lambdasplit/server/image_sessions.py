"""The U-Net a text-to-image server holds (ImageRuntime), one image's session (ImageSession), and what the
routes of its app share (ImageContext), with the step that runs on its compute thread."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import psutil
import torch

from ..models.device import device_name, resolve_device
from ..models.diffusion import (
    Conditioning,
    ImageBody,
    PipelineFacts,
    body_format,
    from_rows,
    latent_digest,
    part_names,
    scheduler_step,
    to_rows,
)
from ..util.threads import take_over
from ..wire.codecs import Codec
from ..wire.frame import Frame, decode_frame, encode_frame
from ..wire.protocol import ImageSessionRequest
from .context import ServerContext, ServerSettings
from .sessions import SessionStore, StepError

MAX_TEXT_TOKENS = 1024  # the longest prompt embedding a session may send (CLIP's is 77)


class ImageRuntime:
    """The U-Net of one pipeline folder on one device, and the facts a session must match.

    `weights` is fp32, bf16 or fp16 (or float32, bfloat16, float16); None: fp16 on CUDA, fp32 elsewhere.
    A device that is not here (DeviceError) or a format the U-Net cannot take there (WeightFormatError) is
    refused before any weight loads."""

    def __init__(self, facts: PipelineFacts, weights: str | None = None, device: str = "auto"):
        self.device = resolve_device(device)
        self.weights = body_format(weights, self.device)
        self.facts, self.dtype_name = facts, str(self.weights.dtype).removeprefix("torch.")
        self.body = ImageBody(facts, self.weights.dtype, self.device)
        self.name = facts.name
        self.fingerprint = facts.fingerprint()

    def describe(self) -> str:
        return f"{self.weights.name} on {device_name(self.device)}"


@dataclass
class ImageSession:
    id: str
    owner: str
    request: ImageSessionRequest
    up: Codec
    down: Codec
    scheduler: object
    shape: tuple[int, int, int, int]
    cfg_batch: int  # rows of the conditioning: 2 x batch with guidance, else batch
    reserved: int = 0
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    placed: Conditioning | None = None  # the conditioning on the U-Net's device and dtype, once all parts are in
    step: int = 0
    last_used: float = field(default_factory=time.monotonic)
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    key: str = field(default="", repr=False)  # the session key: only its opener has it (as for text sessions)

    def release(self) -> None:
        self.parts, self.placed = {}, None

    def expected_shape(self, part: str, facts: PipelineFacts, tokens: int) -> tuple[int, ...]:
        b, c, h, w = self.shape
        return {"prompt_embeds": (self.cfg_batch, tokens, facts.cross_attention_dim),
                "pooled": (self.cfg_batch, facts.pooled_dim), "time_ids": (self.cfg_batch, 6),
                "latent": (b * c, h * w)}[part]

    def next_bounds(self, facts: PipelineFacts) -> dict:
        """decode_frame's bounds for the part the session waits for next: its width and most rows."""
        names = part_names(facts.kind)
        if len(self.parts) >= len(names):
            return {"max_rows": 0}
        name = names[len(self.parts)]
        want = self.expected_shape(name, facts, MAX_TEXT_TOKENS)
        rows = 1
        for s in want[:-1]:
            rows *= s
        return {"width": want[-1], "max_rows": rows}

    def take(self, frame: Frame, facts: PipelineFacts) -> str:
        """Check an uplink frame against the part the session waits for; keep it. Returns the part's name."""
        names = part_names(facts.kind)
        if len(self.parts) >= len(names):
            raise StepError("bad_step", "the session has all its inputs; it only streams noise now")
        name = names[len(self.parts)]
        if frame.kind != "hidden":
            raise StepError("bad_kind", f"expected a 'hidden' frame with the {name}, got {frame.kind!r}")
        if frame.extra.get("part") != name:
            raise StepError("bad_part", f"expected the part {name!r} next, got {frame.extra.get('part')!r} "
                                        f"(the order is {', '.join(names)})")
        if frame.codec != self.up.name:
            raise StepError("bad_codec", f"this session's uplink codec is {self.up.name}, the frame is {frame.codec}")
        shape = tuple(frame.tensor.shape)
        tokens = shape[1] if name == "prompt_embeds" and len(shape) == 3 else 0
        if name == "prompt_embeds" and not 1 <= tokens <= MAX_TEXT_TOKENS:
            raise StepError("bad_shape", f"prompt_embeds must be ({self.cfg_batch}, 1..{MAX_TEXT_TOKENS}, "
                                         f"{facts.cross_attention_dim}), got {list(shape)}")
        want = self.expected_shape(name, facts, tokens)
        if shape != want:
            raise StepError("bad_shape", f"{name} must have shape {list(want)}, got {list(shape)}")
        if not bool(torch.isfinite(frame.tensor).all()):
            raise StepError("bad_values", f"{name} holds values that are not finite")
        self.parts[name] = frame.tensor
        self.last_used = time.monotonic()
        return name

    def conditioning(self) -> Conditioning:
        return Conditioning(self.parts["prompt_embeds"], self.parts.get("pooled"), self.parts.get("time_ids"))


class ImageContext(ServerContext):
    """One text-to-image server's state: the U-Net, its sessions (no KV-cache budget: a session holds its
    inputs and a latent), and the compute thread the U-Net runs on (one OpenMP team; sessions take turns
    step by step)."""

    def __init__(self, runtime: ImageRuntime, settings: ServerSettings):
        super().__init__(settings, SessionStore(settings.max_sessions, settings.idle_ttl_s, None))
        self.runtime, self.facts, self.body = runtime, runtime.facts, runtime.body
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lambdasplit-unet", initializer=take_over)
        store = self.store
        self.metrics.gauges.update(sessions=lambda: len(store), rss_bytes=lambda: psutil.Process().memory_info().rss)
        self.parameters, self.parameter_bytes = self.body.parameters()

    def close(self) -> None:
        self.compute.shutdown(wait=False, cancel_futures=True)

    def denoise(self, session: ImageSession, latent: torch.Tensor, index: int) -> tuple[bytes, torch.Tensor]:
        """On the compute thread: predict, encode, decode our own bytes, step the mirror."""
        started = time.perf_counter()
        t = session.scheduler.timesteps[index]
        if session.placed is None:
            session.placed = self.body.place(session.conditioning())
        noise = self.body.predict(session.scheduler, latent, t, session.placed, session.request.guidance)
        extra = {"cloud_us": int((time.perf_counter() - started) * 1e6)}  # the timestep is known: not resent
        data = encode_frame(Frame("hidden", step=index, tensor=to_rows(noise), codec=session.down, extra=extra))
        received = decode_frame(data, self.limits, codec=session.down).tensor  # exactly what the device will use
        latent = scheduler_step(session.scheduler, from_rows(received, session.shape), t, latent)
        if index == session.request.steps - 1:  # the last frame also says where the mirror ended: a drift check
            extra["mirror"] = latent_digest(latent)
            data = encode_frame(Frame("hidden", step=index, tensor=to_rows(noise), codec=session.down, extra=extra))
        return data, latent
