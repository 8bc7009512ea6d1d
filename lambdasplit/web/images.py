"""The image side of the web UI: text to image through a body server that holds only the U-Net.

    start  the model, the image size, the codecs, and the bytes that went up once (the prompt's
           embeddings and the initial latent)
    step   one per denoising step: its timestep, the bytes of its noise frame and of all so far, the
           image decoded from the latent so far, and the noise that crossed the network, as pictures
    done   why it ended (done, cancelled), the final image and the totals

The prompt is encoded and the image decoded here; neither crosses the network. The generation runs in
the caller's thread and reports through `emit`; `cancel` stops it between steps.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from dataclasses import dataclass, field

import torch

from ..client.images import DEFAULT_DOWN, DEFAULT_UP, ImageClient, ImageConnection, StepEvent
from ..client.transport import BodyError
from ..data import IMAGE_GUIDANCE, IMAGE_PROMPT, IMAGE_STEPS
from ..models.diffusion import ImageOptions, noise_picture
from ..wire.protocol import ImageServerInfo
from .streaming import Emit

# noise codecs the page offers (any other codec name is accepted too); see docs/wire.md
IMAGE_CODECS = ("fp32", "fp16", "bf16", "int8", "int6", "int4", "had+int4", "int2")
SMALL_SIDE = 64  # images up to this side are decoded every step; larger ones within PREVIEW_SHARE of the time
PREVIEW_SHARE = 0.2
NOISE_SIDE = 128  # noise pictures smaller than this are scaled up (nearest neighbour) so that they are visible
INFO_TIMEOUT_S = 3.0


class ImageDevice:
    """What the device holds for images: its copy of the pipeline's text encoder(s) and VAE (loaded at start)
    and the image server's description (fetched at start, and again while the server cannot be reached)."""

    def __init__(self, model: str | None, server: str, *, token: str | None = None, ca_bundle: str | None = None,
                 device: str = "auto"):
        self.server, self.token, self.ca_bundle = server, token, ca_bundle
        self.client = ImageClient(model, server=server, up=DEFAULT_UP, down=DEFAULT_DOWN, token=token,
                                  ca_bundle=ca_bundle, device=device)
        self.info: ImageServerInfo | None = None
        self.problem = ""
        self.server_info()

    def server_info(self) -> ImageServerInfo | None:
        """The image server's description; None (with `problem` saying why) while it cannot be reached or serves
        no image model."""
        if self.info is None:
            try:
                with ImageConnection(self.server, token=self.token, ca_bundle=self.ca_bundle,
                                     timeout=INFO_TIMEOUT_S) as conn:
                    self.info = conn.image_info()
            except (BodyError, OSError) as exc:
                self.problem = f"no image model from {self.server}: {exc}"
        return self.info

    def describe(self) -> dict:
        """What the page needs to draw the Image tab (`diffusion` false, with the reason, while unavailable)."""
        info = self.server_info()
        if info is None:
            return {"diffusion": False, "image": {"server": self.server, "problem": self.problem}}
        return {"diffusion": True,
                "image": {"server": self.server, "model": info.model_name, "device_model": self.client.facts.name,
                          "device": str(self.client.device), "body": f"{info.weights} on {info.device}",
                          "default_size": info.default_size, "schedulers": info.schedulers,
                          "codecs": list(dict.fromkeys([*IMAGE_CODECS, DEFAULT_DOWN])),
                          "defaults": {"prompt": IMAGE_PROMPT, "steps": IMAGE_STEPS, "guidance": IMAGE_GUIDANCE,
                                       "seed": 0, "up": DEFAULT_UP, "down": DEFAULT_DOWN}}}


@dataclass(frozen=True)
class ImageJob:
    """One image's settings, as the page sends them."""

    prompt: str
    options: ImageOptions
    up: str = DEFAULT_UP
    down: str = DEFAULT_DOWN


