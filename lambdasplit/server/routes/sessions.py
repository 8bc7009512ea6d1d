"""The LLM body's session management, plain JSON over HTTP: what this server holds, open and close a session.

A session is opened only if it matches this server exactly (protocol, layers, model fingerprint, dtype,
codecs); otherwise 409 names every difference. Opening reserves the session's worst-case KV cache (a training
session: its worst-case graph, max_positions rows).
"""

from __future__ import annotations

import asyncio
import logging
import secrets

import psutil
from fastapi import APIRouter, Request

from ...wire.codecs import PARTS, Codec, CodecError, session_codecs
from ...wire.protocol import PROTOCOL, SESSION_KEY_HEADER, ServerInfo, SessionOpened, SessionRequest
from ..auth import Principal
from ..body import BodyContext, BodyRuntime
from ..forward import LOSSLESS, Forwarder
from ..privatelora import PrivateLoraContext
from ..sessions import StepError

log = logging.getLogger("lambdasplit.server")
TRAIN_ROWS = 512
"""The longest step of a training session that names no max_positions: its reservation (a forward step's graph
holds about 1 MB per row over 28 layers of SmolLM2) bounds its steps' rows."""


def sessions_router(ctx: BodyContext) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/info", response_model=ServerInfo)
    async def info(request: Request):
        ctx.who(request.headers)
        return server_info(ctx)

    @router.post("/v1/sessions", response_model=SessionOpened)
    async def open_session(req: SessionRequest, request: Request):
        return await open_body_session(ctx, req, ctx.who(request.headers))

    @router.delete("/v1/sessions/{session_id}")
    async def close_session(session_id: str, request: Request):
        ctx.store.close(session_id, ctx.who(request.headers).key, request.headers.get(SESSION_KEY_HEADER))
        log.info("session closed", extra={"event": "session_close", "session": session_id[:8]})
        return {"closed": True}

    return router


def server_info(ctx: BodyContext) -> ServerInfo:
    runtime, model, settings, store = ctx.runtime, ctx.model, ctx.settings, ctx.store
    report = model.parameter_report()["body"]
    return ServerInfo(
        model_name=runtime.name, num_layers=model.split.n, hidden_size=model.hidden_size,
        x=model.split.x, y=model.split.y, dtype=runtime.dtype_name, weights=runtime.weights.name,
        device=str(runtime.device), codecs=list(PARTS),
        basis=runtime.basis.sha256 if runtime.basis else None,
        basis_points=runtime.basis.points if runtime.basis else [],
        max_positions=ctx.max_positions, max_frame_bytes=settings.max_frame_bytes,
        max_sessions=settings.max_sessions, sessions=len(store), kv_budget_bytes=store.kv_budget_bytes or 0,
        kv_reserved_bytes=store.reserved,
        kv_bytes_per_position=runtime.kv_bytes_per_position(model.split.x, model.split.y),
        auth=settings.tokens is not None, forwards=bool(settings.peers), parameters=report["params"],
        parameter_bytes=report["bytes"], rss_bytes=psutil.Process().memory_info().rss,
        holds=model.index.loaded_groups(),
    )


async def open_body_session(ctx: BodyContext, req: SessionRequest, owner: Principal) -> SessionOpened:
    """Check the request, reserve its KV cache, open the next hop's session if it forwards; the answer."""
    up, down = _codecs(ctx, req)
    forwarder = await _forwarder(ctx, req, down)
    if forwarder is not None:
        down = LOSSLESS  # the session's own output goes on in-process; the forwarder codes the reply
    limit = min(req.max_positions or (TRAIN_ROWS if req.train else ctx.max_positions), ctx.max_positions)
    cache = ctx.model.body.layers.new_cache() if req.cache else None
    reserve = ctx.runtime.kv_bytes(req.x, req.y, limit) if req.cache else 0
    if req.train:  # the graph a forward step keeps until its gradient comes back, for its longest step
        reserve = limit * ctx.scheduler.graph_bytes_per_row(req.x, req.y)
    try:
        lora = (PrivateLoraContext(req.private_lora.rank, tuple(req.private_lora.targets), req.private_lora.seed)
                if req.private_lora else None)
        session = ctx.store.add(reserve=reserve, x=req.x, y=req.y, up=up, down=down, use_cache=req.cache,
                                max_positions=limit, cache=cache, owner=owner.key, train=req.train, lora=lora,
                                forward=forwarder, key=secrets.token_urlsafe(32))
    except StepError as exc:
        ctx.metrics.inc("sessions_refused_total", reason=exc.code)
        if forwarder is not None:
            await asyncio.to_thread(forwarder.close)
        raise
    ctx.metrics.inc("sessions_opened_total")
    log.info("session opened", extra={"event": "session_open", "session": session.id[:8], "client": owner.name,
                                      "x": req.x, "y": req.y, "positions": limit, "reserved": reserve,
                                      "cache": req.cache, "up": up.name, "down": down.name})
    return SessionOpened(session_id=session.id, key=session.key, x=req.x, y=req.y, hidden_size=ctx.model.hidden_size,
                         max_positions=limit, max_frame_bytes=ctx.settings.max_frame_bytes,
                         idle_ttl_s=ctx.settings.idle_ttl_s, rollback=req.cache, train=req.train,
                         private_lora=req.private_lora is not None, forwarded=len(req.forward),
                         weights=ctx.runtime.weights.name)


def _codecs(ctx: BodyContext, req: SessionRequest) -> tuple[Codec, Codec]:
    """The session's uplink and downlink codecs; StepError 409 with every mismatch if the request has any."""
    problems = _mismatches(req, ctx.runtime)
    # a forwarding session answers with the last hop's output: the device's downlink codec codes that state
    end = req.forward[-1].y if req.forward else req.y
    try:
        up, down = session_codecs(req.wire.up, req.wire.down, seed=req.wire.seed, x=req.x, y=end,
                                  basis=ctx.runtime.basis, basis_sha256=req.wire.basis)
    except CodecError as exc:
        problems.append(str(exc))
    if req.train and req.cache:
        problems.append("a training session keeps no KV cache: open it with cache false")
    if req.forward and (req.train or req.private_lora):
        problems.append("only inference sessions are forwarded to a next hop (training and PrivateLoRA sessions "
                        "are not)")
    if problems:
        ctx.metrics.inc("sessions_refused_total", reason="mismatch")
        raise StepError("mismatch", "; ".join(problems), 409)
    return up, down


async def _forwarder(ctx: BodyContext, req: SessionRequest, down: Codec) -> Forwarder | None:
    """The next hop's session, for a session that asks this server to forward its output (None: it does not)."""
    if not req.forward:
        return None
    if not ctx.settings.peers:
        ctx.metrics.inc("sessions_refused_total", reason="no_forward")
        raise StepError("no_forward", "this server does not forward to a next hop (it was started without "
                                      "--peers): chain the hops from the client instead", 403)
    return await asyncio.to_thread(Forwarder, req, ctx.model.dtype, down, frozenset(ctx.settings.peers),
                                   ctx.runtime.basis, ctx.settings.peer_token)


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
    if problem := runtime.weights_problem(req.weights or req.dtype):
        problems.append(problem)
    if runtime.weights.quantized and (req.private_lora or req.train):
        problems.append(f"this server's body is {runtime.weights.name}-quantized: PrivateLoRA and training sessions "
                        f"need float weights (serve with --weights bf16 or fp32)")
    return problems
