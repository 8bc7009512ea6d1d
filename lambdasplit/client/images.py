"""The device side of text-to-image: the head and the tail run here, the U-Net on a body server.

    prompt ─ ImageHead.encode ──(embeddings)──────────▶ server
    seed ─ ImageHead.initial_latent ──(latent)────────▶ server
    latent ◀─ scheduler step ◀──(noise, every step)─── server
    image ◀─ ImageTail.decode ◀─ latent

The prompt never leaves the device as text, and the image never leaves it at all. What does leave
it (the text embeddings and the initial latent) is what a cloud U-Net needs; see docs/images.md for what
that reveals.

The text encoders and the VAE run on `device` (auto: a CUDA GPU when torch sees one), in float32; the seeded
initial latent and the scheduler steps stay float32 on the CPU, as on the server, so the two latents stay
bit-identical.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..models.device import resolve_device
from ..models.diffusion import (
    ImageHead,
    ImageOptions,
    ImageTail,
    PipelineFacts,
    from_rows,
    latent_digest,
    make_scheduler,
    scheduler_step,
    to_rows,
)
from ..models.source import resolve_image_model
from ..wire.codecs import Codec, CodecError, make_codec
from ..wire.frame import Frame, Limits, decode_frame, encode_frame, payload_size, reply_bounds
from ..wire.protocol import SESSION_KEY_HEADER, ImageServerInfo, ImageSessionOpened, ImageSessionRequest, WireFormat
from .options import ConnectionOptions
from .transport import BodyConnection, BodyError, Traffic

DEFAULT_UP, DEFAULT_DOWN = "fp16", "fp16"


class ImageConnection(BodyConnection):
    """A body connection to a text-to-image server: the inputs go up once, then noise frames stream down."""

    sessions_path = "/v1/images"

    def image_info(self) -> ImageServerInfo:
        info = self._json("GET", "/v1/info")
        if info.get("task") != "text-to-image":
            raise BodyError("mismatch", f"the server at {self.url} serves {info.get('model_name')}, a "
                                        f"{info.get('task', 'text-generation')} model, not a text-to-image one")
        return ImageServerInfo(**info)

    def open_image_session(self, request: ImageSessionRequest) -> ImageSessionOpened:
        if self.transport != "ws":
            raise BodyError("needs_ws", "image sessions stream their steps over a WebSocket")
        self.session = ImageSessionOpened(**self._json("POST", self.sessions_path, request.model_dump()))
        self._session_headers = {SESSION_KEY_HEADER: self.session.key} if self.session.key else {}
        self._connect_ws()
        return self.session

    def send(self, frame: bytes) -> None:
        """One of the inputs, up (the embeddings, then the initial latent)."""
        self._check_size(frame)
        self._ws_send(frame)
        self.traffic.frame_up += len(frame)

    def receive(self, limits: Limits, codec: Codec, **bounds) -> tuple[Frame, bytes]:
        """The next step's noise frame, decoded with the session's downlink `codec`, and its bytes (`bounds`:
        decode_frame's width and max_rows, those of the latent)."""
        reply = self._ws_receive("step")
        self.traffic.frame_down += len(reply)
        self.traffic.steps += 1
        self.last_frames = (self.last_frames[0], reply)
        frame = decode_frame(reply, limits, codec=codec, **bounds)
        if frame.kind == "error":
            raise BodyError(frame.code, frame.message)
        return frame, reply


@dataclass
class StepEvent:
    """One denoising step as the device saw it (what `on_step` callbacks get)."""
    index: int
    steps: int
    t: float
    noise: torch.Tensor  # the dequantized noise the device stepped with: (batch, C, h, w)
    latent: torch.Tensor  # the latent after the step
    frame: bytes  # the downlink frame as it crossed the network
    cloud_s: float  # the server's U-Net time for this step, as it reports it


@dataclass
class ImageResult:
    images: list  # PIL images
    latent: torch.Tensor
    steps: int
    up_codec: str
    down_codec: str
    frame_bytes_up: int  # what lambdasplit wrote (the embeddings and the initial latent)
    frame_bytes_down: int
    step_bytes: list[int] = field(default_factory=list)  # downlink frame bytes of each step
    step_payload_bytes: list[int] = field(default_factory=list)  # of which the noise itself (less the header)
    traffic: Traffic | None = None  # socket counts, headers included
    seconds: float = 0.0
    cloud_s: float = 0.0
    uplink_frames: list[bytes] = field(default_factory=list)
    body_weights: str = "fp32"  # the format the server's U-Net computed the noise in

    @property
    def noise_bytes_per_step(self) -> float:
        return sum(self.step_bytes) / max(len(self.step_bytes), 1)


class ImageClient:
    """Text-to-image through a body server: `ImageClient(server=URL).generate("a handwritten digit 7")`."""

    def __init__(self, model: str | None = None, *, server: str, up: str = DEFAULT_UP, down: str = DEFAULT_DOWN,
                 token: str | None = None, ca_bundle: str | None = None, timeout: float = 300.0,
                 device: str = "auto"):
        self.device = resolve_device(device)  # a device that is not here fails first, before anything loads
        self.folder = resolve_image_model(model)
        self.facts = PipelineFacts.read(self.folder)
        for name in (up, down):
            make_codec(name)  # a bad codec name fails here, before anything loads or connects
        self.server, self.up_name, self.down_name = server, up, down
        self.connection = ConnectionOptions(token=token, ca_bundle=ca_bundle, timeout=timeout)
        self.head = ImageHead(self.facts, device=self.device)
        self.tail = ImageTail(self.facts, device=self.device)
        self.fingerprint = self.facts.fingerprint()

    def connect(self) -> ImageConnection:
        return self.connection.connect(self.server, kind=ImageConnection)

    def with_wire(self, up: str | None = None, down: str | None = None) -> "ImageClient":
        """The same loaded head and tail over other codecs."""
        other = object.__new__(ImageClient)
        other.__dict__.update(self.__dict__)
        other.up_name, other.down_name = up or self.up_name, down or self.down_name
        for name in (other.up_name, other.down_name):
            make_codec(name)
        return other

    def generate(self, prompt: str, options: ImageOptions = ImageOptions(), *, batch: int = 1,
                 on_step: Callable[[StepEvent], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> ImageResult:
        started = time.perf_counter()
        options.check()
        shape = self.facts.latent_shape(options.height, options.width, batch)
        height, width = shape[2] * self.facts.vae_scale_factor, shape[3] * self.facts.vae_scale_factor
        scheduler = make_scheduler(self.facts, options.scheduler, options.steps)
        cond = self.head.encode(prompt, options, batch)
        latent = self.head.initial_latent(scheduler, options, batch)
        seed = secrets.randbits(62)  # the session's codec seed ('had' rotations): fresh each time
        try:
            up, down = make_codec(self.up_name, seed=seed), make_codec(self.down_name, seed=seed)
        except CodecError as exc:
            raise BodyError("codec", str(exc)) from None
        request = ImageSessionRequest(model_fingerprint=self.fingerprint, scheduler=options.scheduler,
                                      steps=options.steps, guidance=options.guidance, height=height, width=width,
                                      batch=batch, wire=WireFormat(up=up.name, down=down.name, seed=seed))
        with self.connect() as conn:
            opened = conn.open_image_session(request)
            ours = [float(t) for t in scheduler.timesteps]
            if opened.timesteps != ours or tuple(opened.latent_shape) != shape:
                raise BodyError("mismatch", "the server's scheduler or latent shape differs from this device's "
                                            f"(timesteps {opened.timesteps[:3]}… vs {ours[:3]}…); are both on the "
                                            "same diffusers version and model?")
            limits = Limits(max_frame_bytes=opened.max_frame_bytes)
            uplink = []
            for name, tensor in cond.parts().items():
                uplink.append(encode_frame(Frame("hidden", tensor=tensor, codec=up, extra={"part": name})))
            uplink.append(encode_frame(Frame("hidden", tensor=to_rows(latent), codec=up, extra={"part": "latent"})))
            # start from the latent the body decodes, not ours: with a lossy uplink the two would differ
            latent = from_rows(decode_frame(uplink[-1], limits, codec=up).tensor, shape)
            for data in uplink:
                conn.send(data)
            step_bytes, payload_bytes, cloud_s = [], [], 0.0
            for index, t in enumerate(scheduler.timesteps):
                if should_stop is not None and should_stop():
                    raise BodyError("stopped", f"stopped after {index} of {options.steps} steps")
                frame, raw = conn.receive(limits, down, **reply_bounds(uplink[-1]))
                if frame.step != index or tuple(frame.tensor.shape) != (shape[0] * shape[1], shape[2] * shape[3]):
                    raise BodyError("malformed", f"expected the noise of step {index}, shape "
                                                 f"{[shape[0] * shape[1], shape[2] * shape[3]]}; got step "
                                                 f"{frame.step}, shape {list(frame.tensor.shape)}")
                noise = from_rows(frame.tensor, shape)
                latent = scheduler_step(scheduler, noise, t, latent)
                step_bytes.append(len(raw))
                payload_bytes.append(payload_size(raw))
                step_cloud = frame.extra.get("cloud_us", 0) / 1e6 if isinstance(frame.extra.get("cloud_us"), int) else 0.0
                cloud_s += step_cloud
                if on_step is not None:
                    on_step(StepEvent(index, options.steps, float(t), noise, latent, raw, step_cloud))
                if index == options.steps - 1 and frame.extra.get("mirror") != latent_digest(latent):
                    raise BodyError("drift", "the server's latent and this device's differ after the last step: "
                                             "the two ends did not take the same scheduler steps")
            traffic = conn.measured()
        images = self.tail.decode(latent)
        return ImageResult(images=images, latent=latent, steps=options.steps, up_codec=up.name, down_codec=down.name,
                           frame_bytes_up=traffic.frame_up, frame_bytes_down=traffic.frame_down,
                           step_bytes=step_bytes, step_payload_bytes=payload_bytes, traffic=traffic, seconds=time.perf_counter() - started,
                           cloud_s=cloud_s, uplink_frames=uplink, body_weights=opened.weights)
