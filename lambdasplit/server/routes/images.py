"""The text-to-image server's routes: what it holds, open and close an image session (JSON over HTTP), and
the session's WebSocket, which takes the inputs once and then streams the predicted noise step by step."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time

import psutil
from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect

from ...models.diffusion import SCHEDULERS, DiffusionModelError, ImageOptions, from_rows, make_scheduler, part_names
from ...wire.codecs import PARTS, Codec, CodecError, make_codec
from ...wire.frame import Frame, FrameError, decode_frame, encode_frame
from ...wire.protocol import PROTOCOL, SESSION_KEY_HEADER, ImageServerInfo, ImageSessionOpened, ImageSessionRequest
from ..auth import Principal
from ..image_sessions import ImageContext, ImageSession
from ..sessions import StepError
from .steps import refuse_upgrade

log = logging.getLogger("lambdasplit.server")


def image_sessions_router(ctx: ImageContext) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/info", response_model=ImageServerInfo)
    async def info(request: Request):
        ctx.who(request.headers)
        return image_server_info(ctx)

    @router.post("/v1/images", response_model=ImageSessionOpened)
    async def open_session(req: ImageSessionRequest, request: Request):
        return open_image_session(ctx, req, ctx.who(request.headers))

    @router.delete("/v1/images/{session_id}")
    async def close_session(session_id: str, request: Request):
        ctx.store.close(session_id, ctx.who(request.headers).key, request.headers.get(SESSION_KEY_HEADER))
        return {"closed": True}

    return router


def image_steps_router(ctx: ImageContext) -> APIRouter:
    router = APIRouter()

    @router.websocket("/v1/images/{session_id}/ws")
    async def ws_images(websocket: WebSocket, session_id: str):
        try:  # the token, the session and its key before the upgrade: a refused caller's bytes are never read
            session = ctx.store.get(session_id, ctx.who(websocket.headers).key,
                                    websocket.headers.get(SESSION_KEY_HEADER))
        except StepError as exc:
            ctx.metrics.inc("step_errors_total", code=exc.code)
            await refuse_upgrade(websocket, exc)
            return
        await websocket.accept()
        try:
            if session.step or session.parts:
                raise StepError("bad_step", "this session has already started; open a new one")
            await _make_image(ctx, websocket, session)
            ctx.metrics.inc("images_total")
        except StepError as exc:
            ctx.metrics.inc("step_errors_total", code=exc.code)
            with contextlib.suppress(Exception):
                error = Frame.error(exc.code, str(exc), step=session.step)
                await websocket.send_bytes(encode_frame(error))
        except WebSocketDisconnect:
            ctx.metrics.inc("images_abandoned_total")
            return
        finally:
            with contextlib.suppress(StepError):
                ctx.store.close(session.id, session.owner, session.key)
        with contextlib.suppress(Exception):
            await websocket.close()

    return router


def image_server_info(ctx: ImageContext) -> ImageServerInfo:
    facts, settings = ctx.facts, ctx.settings
    return ImageServerInfo(
        model_name=ctx.runtime.name, kind=facts.kind, latent_channels=facts.latent_channels,
        default_size=facts.default_size, vae_scale_factor=facts.vae_scale_factor,
        schedulers=["default", *SCHEDULERS], codecs=list(PARTS), max_frame_bytes=settings.max_frame_bytes,
        max_sessions=settings.max_sessions, sessions=len(ctx.store), auth=settings.tokens is not None,
        parameters=ctx.parameters, parameter_bytes=ctx.parameter_bytes,
        rss_bytes=psutil.Process().memory_info().rss, holds=["unet"], weights=ctx.runtime.weights.name,
        device=str(ctx.runtime.device))


def open_image_session(ctx: ImageContext, req: ImageSessionRequest, owner: Principal) -> ImageSessionOpened:
    """Check the request against this server's U-Net and options; open the session; the answer."""
    up, down, scheduler, shape = _check(ctx, req)
    cfg_batch = req.batch * (2 if ctx.facts.uses_guidance(req.guidance) else 1)
    session = ctx.store.add(factory=ImageSession, owner=owner.key, request=req, up=up, down=down,
                            scheduler=scheduler, shape=shape, cfg_batch=cfg_batch, key=secrets.token_urlsafe(32))
    ctx.metrics.inc("sessions_opened_total")
    log.info("image session opened", extra={"event": "session_open", "session": session.id[:8],
                                            "client": owner.name, "steps": req.steps, "up": up.name,
                                            "down": down.name})
    return ImageSessionOpened(session_id=session.id, key=session.key, steps=req.steps,
                              timesteps=[float(t) for t in scheduler.timesteps], latent_shape=list(shape),
                              parts=part_names(ctx.facts.kind), max_frame_bytes=ctx.settings.max_frame_bytes,
                              idle_ttl_s=ctx.settings.idle_ttl_s, weights=ctx.runtime.weights.name)


def _check(ctx: ImageContext, req: ImageSessionRequest) -> tuple[Codec, Codec, object, tuple[int, int, int, int]]:
    """The session's codecs, scheduler and latent shape; StepError 409 with every mismatch if it has any."""
    runtime, problems = ctx.runtime, []
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
        shape = ctx.facts.latent_shape(req.height, req.width, req.batch)
        scheduler = make_scheduler(ctx.facts, options.scheduler, options.steps)
    except DiffusionModelError as exc:
        problems.append(str(exc))
    if problems:
        ctx.metrics.inc("sessions_refused_total", reason="mismatch")
        raise StepError("mismatch", "; ".join(problems), 409)
    return up, down, scheduler, shape


async def _make_image(ctx: ImageContext, websocket: WebSocket, session: ImageSession) -> None:
    """Take the session's inputs from the device, then run every step on the compute thread and stream its
    noise frame down."""
    await _take_inputs(ctx, websocket, session)
    loop = asyncio.get_running_loop()
    latent = from_rows(session.parts["latent"], session.shape)
    for index in range(session.request.steps):
        if session.closed:
            raise StepError("unknown_session", "the session was closed", 404)
        try:
            data, latent = await loop.run_in_executor(ctx.compute, ctx.denoise, session, latent, index)
        except Exception as exc:  # noqa: BLE001 - the U-Net failed: this session ends, the server goes on
            log.exception("image step failed")
            raise StepError("internal", f"body failed ({type(exc).__name__}: {exc}); session closed", 500) from None
        session.step, session.last_used = index + 1, time.monotonic()
        try:
            await websocket.send_bytes(data)
        except Exception:  # noqa: BLE001 - the device went away (uvicorn raises its own types here)
            raise WebSocketDisconnect() from None
        ctx.metrics.inc("steps_total", transport="ws")
        ctx.metrics.inc("bytes_sent_total", len(data))


async def _take_inputs(ctx: ImageContext, websocket: WebSocket, session: ImageSession) -> None:
    """Receive the session's parts (prompt embeddings, ..., the initial latent), one checked frame each."""
    while len(session.parts) < len(part_names(ctx.facts.kind)):
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect()
        data = message.get("bytes")
        if data is None:
            raise StepError("malformed", "inputs are binary frames, not text messages")
        ctx.metrics.inc("bytes_received_total", len(data))
        try:
            frame = decode_frame(data, ctx.limits, codec=session.up, **session.next_bounds(ctx.facts))
        except FrameError as exc:
            raise StepError(exc.code, str(exc)) from None
        session.take(frame, ctx.facts)
