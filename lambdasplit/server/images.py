"""The body server of a text-to-image model: the U-Net with classifier-free guidance, and a mirror latent.

One session makes one image (or a small batch from one prompt):

    device ──prompt_embeds (+ pooled, time_ids for SDXL), then the initial latent──▶ server   (once)
    device ◀──predicted noise of step 0, 1, ..., steps-1, streamed────────────────── server

Per step the server predicts the guided noise, encodes it with the session's downlink codec, decodes
those very bytes, steps its own copy of the latent (the mirror) with the decoded noise, and sends the
frame. The device steps its latent with the same decoded noise, so the two never drift, however lossy
the codec. The server holds the U-Net only: never the text encoders, the tokenizers or the VAE, so it
never sees the prompt as text, nor the image as pixels (it could decode its mirror latent with a
public VAE: see the README on what this does and does not hide).

The U-Net runs on one compute thread (one OpenMP team), one step at a time; concurrent sessions take
turns step by step. A device that goes away stops its session at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import psutil
import torch
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response

from ..models.diffusion import (SCHEDULERS, Conditioning, DiffusionModelError, ImageBody, ImageOptions,
                                PipelineFacts, from_rows, latent_digest, make_scheduler, part_names, scheduler_step,
                                to_rows)
from ..models.llm import DTYPES
from ..wire.codecs import PARTS, Codec, CodecError, make_codec
from ..wire.frame import Frame, FrameError, Limits, decode_frame, encode_frame
from ..wire.protocol import PROTOCOL, ImageServerInfo, ImageSessionOpened, ImageSessionRequest
from .app import ServerSettings
from .auth import ANONYMOUS, AuthError, Principal
from .metrics import Metrics
from .sessions import SessionStore, StepError

log = logging.getLogger("lambdasplit.server")
MAX_TEXT_TOKENS = 1024  # the longest prompt embedding a session may send (CLIP's is 77)


class ImageRuntime:
    """The U-Net of one pipeline folder, and the facts a session must match."""

    def __init__(self, facts: PipelineFacts, dtype: str = "float32", device: str = "cpu"):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
        self.facts, self.dtype_name = facts, dtype
        self.body = ImageBody(facts, DTYPES[dtype], device)
        self.name = facts.name
        self.fingerprint = facts.fingerprint()


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
    step: int = 0
    last_used: float = field(default_factory=time.monotonic)
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def release(self) -> None:
        self.parts = {}

    def expected_shape(self, part: str, facts: PipelineFacts, tokens: int) -> tuple[int, ...]:
        b, c, h, w = self.shape
        return {"prompt_embeds": (self.cfg_batch, tokens, facts.cross_attention_dim),
                "pooled": (self.cfg_batch, facts.pooled_dim), "time_ids": (self.cfg_batch, 6),
                "latent": (b * c, h * w)}[part]

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


def create_image_app(runtime: ImageRuntime, settings: ServerSettings = ServerSettings()) -> FastAPI:
    facts, body = runtime.facts, runtime.body
    limits = Limits(max_frame_bytes=settings.max_frame_bytes)
    store = SessionStore(settings.max_sessions, settings.idle_ttl_s, None)
    metrics = Metrics()
    compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lambdasplit-unet")
    metrics.gauges.update(sessions=lambda: len(store), rss_bytes=lambda: psutil.Process().memory_info().rss)
    params, param_bytes = body.parameters()

    def who(headers) -> Principal:
        if settings.tokens is None:
            return ANONYMOUS
        try:
            return settings.tokens.check(headers.get("authorization"))
        except AuthError as exc:
            metrics.inc("unauthorized_total")
            raise StepError("unauthorized", str(exc), 401) from None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async def reap():
            while True:
                await asyncio.sleep(min(5.0, settings.idle_ttl_s / 2))
                store.expire_idle()

        task = asyncio.create_task(reap())
        yield
        task.cancel()
        compute.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="lambdasplit body server (text-to-image)", version=PROTOCOL, lifespan=lifespan)
    app.state.store, app.state.metrics = store, metrics

    @app.exception_handler(StepError)
    async def step_error(_: Request, exc: StepError):
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else {}
        if exc.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="lambdasplit"'
        return JSONResponse({"error": exc.code, "message": str(exc)}, status_code=exc.status, headers=headers)

    @app.get("/v1/health")
    @app.get("/healthz")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus(request: Request):
        who(request.headers)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/info", response_model=ImageServerInfo)
    async def info(request: Request):
        who(request.headers)
        return ImageServerInfo(
            model_name=runtime.name, kind=facts.kind, latent_channels=facts.latent_channels,
            default_size=facts.default_size, vae_scale_factor=facts.vae_scale_factor,
            schedulers=["default", *SCHEDULERS], codecs=list(PARTS), max_frame_bytes=settings.max_frame_bytes,
            max_sessions=settings.max_sessions, sessions=len(store), auth=settings.tokens is not None,
            parameters=params, parameter_bytes=param_bytes, rss_bytes=psutil.Process().memory_info().rss,
            holds=["unet"])

    @app.post("/v1/images", response_model=ImageSessionOpened)
    async def open_session(req: ImageSessionRequest, request: Request):
        owner = who(request.headers)
        problems = []
        if req.protocol != PROTOCOL:
            problems.append(f"protocol {req.protocol!r} is not {PROTOCOL!r}")
        if req.model_fingerprint != runtime.fingerprint:
            problems.append(f"model mismatch: the U-Net of {runtime.name} here has fingerprint "
                            f"{runtime.fingerprint[:16]}…, the client's has {req.model_fingerprint[:16]}…")
        up = down = scheduler = shape = None
        try:
            up, down = (make_codec(name, seed=req.wire.seed) for name in (req.wire.up, req.wire.down))
        except CodecError as exc:
            problems.append(f"codec: {exc}")
        try:
            options = ImageOptions(steps=req.steps, guidance=req.guidance, scheduler=req.scheduler,
                                   height=req.height, width=req.width).check()
            shape = facts.latent_shape(req.height, req.width, req.batch)
            scheduler = make_scheduler(facts, options.scheduler, options.steps)
        except DiffusionModelError as exc:
            problems.append(str(exc))
        if problems:
            metrics.inc("sessions_refused_total", reason="mismatch")
            raise StepError("mismatch", "; ".join(problems), 409)
        cfg_batch = req.batch * (2 if facts.uses_guidance(req.guidance) else 1)
        session = store.add(factory=ImageSession, owner=owner.key, request=req, up=up, down=down,
                            scheduler=scheduler, shape=shape, cfg_batch=cfg_batch)
        metrics.inc("sessions_opened_total")
        log.info("image session opened", extra={"event": "session_open", "session": session.id[:8],
                                                "client": owner.name, "steps": req.steps, "up": up.name,
                                                "down": down.name})
        return ImageSessionOpened(session_id=session.id, steps=req.steps,
                                  timesteps=[float(t) for t in scheduler.timesteps], latent_shape=list(shape),
                                  parts=part_names(facts.kind), max_frame_bytes=settings.max_frame_bytes,
                                  idle_ttl_s=settings.idle_ttl_s)

    @app.delete("/v1/images/{session_id}")
    async def close_session(session_id: str, request: Request):
        store.close(session_id, who(request.headers).key)
        return {"closed": True}

    def run_step(session: ImageSession, latent: torch.Tensor, index: int) -> tuple[bytes, torch.Tensor]:
        """On the compute thread: predict, encode, decode our own bytes, step the mirror."""
        started = time.perf_counter()
        t = session.scheduler.timesteps[index]
        noise = body.predict(session.scheduler, latent, t, session.conditioning(), session.request.guidance)
        extra = {"cloud_us": int((time.perf_counter() - started) * 1e6)}  # the timestep is known: not resent
        data = encode_frame(Frame("hidden", step=index, tensor=to_rows(noise), codec=session.down, extra=extra))
        received = decode_frame(data, limits, codec=session.down).tensor  # exactly what the device will use
        latent = scheduler_step(session.scheduler, from_rows(received, session.shape), t, latent)
        if index == session.request.steps - 1:  # the last frame also says where the mirror ended: a drift check
            extra["mirror"] = latent_digest(latent)
            data = encode_frame(Frame("hidden", step=index, tensor=to_rows(noise), codec=session.down, extra=extra))
        return data, latent

    async def serve(websocket: WebSocket, session: ImageSession) -> None:
        loop = asyncio.get_running_loop()
        while len(session.parts) < len(part_names(facts.kind)):
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                raise WebSocketDisconnect()
            data = message.get("bytes")
            if data is None:
                raise StepError("malformed", "inputs are binary frames, not text messages")
            metrics.inc("bytes_received_total", len(data))
            try:
                frame = decode_frame(data, limits, codec=session.up)
            except FrameError as exc:
                raise StepError(exc.code, str(exc)) from None
            session.take(frame, facts)
        latent = from_rows(session.parts["latent"], session.shape)
        for index in range(session.request.steps):
            if session.closed:
                raise StepError("unknown_session", "the session was closed", 404)
            try:
                data, latent = await loop.run_in_executor(compute, run_step, session, latent, index)
            except Exception as exc:  # noqa: BLE001 - the U-Net failed: this session ends, the server goes on
                log.exception("image step failed")
                raise StepError("internal", f"body failed ({type(exc).__name__}: {exc}); session closed", 500) from None
            session.step, session.last_used = index + 1, time.monotonic()
            try:
                await websocket.send_bytes(data)
            except Exception:  # noqa: BLE001 - the device went away (uvicorn raises its own types here)
                raise WebSocketDisconnect() from None
            metrics.inc("steps_total", transport="ws")
            metrics.inc("bytes_sent_total", len(data))

    @app.websocket("/v1/images/{session_id}/ws")
    async def ws_images(websocket: WebSocket, session_id: str):
        await websocket.accept()
        session = None
        try:
            session = store.get(session_id, who(websocket.headers).key)
            if session.step or session.parts:
                raise StepError("bad_step", "this session has already started; open a new one")
            await serve(websocket, session)
            metrics.inc("images_total")
        except StepError as exc:
            metrics.inc("step_errors_total", code=exc.code)
            with contextlib.suppress(Exception):
                await websocket.send_bytes(encode_frame(Frame.error(exc.code, str(exc), step=getattr(session, "step", 0))))
        except WebSocketDisconnect:
            metrics.inc("images_abandoned_total")
            return
        finally:
            if session is not None:
                with contextlib.suppress(StepError):
                    store.close(session.id, session.owner)
        with contextlib.suppress(Exception):
            await websocket.close()

    return app