@dataclass
class Progress:
    """What a generation has done so far (the totals of its `done` event, also when it is stopped)."""

    started: float = field(default_factory=time.perf_counter)
    steps: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    cloud_s: float = 0.0
    decoding_s: float = 0.0
    latent: torch.Tensor | None = None  # after the last step taken

    def preview_due(self, event: StepEvent, side: int) -> bool:
        """Whether to decode this step's latent for the page: every step of a small image; for a large one
        while decoding has taken at most PREVIEW_SHARE of the time. Never the last (`done` carries it)."""
        if event.index == event.steps - 1:
            return False
        return side <= SMALL_SIDE or self.decoding_s <= PREVIEW_SHARE * (time.perf_counter() - self.started)


def run_image(images: ImageDevice, job: ImageJob, emit: Emit, cancel: threading.Event | None = None) -> None:
    """Generate `job` through the image server, emitting the events described above."""
    cancel = cancel or threading.Event()
    client = images.client.with_wire(job.up, job.down)  # a bad codec name fails here, before any event
    connections: list[ImageConnection] = []
    _watch_connections(client, connections)
    progress = Progress()
    side = max(job.options.height or client.facts.default_size, job.options.width or client.facts.default_size)

    def on_step(event: StepEvent) -> None:
        if event.index == 0:  # the session is open and the inputs went up: the generation has begun
            progress.bytes_up = connections[-1].traffic.frame_up
            emit(_start_event(client, job, progress))
        emit(_step_event(client, event, progress, side))

    finish, final = "done", None
    try:
        result = client.generate(job.prompt, job.options, on_step=on_step, should_stop=cancel.is_set)
        final = result.images[0]
    except BodyError as exc:
        if exc.code != "stopped" or progress.latent is None:
            raise
        finish = "cancelled"
    if final is None:
        final = client.tail.decode(progress.latent)[0]
    emit(_done_event(client, progress, finish, final))


def _watch_connections(client: ImageClient, seen: list) -> None:
    """Keep each connection `client` opens in `seen` (its uplink bytes are known once the first step arrives).
    `client` is this generation's own copy (`with_wire`), so nothing shared is touched."""
    connect = client.connect

    def watched() -> ImageConnection:
        seen.append(connect())
        return seen[-1]

    client.connect = watched


def _start_event(client: ImageClient, job: ImageJob, progress: Progress) -> dict:
    o = job.options
    height, width = (n or client.facts.default_size for n in (o.height, o.width))
    return {"type": "start", "model": client.facts.name, "steps": o.steps, "size": [height, width],
            "scheduler": o.scheduler, "guidance": o.guidance, "seed": o.seed,
            "wire": {"up": client.up_name, "down": client.down_name}, "bytes_up": progress.bytes_up}


def _step_event(client: ImageClient, event: StepEvent, progress: Progress, side: int) -> dict:
    """One step's figures and pictures; updates `progress`."""
    progress.steps, progress.latent = event.index + 1, event.latent
    progress.bytes_down += len(event.frame)
    progress.cloud_s += event.cloud_s
    step = {"type": "step", "index": event.index, "steps": event.steps, "t": round(event.t, 3),
            "bytes": len(event.frame), "bytes_down": progress.bytes_down, "cloud_ms": round(event.cloud_s * 1000, 1),
            "noise": png_data_url(noise_picture(event.noise), NOISE_SIDE)}
    if progress.preview_due(event, side):
        began = time.perf_counter()
        step["image"] = png_data_url(client.tail.decode(event.latent)[0])
        progress.decoding_s += time.perf_counter() - began
    return step


def _done_event(client: ImageClient, progress: Progress, finish: str, image) -> dict:
    return {"type": "done", "finish_reason": finish, "image": png_data_url(image), "steps": progress.steps,
            "seconds": round(time.perf_counter() - progress.started, 3), "cloud_s": round(progress.cloud_s, 3),
            "bytes_up": progress.bytes_up, "bytes_down": progress.bytes_down,
            "bytes_per_step": round(progress.bytes_down / max(progress.steps, 1), 1),
            "wire": {"up": client.up_name, "down": client.down_name}}


def png_data_url(picture, min_side: int = 0) -> str:
    """A PIL picture as a data: URL of a PNG, scaled up by a whole factor (nearest neighbour) to `min_side`."""
    from PIL import Image

    if min_side and max(picture.size) < min_side:
        k = -(-min_side // max(picture.size))
        picture = picture.resize((picture.width * k, picture.height * k), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
