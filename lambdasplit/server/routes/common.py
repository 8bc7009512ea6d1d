"""What every body server has: the app itself, the JSON answer of a refused request, liveness and metrics."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers

from ...wire.protocol import PROTOCOL
from ..context import ServerContext
from ..metrics import CONTENT_TYPE
from ..sessions import StepError
from .origins import OriginGuard


def server_app(title: str, ctx: ServerContext, *routers: APIRouter) -> FastAPI:
    """A FastAPI app over `ctx`: its lifespan, the StepError answer, health and metrics, then `routers`."""
    # the API docs only when asked for (serve --docs), and then behind the token like any other route
    app = FastAPI(title=title, version=PROTOCOL, lifespan=ctx.lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.context, app.state.store, app.state.metrics = ctx, ctx.store, ctx.metrics
    app.add_exception_handler(StepError, step_error)
    app.add_middleware(Gate, ctx=ctx)
    # outermost: a browser page's request is refused, or gets its CORS answer, before the token is asked for
    app.add_middleware(OriginGuard, origins=frozenset(getattr(ctx.settings, "allow_origins", ())))
    for router in (health_router(ctx), *routers):
        app.include_router(router)
    if getattr(ctx.settings, "docs", False):
        app.include_router(docs_router(ctx, app))
    return app


def docs_router(ctx: ServerContext, app: FastAPI) -> APIRouter:
    """/openapi.json, needing the token on a token server (as every route but /health). FastAPI's /docs and
    /redoc pages are not served: they load their scripts from a CDN, and nothing lambdasplit serves does;
    any OpenAPI viewer can read /openapi.json."""
    router = APIRouter(include_in_schema=False)

    @router.get("/openapi.json")
    async def openapi(request: Request):
        ctx.who(request.headers)
        return JSONResponse(app.openapi())

    return router


OPEN_PATHS = frozenset({"/health", "/healthz", "/v1/health"})  # liveness: no token, nothing revealed
JSON_BODY_MAX = 1 << 20  # a request of JSON (opening a session) is a few hundred bytes; steps have their own bound


class Gate:
    """ASGI middleware: on a token server, an HTTP request's token is checked from its headers before the app
    reads any of its body (FastAPI parses a JSON body before the route runs), and a JSON request declaring
    more than JSON_BODY_MAX bytes is refused unread. WebSocket upgrades are checked by their routes before
    they accept (routes/steps.py), and step bodies are bounded by their session (routes/steps.py)."""

    def __init__(self, app, ctx: ServerContext):
        self.app, self.ctx = app, ctx

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        try:
            self.ctx.who(headers)
            if not scope["path"].endswith("/step") and declared_length(headers) > JSON_BODY_MAX:
                raise StepError("too_large", f"a request body of at most {JSON_BODY_MAX} bytes is taken here", 413)
        except StepError as exc:
            response = await step_error(None, exc)
            response.headers["Connection"] = "close"  # its body, if any, is never read
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


def declared_length(headers) -> int:
    """A request's Content-Length (0 when absent); a malformed one is refused."""
    try:
        return int(headers.get("content-length") or 0)
    except ValueError:
        raise StepError("malformed", "the Content-Length header is not a number") from None


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
