"""The LLM body's steps: binary frames over one WebSocket per session, or one HTTP POST per step.

Every step goes to the compute thread (the scheduler) and its reply comes back as one frame. Two kinds of
session add to that: a PrivateLoRA session's step asks the device for its adapters mid-step, over the
session's WebSocket (so it cannot step over HTTP POST); a forwarding session's output goes on to the next
hop of a sharded body, and the device gets the last hop's answer.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import Response

from ...wire.frame import Frame, FrameError, encode_frame
from ...wire.protocol import FRAME_TYPE
from ..body import BodyContext
from ..privatelora import Exchange, ExchangeError
from ..sessions import Session, StepError

log = logging.getLogger("lambdasplit.server")


def steps_router(ctx: BodyContext) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/sessions/{session_id}/step")
    async def http_step(session_id: str, request: Request):
        session = ctx.store.get(session_id, ctx.who(request.headers).key)
        data = await _read_frame(request, ctx.settings.max_frame_bytes)
        if session.lora is not None:
            raise StepError("needs_ws", "a PrivateLoRA session steps over its WebSocket: the server asks the device "
                                        "for its adapters mid-step, which one HTTP POST cannot carry")
        try:
            out = await run_step(ctx, session, data, "http")
        except FrameError as exc:
            raise StepError(exc.code, str(exc), 413 if exc.code == "too_large" else 400) from None
        return Response(out, media_type=FRAME_TYPE)

    @router.websocket("/v1/sessions/{session_id}/ws")
    async def ws_steps(websocket: WebSocket, session_id: str):
        await websocket.accept()
        try:
            session = ctx.store.get(session_id, ctx.who(websocket.headers).key)
        except StepError as exc:
            await websocket.send_bytes(encode_frame(Frame.error(exc.code, str(exc))))
            await websocket.close(code=4000 + exc.status, reason=exc.code)
            return
        if session.lora is not None:  # the channel the compute thread asks the device through, mid-step
            session.lora.exchange = Exchange(asyncio.get_running_loop())
        try:
            await _serve_steps(ctx, websocket, session)
        except WebSocketDisconnect:
            return

    return router


async def run_step(ctx: BodyContext, session: Session, data: bytes, transport: str,
                   websocket: WebSocket | None = None) -> bytes:
    """One step of a session: the body's reply frame (the next hop's, if the session forwards), counted."""
    try:
        if session.lora is not None and websocket is not None:
            out = await _with_exchange(ctx.scheduler.submit(session, data), session.lora.exchange, websocket)
        else:
            out = await ctx.scheduler.submit(session, data)
        if session.forward is not None:
            try:
                out = await session.forward.relay(out)
            except StepError:
                session.closed = True  # this hop has moved on without the next: the device must start over
                raise
    except (FrameError, StepError) as exc:
        ctx.metrics.inc("step_errors_total", code=exc.code)
        log.info("step refused", extra={"event": "step_error", "session": session.id[:8], "code": exc.code})
        raise
    ctx.metrics.inc("steps_total", transport=transport)
    ctx.metrics.inc("bytes_received_total", len(data))
    ctx.metrics.inc("bytes_sent_total", len(out))
    return out


async def _read_frame(request: Request, max_bytes: int) -> bytes:
    """A POSTed frame, refused (413) as soon as it is known to exceed `max_bytes`."""
    declared = int(request.headers.get("content-length") or 0)
    if declared > max_bytes:
        raise StepError("too_large", f"frame of {declared} bytes exceeds the limit of {max_bytes}", 413)
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > max_bytes:
            raise StepError("too_large", f"frame exceeds the limit of {max_bytes} bytes", 413)
    return bytes(data)


async def _serve_steps(ctx: BodyContext, websocket: WebSocket, session: Session) -> None:
    """A session's WebSocket: one reply frame per step frame (an error frame for a refused step) until
    the device hangs up."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        data = message.get("bytes")
        if data is None:
            reply = encode_frame(Frame.error("malformed", "steps are binary frames, not text messages"))
        else:
            try:
                reply = await run_step(ctx, session, data, "ws", websocket)
            except (FrameError, StepError) as exc:
                reply = encode_frame(Frame.error(exc.code, str(exc)))
        await websocket.send_bytes(reply)


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
