"""The device's local web app: the page, its JSON/SSE API, and the OpenAI-compatible API.

    GET  /                     the page (plain HTML, CSS and JS modules, all served from here)
    GET  /api/info             the model, the body server's range, default split and codecs
    GET  /api/leakage?x=&y=    what the privacy assessment measured for a split (null if not assessed)
    POST /api/chat             a generation, as server-sent events (see chat.py)
    POST /api/chat/{id}/stop   stop that generation after its current round trip
    POST /api/image            an image through the image server, as server-sent events (see images.py)
    POST /api/image/{id}/stop  stop that image after its current step
    POST /api/attack           what the strongest assessed attack reads back from uplink frames (readback.py)
    GET  /device/*, POST /api/body-session   with the device in the page (--in-browser; tab.py)
    /v1/...                    the OpenAI-compatible API (openai_api.py, completions.py)
    GET  /health, /healthz     liveness;  GET /metrics  Prometheus counters (metrics.py)

It listens on loopback by default, and refuses requests that name another host (DNS rebinding) or come
from another site's page (a foreign Origin): other pages in the user's browser must not be able to
read the user's chats or drive the model. guard.py has these checks and what --allow-host and
--allow-origin open.
"""

from __future__ import annotations

import json
import secrets
import threading
from dataclasses import replace
from importlib.resources import files

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from ..data import IMAGE_GUIDANCE, IMAGE_STEPS
from ..models.diffusion import MAX_GUIDANCE, MAX_STEPS, ImageOptions
from . import streaming
from .chat import run_chat
from .completions import completions_router
from .device import Device
from .guard import guard
from .images import ImageDevice, ImageJob, run_image
from .metrics import WebMetrics
from .openai_api import Api, ApiError, Message, error_code, router
from .readback import MAX_BYTES, MAX_FRAMES, ReadBack, ReadBackError

STATIC = files("lambdasplit.web") / "static"


class ChatBody(BaseModel):
    """What the page sends to start a generation."""

    model_config = ConfigDict(extra="forbid")
    messages: list[Message] = Field(min_length=1)
    x: int | None = None
    y: int | None = None
    up: str | None = Field(None, max_length=200)
    down: str | None = Field(None, max_length=200)
    max_tokens: int = Field(256, ge=1, le=8192)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    seed: int | None = None


class AttackBody(BaseModel):
    """Uplink frames to read back: the states entering `layer`, as the page sent them (base64 each)."""

    model_config = ConfigDict(extra="forbid")
    layer: int
    frames: list[str] = Field(min_length=1, max_length=MAX_FRAMES)


