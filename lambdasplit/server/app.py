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
from dataclasses import dataclass
from pathlib import Path

import psutil
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response

from ..models.llm import DTYPES, load_split
from ..models.source import model_name
from ..wire.codecs import PARTS, CodecError, session_codecs
from ..wire.frame import Frame, FrameError, Limits, encode_frame
from ..wire.lowrank import Basis
from ..wire.protocol import PROTOCOL, ServerInfo, SessionOpened, SessionRequest
from .auth import ANONYMOUS, AuthError, Principal, TokenBook
from .forward import LOSSLESS, Forwarder
from .metrics import Metrics
from .privatelora import Exchange, ExchangeError, PrivateLoraContext
from .privatelora import install as install_private_lora
from .scheduler import Lie, Scheduler
from .sessions import Session, SessionStore, StepError

log = logging.getLogger("lambdasplit.server")
FRAME_TYPE = "application/x-lambdasplit-frame"


@dataclass(frozen=True)
class ServerSettings:
    max_sessions: int = 64
    idle_ttl_s: float = 600.0
    max_frame_bytes: int = 64 << 20
    max_positions: int | None = None  # default: the model's context length
    kv_budget_bytes: int | None = None  # default: a quarter of this machine's memory
    tokens: TokenBook | None = None  # None: no authentication (loopback only, unless --insecure)
    max_batch: int = 16  # decode steps of concurrent sessions that share one forward pass (1: no batching)
    session_prefix: str = ""  # what every session id starts with (a Ray Serve replica's routing key)
    dishonest: float = 0.0  # TESTING ONLY: perturb every answer by this x its RMS (serve --dishonest)
    dishonest_after: int = 0  # ... from each session's step N on
    peers: tuple[str, ...] = ()  # servers a session may ask this one to forward its output to (a sharded body)
    peer_token: str | None = None  # the bearer token this server presents to its peers

    def __post_init__(self):
        for name in ("max_sessions", "idle_ttl_s", "max_frame_bytes", "max_batch"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("max_positions", "kv_budget_bytes"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def kv_budget(self) -> int:
        return self.kv_budget_bytes or psutil.virtual_memory().total // 4


class BodyRuntime:
    """One body (layers [x, y) of one model), and the facts a session must match."""

    def __init__(self, folder: Path, x: int, y: int, dtype: str = "float32", basis: str | Path | None = None):
        self.dtype_name = dtype
        self.model = load_split(folder, x, y, parts=("body",), dtype=dtype)
        self.model.body.requires_grad_(False)  # training sessions take gradients at the input only
        install_private_lora(self.model.body.layers)  # plain layers until a PrivateLoRA session's step runs
        self.split = self.model.split
        self.name = model_name(folder)
        self.basis = Basis.load(basis) if basis else None
        if self.basis is not None and self.basis.hidden_size != self.model.hidden_size:
            raise ValueError(f"basis {basis} is for hidden size {self.basis.hidden_size}, the model has "
                             f"{self.model.hidden_size}")
        self._fingerprints: dict[tuple[int, int], str] = {}

    def kv_bytes_per_position(self, x: int, y: int) -> int:
        """KV-cache bytes one position takes in layers [x, y): a key and a value per KV head."""
        config = self.model.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return (y - x) * 2 * heads * head_dim * self.model.dtype.itemsize

    def fingerprint(self, x: int, y: int) -> str:
        if (x, y) not in self._fingerprints:
            self._fingerprints[(x, y)] = self.model.body_fingerprint(x, y)
        return self._fingerprints[(x, y)]


def create_app(runtime: BodyRuntime, settings: ServerSettings = ServerSettings()) -> FastAPI:
    model = runtime.model
    limits = Limits(max_frame_bytes=settings.max_frame_bytes)
    max_positions = min(settings.max_positions or model.max_positions, model.max_positions)
    store = SessionStore(settings.max_sessions, settings.idle_ttl_s, settings.kv_budget, settings.session_prefix)
    body, hidden_size, dtype = model.body, model.hidden_size, model.dtype
    metrics = Metrics()
    lie = Lie(settings.dishonest, settings.dishonest_after) if settings.dishonest else None
    if lie is not None:
        log.warning("DISHONEST server (testing only): answers perturbed by %g x their RMS from step %d",
                    settings.dishonest, settings.dishonest_after)
    scheduler = Scheduler(body, hidden_size, dtype, limits, metrics, settings.max_batch, lie=lie)
    metrics.gauges.update(
        sessions=lambda: len(store), kv_reserved_bytes=lambda: store.reserved,
        kv_budget_bytes=lambda: store.kv_budget_bytes or 0, rss_bytes=lambda: psutil.Process().memory_info().rss,
        kv_cache_bytes=lambda: sum(s.pos * runtime.kv_bytes_per_position(s.x, s.y)
                                   for s in store.sessions() if s.cache is not None))

    def who(headers) -> Principal:
        """The caller, from the Authorization header; every request but /health needs it on a token server."""
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
                if n := store.expire_idle():
                    log.info("expired %d idle session(s)", n)

        task = asyncio.create_task(reap())
        yield
        task.cancel()
        scheduler.close()

    app = FastAPI(title="lambdasplit body server", version=PROTOCOL, lifespan=lifespan)
    app.state.store, app.state.metrics = store, metrics

    @app.exception_handler(StepError)
    async def step_error(_: Request, exc: StepError):
        headers = {}
        if exc.retry_after is not None:
            headers["Retry-After"] = str(exc.retry_after)
        if exc.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="lambdasplit"'
        return JSONResponse({"error": exc.code, "message": str(exc)}, status_code=exc.status, headers=headers)

    @app.get("/v1/health")
    @app.get("/healthz")
    async def health():
        """Liveness for load balancers: no token needed, nothing about sessions revealed."""
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus(request: Request):
        who(request.headers)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/info", response_model=ServerInfo)
    async def info(request: Request):
        who(request.headers)
        report = model.parameter_report()["body"]
        return ServerInfo(
            model_name=runtime.name, num_layers=model.split.n, hidden_size=hidden_size,
            x=model.split.x, y=model.split.y, dtype=runtime.dtype_name, codecs=list(PARTS),
            basis=runtime.basis.sha256 if runtime.basis else None,
            basis_points=runtime.basis.points if runtime.basis else [],
            max_positions=max_positions, max_frame_bytes=settings.max_frame_bytes,
            max_sessions=settings.max_sessions, sessions=len(store), kv_budget_bytes=store.kv_budget_bytes or 0,
            kv_reserved_bytes=store.reserved, kv_bytes_per_position=runtime.kv_bytes_per_position(model.split.x, model.split.y),
            auth=settings.tokens is not None, forwards=bool(settings.peers), parameters=report["params"],
            parameter_bytes=report["bytes"], rss_bytes=psutil.Process().memory_info().rss,
            holds=model.index.loaded_groups(),
        )

    @app.post("/v1/sessions", response_model=SessionOpened)
    async def open_session(req: SessionRequest, request: Request):
        owner = who(request.headers)
        problems = _mismatches(req, runtime)
        # a forwarding session answers with the last hop's output: the device's downlink codec codes that state
        end = req.forward[-1].y if req.forward else req.y
        try:
            up, down = session_codecs(req.wire.up, req.wire.down, seed=req.wire.seed, x=req.x, y=end,
                                      basis=runtime.basis, basis_sha256=req.wire.basis)
        except CodecError as exc:
            problems.append(str(exc))
        if req.train and req.cache:
            problems.append("a training session keeps no KV cache: open it with cache false")
        if req.forward and (req.train or req.private_lora):
            problems.append("only inference sessions are forwarded to a next hop (training and PrivateLoRA sessions "
                            "are not)")
        if problems:
            metrics.inc("sessions_refused_total", reason="mismatch")
            raise StepError("mismatch", "; ".join(problems), 409)
        forwarder = None
        if req.forward:
            if not settings.peers:
                metrics.inc("sessions_refused_total", reason="no_forward")
                raise StepError("no_forward", "this server does not forward to a next hop (it was started without "
                                              "--peers): chain the hops from the client instead", 403)
            forwarder = await asyncio.to_thread(Forwarder, req, dtype, down, frozenset(settings.peers), runtime.basis,
                                                settings.peer_token)
            down = LOSSLESS  # the session's own output goes on in-process; the forwarder codes the reply
        limit = min(req.max_positions or max_positions, max_positions)
        cache = body.layers.new_cache() if req.cache else None
        reserve = limit * runtime.kv_bytes_per_position(req.x, req.y) if req.cache else 0
        try:
            lora = (PrivateLoraContext(req.private_lora.rank, tuple(req.private_lora.targets), req.private_lora.seed)
                    if req.private_lora else None)
            session = store.add(reserve=reserve, x=req.x, y=req.y, up=up, down=down, use_cache=req.cache,
                                max_positions=limit, cache=cache, owner=owner.key, train=req.train, lora=lora,
                                forward=forwarder)
        except StepError as exc:
            metrics.inc("sessions_refused_total", reason=exc.code)
            if forwarder is not None:
                await asyncio.to_thread(forwarder.close)
            raise
        metrics.inc("sessions_opened_total")
        log.info("session opened", extra={"event": "session_open", "session": session.id[:8], "client": owner.name,
                                          "x": req.x, "y": req.y, "positions": limit, "reserved": reserve,
                                          "cache": req.cache, "up": up.name, "down": down.name})
        return SessionOpened(session_id=session.id, x=req.x, y=req.y, hidden_size=hidden_size,
                             max_positions=limit, max_frame_bytes=settings.max_frame_bytes,
                             idle_ttl_s=settings.idle_ttl_s, rollback=req.cache, train=req.train,
                             private_lora=req.private_lora is not None, forwarded=len(req.forward))

    @app.delete("/v1/sessions/{session_id}")
    async def close_session(session_id: str, request: Request):
        store.close(session_id, who(request.headers).key)
        log.info("session closed", extra={"event": "session_close", "session": session_id[:8]})
        return {"closed": True}

    async def step(session: Session, data: bytes, transport: str, websocket: WebSocket | None = None) -> bytes:
        try:
            if session.lora is not None and websocket is not None:
                out = await _with_exchange(scheduler.submit(session, data), session.lora.exchange, websocket)
            else:
                out = await scheduler.submit(session, data)
            if session.forward is not None:
                try:
                    out = await session.forward.relay(out)
                except StepError:
                    session.closed = True  # this hop has moved on without the next: the device must start over
                    raise
        except (FrameError, StepError) as exc:
            metrics.inc("step_errors_total", code=exc.code)
            log.info("step refused", extra={"event": "step_error", "session": session.id[:8], "code": exc.code})
            raise
        metrics.inc("steps_total", transport=transport)
        metrics.inc("bytes_received_total", len(data))
        metrics.inc("bytes_sent_total", len(out))
        return out

    @app.post("/v1/sessions/{session_id}/step")
    async def http_step(session_id: str, request: Request):
        session = store.get(session_id, who(request.headers).key)
        declared = int(request.headers.get("content-length") or 0)
        if declared > settings.max_frame_bytes:
            raise StepError("too_large", f"frame of {declared} bytes exceeds the limit of {settings.max_frame_bytes}", 413)
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > settings.max_frame_bytes:
                raise StepError("too_large", f"frame exceeds the limit of {settings.max_frame_bytes} bytes", 413)
        if session.lora is not None:
            raise StepError("needs_ws", "a PrivateLoRA session steps over its WebSocket: the server asks the device "
                                        "for its adapters mid-step, which one HTTP POST cannot carry")
        try:
            out = await step(session, bytes(data), "http")
        except FrameError as exc:
            raise StepError(exc.code, str(exc), 413 if exc.code == "too_large" else 400) from None
        return Response(out, media_type=FRAME_TYPE)

    @app.websocket("/v1/sessions/{session_id}/ws")
    async def ws_steps(websocket: WebSocket, session_id: str):
        await websocket.accept()
        try:
            session = store.get(session_id, who(websocket.headers).key)
        except StepError as exc:
            await websocket.send_bytes(encode_frame(Frame.error(exc.code, str(exc))))
            await websocket.close(code=4000 + exc.status, reason=exc.code)
            return
        if session.lora is not None:  # the channel the compute thread asks the device through, mid-step
            session.lora.exchange = Exchange(asyncio.get_running_loop())
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
                        reply = await step(session, data, "ws", websocket)
                    except (FrameError, StepError) as exc:
                        reply = encode_frame(Frame.error(exc.code, str(exc)))
                await websocket.send_bytes(reply)
        except WebSocketDisconnect:
            return

    return app


async def _with_exchange(work, exchange: Exchange, websocket: WebSocket) -> bytes:
    """Run a PrivateLoRA session's step; meanwhile carry the compute thread's questions to the device over
    the session's WebSocket, and the device's answers back."""
    task = asyncio.ensure_future(work)
    while True:
        question = asyncio.ensure_future(exchange.outbox.get())
        done, _ = await asyncio.wait({task, question}, return_when=asyncio.FIRST_COMPLETED)
        if question not in done:
            question.cancel()
            return task.result()
        frame, answer = question.result()
        try:
            await websocket.send_bytes(frame)
            message = await websocket.receive()
        except Exception as exc:  # noqa: BLE001 - the device went away: the step fails, the handler ends
            answer.set_exception(ExchangeError("disconnected", f"the device went away mid-step ({exc})"))
            raise
        if message["type"] == "websocket.disconnect" or message.get("bytes") is None:
            answer.set_exception(ExchangeError("disconnected", "the device did not answer the adapter exchange"))
            if message["type"] == "websocket.disconnect":
                raise WebSocketDisconnect()
            continue
        answer.set_result(message["bytes"])


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
