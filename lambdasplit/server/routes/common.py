"""What every body server has: the app itself, the JSON answer of a refused request, liveness and metrics."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ...wire.protocol import PROTOCOL
from ..context import ServerContext
from ..metrics import CONTENT_TYPE
from ..sessions import StepError


def server_app(title: str, ctx: ServerContext, *routers: APIRouter) -> FastAPI:
    """A FastAPI app over `ctx`: its lifespan, the StepError answer, health and metrics, then `routers`."""
    app = FastAPI(title=title, version=PROTOCOL, lifespan=ctx.lifespan)
    app.state.context, app.state.store, app.state.metrics = ctx, ctx.store, ctx.metrics
    app.add_exception_handler(StepError, step_error)
    for router in (health_router(ctx), *routers):
        app.include_router(router)
    return app


async def step_error(_: Request, exc: StepError) -> JSONResponse:
    """A refused request: {"error": code, "message": why}, with Retry-After when a retry may succeed."""
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="lambdasplit"'
    return JSONResponse({"error": exc.code, "message": str(exc)}, status_code=exc.status, headers=headers)


def health_router(ctx: ServerContext) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/health")
    @router.get("/health")
    @router.get("/healthz")
    async def health():
        """Liveness for load balancers: no token needed, nothing about sessions revealed."""
        return {"status": "ok"}

    @router.get("/metrics")
    async def prometheus(request: Request):
        ctx.who(request.headers)
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)

    return router