class ImageBody(BaseModel):
    """What the page sends to start an image (`codec`: the noise's, down; `up`: the inputs', sent once)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=2000)
    steps: int = Field(IMAGE_STEPS, ge=1, le=MAX_STEPS)
    seed: int = Field(0, ge=0, lt=2**63)
    guidance: float = Field(IMAGE_GUIDANCE, ge=0, le=MAX_GUIDANCE)
    codec: str | None = Field(None, max_length=200)
    up: str | None = Field(None, max_length=200)
    scheduler: str = Field("default", max_length=40)

    def job(self) -> ImageJob:
        options = ImageOptions(steps=self.steps, guidance=self.guidance, scheduler=self.scheduler, seed=self.seed)
        return ImageJob(self.prompt, options, **{k: v for k, v in (("up", self.up), ("down", self.codec)) if v})


def create_app(device: Device, api_key: str | None = None, images: ImageDevice | None = None, *,
               names: tuple[str, ...] = (), allow_hosts: tuple[str, ...] = (),
               allow_origins: tuple[str, ...] = (), tab=None) -> FastAPI:
    """The page, its API (chat, images, their stop routes), the OpenAI-compatible API (answering to `names`,
    by default the model's name), health and metrics; for loopback and the `allow_hosts` names only, with
    CORS for the `allow_origins` on the API (guard.py). With `tab` (tab.TabDevice), the page can run the
    device itself."""
    app = FastAPI(title="lambdasplit device", docs_url=None, redoc_url=None, openapi_url=None)
    guard(app, allow_hosts, allow_origins)
    if tab is not None:
        tab.install(app)
    api = Api(device, api_key, names, WebMetrics())

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(str(STATIC / "index.html"), headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    runs = Runs()
    readback = ReadBack(device.folder, device.num_layers, device.hidden_size)
    app.include_router(page_api(device, images, runs, api.metrics, readback, tab))
    app.include_router(runs.router())
    app.include_router(router(api))
    app.include_router(completions_router(api))
    app.include_router(api.metrics.router(api.check_key))
    return app


def page_api(device: Device, images: ImageDevice | None, runs: "Runs", metrics: WebMetrics, readback: ReadBack,
             tab=None) -> APIRouter:
    """The page's own API: what the device holds, the measured leakage, generations as event streams, and
    the read-back of uplink frames."""
    api = APIRouter(prefix="/api")

    @api.get("/info")
    def info():
        return {**device.describe(), **(images.describe() if images else {}), **(tab.describe() if tab else {})}

    @api.get("/leakage")
    def leakage(x: int, y: int):
        return {"leakage": device.leakage(x, y)}

    @api.post("/chat")
    async def chat(request: Request):
        body = await _parse(request, ChatBody)
        d = device.defaults
        options = replace(d, x=d.x if body.x is None else body.x, y=d.y if body.y is None else body.y,
                          up=body.up or d.up, down=body.down or d.down, max_tokens=body.max_tokens,
                          temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed)
        messages = [m.chat() for m in body.messages]
        cancel = threading.Event()
        return await runs.stream(streaming.start(
            lambda: metrics.track("page", run_chat(device, messages, options, cancel, readback), error_code), cancel))

    @api.post("/attack")
    async def attack(request: Request):
        if int(request.headers.get("content-length") or 0) > 2 * MAX_BYTES:  # base64 and JSON around the frames
            raise ApiError(413, f"the frames exceed {MAX_BYTES >> 20} MiB", code="too_large")
        body = await _parse(request, AttackBody)
        try:
            return await run_in_threadpool(readback.from_frames, body.layer, body.frames)
        except ReadBackError as exc:
            raise ApiError(400, str(exc), code="bad_frames") from None

    @api.post("/image")
    async def image(request: Request):
        if images is None:
            raise ApiError(404, "this app has no image server (start it with --image-server URL)",
                           code="no_image_server")
        job = (await _parse(request, ImageBody)).job()
        if await run_in_threadpool(images.server_info) is None:  # not reached yet: try now, off the event loop
            raise ApiError(503, images.problem, "server_error", code="image_server_unreachable")
        cancel = threading.Event()
        return await runs.stream(streaming.start_emitting(lambda emit: run_image(images, job, emit, cancel), cancel))

    return api


class Runs:
    """The generations in flight, by id, so that the page can stop one."""

    def __init__(self):
        self.cancels: dict[str, threading.Event] = {}

    async def stream(self, events: streaming.Events) -> StreamingResponse:
        """A generation's events as server-sent events, the first with the run's id (for its stop route). An
        error before the first event is answered as an HTTP error; a later one as an `error` event."""
        first = await events.first()
        if isinstance(first, streaming.Failed) or first is None:
            raise ApiError.of(first.error if first else RuntimeError("the generation ended before it began"))
        run_id = secrets.token_hex(8)
        self.cancels[run_id] = events.cancel

        async def sse():
            try:
                yield _sse({**first, "id": run_id})
                async for event in events.rest():
                    if isinstance(event, streaming.Failed):
                        yield _sse({"type": "error", **ApiError.of(event.error).body()["error"]})
                        return
                    yield _sse(event)
            finally:
                self.cancels.pop(run_id, None)
                events.stop()  # the page went away (or the run is complete): stop generating

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def router(self) -> APIRouter:
        api = APIRouter(prefix="/api")

        @api.post("/chat/{run_id}/stop")
        @api.post("/image/{run_id}/stop")
        def stop(run_id: str):
            cancel = self.cancels.get(run_id)
            if cancel is None:
                raise ApiError(404, f"no running generation {run_id!r} (it may have finished)", code="unknown_run")
            cancel.set()
            return Response(status_code=204)

        return api


def _sse(event: dict) -> str:
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n"


async def _parse(request: Request, model: type[BaseModel]):
    """The request's JSON body as `model`; a clear 400 when it is not valid JSON or not a valid `model`."""
    try:
        return model.model_validate(await request.json())
    except ValueError as exc:  # ValidationError is a ValueError; so is bad JSON
        raise ApiError(400, _validation_message(exc)) from None


def _validation_message(exc: ValueError) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
    return "the request body is not valid JSON"
