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

from ...wire.frame import Frame, FrameError, encode_frame, max_frame_size
from ...wire.protocol import BROWSER_KEY_TTL_S, FRAME_TYPE, SESSION_KEY_HEADER, WS_KEY_PROTOCOL, WS_PROTOCOL
from ..body import BodyContext
from ..privatelora import Exchange, ExchangeError
from ..sessions import Session, StepError
from .common import declared_length, step_error

log = logging.getLogger("lambdasplit.server")


def steps_router(ctx: BodyContext) -> APIRouter:
    router = APIRouter()
    open_sockets: set[str] = set()  # the sessions whose WebSocket is open now

    @router.post("/v1/sessions/{session_id}/step")
    async def http_step(session_id: str, request: Request):
        session = ctx.store.get(session_id, ctx.who(request.headers).key, request.headers.get(SESSION_KEY_HEADER))
        data = await _read_frame(request, *_frame_cap(ctx, session))
        if session.lora is not None:
            raise StepError("needs_ws", "a PrivateLoRA session steps over its WebSocket: the server asks the device "
                                        "for its adapters mid-step, which one HTTP POST cannot carry")
        try:
            out = await run_step(ctx, session, data, "http")
        except FrameError as exc:
            raise StepError(exc.code, str(exc), 413 if exc.code in ("too_large", "too_long") else 400) from None
        return Response(out, media_type=FRAME_TYPE)

    @router.websocket("/v1/sessions/{session_id}/ws")
    async def ws_steps(websocket: WebSocket, session_id: str):
        # the caller, its session and the session's one WebSocket are checked BEFORE the upgrade is accepted:
        # a refused upgrade is an HTTP answer ({"error": code, ...}), and not one byte of a message is read
        offered = websocket.scope.get("subprotocols") or []
        browser_key = next((p[len(WS_KEY_PROTOCOL):] for p in offered if p.startswith(WS_KEY_PROTOCOL)), None)
        try:
            headers = websocket.headers
            if browser_key is not None:  # a page's WebSocket: the key it got with the token, as a subprotocol
                if WS_PROTOCOL not in offered:  # the answer must name a protocol it asked for, and not the key
                    raise StepError("malformed", f"a WebSocket that carries its session key as a subprotocol must "
                                                 f"also ask for {WS_PROTOCOL!r}", 400)
                session = ctx.store.get_by_key(session_id, browser_key, BROWSER_KEY_TTL_S)
            else:
                session = ctx.store.get(session_id, ctx.who(headers).key, headers.get(SESSION_KEY_HEADER))
            if session.id in open_sockets:
                raise StepError("session_busy", "this session already has its WebSocket open (one at a time); "
                                                "close it before opening another", 409)
        except StepError as exc:
            ctx.metrics.inc("step_errors_total", code=exc.code)
            await refuse_upgrade(websocket, exc)
            return
        open_sockets.add(session.id)  # no await since the check: no second upgrade can slip in between
        try:
            # a browser is answered with the protocol it asked for beside its key (the key is never echoed)
            await websocket.accept(subprotocol=WS_PROTOCOL if browser_key is not None else None)
            if session.lora is not None:  # the channel the compute thread asks the device through, mid-step
                session.lora.exchange = Exchange(asyncio.get_running_loop())
            await _serve_steps(ctx, websocket, session)
        except WebSocketDisconnect:
            return
        finally:
            open_sockets.discard(session.id)

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


async def _read_frame(request: Request, max_bytes: int, why: str = "") -> bytes:
    """A POSTed frame, read chunk by chunk (only after its session was found), refused (413) as soon as it is
    known to exceed `max_bytes`: never more than that is held."""
    declared = declared_length(request.headers)
    if declared > max_bytes:
        raise StepError("too_large", f"frame of {declared} bytes exceeds the limit of {max_bytes}{why}", 413)
    data = bytearray()
    async for chunk in request.stream():
        if len(data) + len(chunk) > max_bytes:
            raise StepError("too_large", f"frame exceeds the limit of {max_bytes} bytes{why}", 413)
        data += chunk
    return bytes(data)


def _frame_cap(ctx: BodyContext, session: Session) -> tuple[int, str]:
    """The most bytes one step of this session may take: its longest sequence of the body's width, in its
    uplink codec, with the largest header (never more than the server's --max-frame-mb); and why."""
    cap = max_frame_size(session.up, ctx.model.hidden_size, session.max_positions, ctx.limits)
    return cap, (f" (this session's longest step: {session.max_positions} rows of {ctx.model.hidden_size} in "
                 f"{session.up.name}; the server's limit is {ctx.limits.max_frame_bytes})")


async def refuse_upgrade(websocket: WebSocket, exc: StepError) -> None:
    """Answer a WebSocket upgrade with the refusal's HTTP status and JSON body (the ASGI denial-response
    extension), or, where the server lacks it, with a plain 403."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(await step_error(None, exc))
    else:
        await websocket.close(code=4000 + exc.status, reason=exc.code)


async def _serve_steps(ctx: BodyContext, websocket: WebSocket, session: Session) -> None:
    """A session's WebSocket: one reply frame per step frame (an error frame for a refused step) until
    the device hangs up, or a step has closed the session (then the server closes the WebSocket). A training
    session, or a closed one, is freed when its WebSocket closes: its graph and its reservation go with it."""
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
                    reply = await run_step(ctx, session, data, "ws", websocket)
                except (FrameError, StepError) as exc:
                    reply = encode_frame(Frame.error(exc.code, str(exc)))
            await websocket.send_bytes(reply)
            if session.closed:  # e.g. its device did not answer in time, mid-step: no later step can run
                await websocket.close(code=1011, reason="session closed")
                return
    finally:
        if session.train or session.closed:
            await asyncio.to_thread(ctx.store.drop, session)


async def _with_exchange(work, exchange: Exchange, websocket: WebSocket) -> bytes:
    """Run a PrivateLoRA session's step; meanwhile carry its thread's questions to the device over the
    session's WebSocket, and the device's answers back. The step's thread, not this handler, times the
    device: when the step ends first (it gave up waiting), its error is the reply and a late answer is dropped."""
    task = asyncio.ensure_future(work)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # an abandoned step's error: retrieved
    while True:
        question = asyncio.ensure_future(exchange.outbox.get())
        await asyncio.wait({task, question}, return_when=asyncio.FIRST_COMPLETED)
        if not question.done():
            question.cancel()
            return task.result()
        frame, answer = question.result()
        try:
            await websocket.send_bytes(frame)
            incoming = asyncio.ensure_future(websocket.receive())
            await asyncio.wait({task, incoming}, return_when=asyncio.FIRST_COMPLETED)
            if not incoming.done():
                incoming.cancel()
                return task.result()  # raises: the step failed without this answer
            message = incoming.result()
        except Exception as exc:  # noqa: BLE001 - the device went away: the step fails, the handler ends
            answer.set_exception(ExchangeError("disconnected", f"the device went away mid-step ({exc})"))
            raise
        if message["type"] == "websocket.disconnect":
            answer.set_exception(ExchangeError("disconnected", "the device went away mid-step"))
            raise WebSocketDisconnect()
        if message.get("bytes") is None:
            answer.set_exception(ExchangeError("bad_lora", "the device answered the adapter exchange with text"))
            continue
        answer.set_result(message["bytes"])
