"""The body server: FastAPI app over one loaded body and its sessions.

Session management is plain JSON over HTTP; steps are binary frames over one WebSocket per
session, or one HTTP POST per step where WebSockets cannot pass. The model runs on one dedicated
compute thread: the event loop stays free for I/O, and torch keeps a single team of worker threads
(each new calling thread would get its own OpenMP team, and idle teams spin on the same cores).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response

from ..models.llm import DTYPES, load_split
from ..models.source import model_name
from ..wire.codecs import PARTS, CodecError, session_codecs
from ..wire.frame import Frame, FrameError, Limits, decode_frame, encode_frame
from ..wire.lowrank import Basis
from ..wire.protocol import PROTOCOL, ServerInfo, SessionOpened, SessionRequest
from .sessions import Session, SessionStore, StepError

log = logging.getLogger("lambdasplit.server")
FRAME_TYPE = "application/x-lambdasplit-frame"


@dataclass(frozen=True)
class ServerSettings:
    max_sessions: int = 64
    idle_ttl_s: float = 600.0
    max_frame_bytes: int = 64 << 20
    max_positions: int | None = None  # default: the model's context length

    def __post_init__(self):
        for name in ("max_sessions", "idle_ttl_s", "max_frame_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_positions is not None and self.max_positions <= 0:
            raise ValueError(f"max_positions must be positive, got {self.max_positions}")


class BodyRuntime:
    """One body (layers [x, y) of one model), and the facts a session must match."""

    def __init__(self, folder: Path, x: int, y: int, dtype: str = "float32", basis: str | Path | None = None):
        self.dtype_name = dtype
        self.model = load_split(folder, x, y, parts=("body",), dtype=dtype)
        self.split = self.model.split
        self.name = model_name(folder)
        self.basis = Basis.load(basis) if basis else None
        if self.basis is not None and self.basis.hidden_size != self.model.hidden_size:
            raise ValueError(f"basis {basis} is for hidden size {self.basis.hidden_size}, the model has "
                             f"{self.model.hidden_size}")
        self._fingerprints: dict[tuple[int, int], str] = {}

    def fingerprint(self, x: int, y: int) -> str:
        if (x, y) not in self._fingerprints:
            self._fingerprints[(x, y)] = self.model.body_fingerprint(x, y)
        return self._fingerprints[(x, y)]


def create_app(runtime: BodyRuntime, settings: ServerSettings = ServerSettings()) -> FastAPI:
    model = runtime.model
    limits = Limits(max_frame_bytes=settings.max_frame_bytes)
    max_positions = min(settings.max_positions or model.max_positions, model.max_positions)
    store = SessionStore(settings.max_sessions, settings.idle_ttl_s)
    compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lambdasplit-compute")
    body, hidden_size, dtype = model.body, model.hidden_size, model.dtype

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async def reap():
            while True:
                await asyncio.sleep(min(5.0, settings.idle_ttl_s / 2))
                if n := store.expire_idle():
                    log.info("expired %d idle session(s)", n)

        task = asyncio.create_task(reap())
        yield
        task.cancel()
        compute.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="lambdasplit body server", version=PROTOCOL, lifespan=lifespan)
    app.state.store = store

    @app.exception_handler(StepError)
    async def step_error(_: Request, exc: StepError):
        return JSONResponse({"error": exc.code, "message": str(exc)}, status_code=exc.status)

    @app.get("/v1/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/info", response_model=ServerInfo)
    async def info():
        report = model.parameter_report()["body"]
        return ServerInfo(
            model_name=runtime.name, num_layers=model.split.n, hidden_size=hidden_size,
            x=model.split.x, y=model.split.y, dtype=runtime.dtype_name, codecs=list(PARTS),
            basis=runtime.basis.sha256 if runtime.basis else None,
            basis_points=runtime.basis.points if runtime.basis else [],
            max_positions=max_positions, max_frame_bytes=settings.max_frame_bytes,
            max_sessions=settings.max_sessions, sessions=len(store), parameters=report["params"],
            parameter_bytes=report["bytes"], rss_bytes=psutil.Process().memory_info().rss,
            holds=model.index.loaded_groups(),
        )

    @app.post("/v1/sessions", response_model=SessionOpened)
    async def open_session(req: SessionRequest):
        problems = _mismatches(req, runtime)
        try:
            up, down = session_codecs(req.wire.up, req.wire.down, seed=req.wire.seed, x=req.x, y=req.y,
                                      basis=runtime.basis, basis_sha256=req.wire.basis)
        except CodecError as exc:
            problems.append(str(exc))
        if problems:
            raise StepError("mismatch", "; ".join(problems), 409)
        limit = min(req.max_positions or max_positions, max_positions)
        cache = body.layers.new_cache() if req.cache else None
        session = store.add(x=req.x, y=req.y, up=up, down=down, use_cache=req.cache,
                            max_positions=limit, cache=cache)
        return SessionOpened(session_id=session.id, x=req.x, y=req.y, hidden_size=hidden_size,
                             max_positions=limit, max_frame_bytes=settings.max_frame_bytes,
                             idle_ttl_s=settings.idle_ttl_s)

    @app.delete("/v1/sessions/{session_id}")
    async def close_session(session_id: str):
        store.close(session_id)
        return {"closed": True}

    def run_step(session: Session, data: bytes) -> bytes:
        # decode, body and encode all on the compute thread: codec math is torch too, and a second
        # thread would bring a second OpenMP team that stalls when the first one holds the cores
        frame = decode_frame(data, limits, out_dtype=dtype, codec=session.up)
        reply = session.run_step(frame, body, hidden_size, dtype)
        try:
            return encode_frame(reply)
        except CodecError as exc:  # the cache has moved on without the client: the session cannot go on
            session.closed = True
            raise StepError("internal", f"the reply could not be encoded ({exc}); session closed", 500) from None

    async def step(session: Session, data: bytes) -> bytes:
        return await asyncio.get_running_loop().run_in_executor(compute, run_step, session, data)

    @app.post("/v1/sessions/{session_id}/step")
    async def http_step(session_id: str, request: Request):
        session = store.get(session_id)
        declared = int(request.headers.get("content-length") or 0)
        if declared > settings.max_frame_bytes:
            raise StepError("too_large", f"frame of {declared} bytes exceeds the limit of {settings.max_frame_bytes}", 413)
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > settings.max_frame_bytes:
                raise StepError("too_large", f"frame exceeds the limit of {settings.max_frame_bytes} bytes", 413)
        try:
            out = await step(session, bytes(data))
        except FrameError as exc:
            raise StepError(exc.code, str(exc), 413 if exc.code == "too_large" else 400) from None
        return Response(out, media_type=FRAME_TYPE)

    @app.websocket("/v1/sessions/{session_id}/ws")
    async def ws_steps(websocket: WebSocket, session_id: str):
        await websocket.accept()
        try:
            session = store.get(session_id)
        except StepError as exc:
            await websocket.send_bytes(encode_frame(Frame.error(exc.code, str(exc))))
            await websocket.close(code=4404, reason="unknown session")
            return
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                data = message.get("bytes")
                if data is None:
                    reply = encode_frame(Frame.error("malformed", "steps are binary frames, not text messages"))
                else:
                    try:
                        reply = await step(session, data)
                    except (FrameError, StepError) as exc:
                        reply = encode_frame(Frame.error(exc.code, str(exc)))
                await websocket.send_bytes(reply)
        except WebSocketDisconnect:
            return

    return app


def _mismatches(req: SessionRequest, runtime: BodyRuntime) -> list[str]:
    """Every way the request disagrees with what this server holds, in words."""
    split = runtime.split
    problems = []
    if req.protocol != PROTOCOL:
        problems.append(f"protocol {req.protocol!r} is not {PROTOCOL!r}")
    if not split.x <= req.x <= req.y <= split.y:
        problems.append(f"split mismatch: this server holds layers [{split.x}, {split.y}) of {split.n}; "
                        f"the session asks for [{req.x}, {req.y})")
    elif req.model_fingerprint != runtime.fingerprint(req.x, req.y):
        problems.append(f"model mismatch: layers [{req.x}, {req.y}) of {runtime.name} here have fingerprint "
                        f"{runtime.fingerprint(req.x, req.y)[:16]}…, the client's model has "
                        f"{req.model_fingerprint[:16]}…")
    if req.dtype != runtime.dtype_name:
        problems.append(f"dtype mismatch: the server computes in {runtime.dtype_name}, the session asks {req.dtype}"
                        + ("" if req.dtype in DTYPES else f" (known: {', '.join(DTYPES)})"))
    return problems
