"""Who may talk to the web app, and errors in OpenAI's shape on every route.

- **Host** (DNS rebinding): only loopback names, plus the names given with `--allow-host` (e.g.
  host.docker.internal, for an app in a container); anything else gets 403 `forbidden_host`.
- **Origin** (other sites' pages in the user's browser): a request from a page of another site, or from a
  sandboxed page ("null"), gets 403 `forbidden_origin`, unless its origin is one given with `--allow-origin`
  and it asks for the API (/v1).
- **CORS**, for the origins of `--allow-origin` only and on the OpenAI-compatible API (/v1) only: a
  preflight (OPTIONS) is answered with the Access-Control-Allow-* headers, and answers carry
  Access-Control-Allow-Origin. Other origins get no CORS headers, and their preflights 403.
- **Peer**: when the app listens beyond loopback, other machines (a container is one) reach only the
  API (/v1, which then needs the API key), /health, /healthz and /metrics; never the page or its keyless
  /api.

Errors the framework raises (404 for an unknown route, 405 for a wrong method, 400 for a bad query, 500)
come back as {"error": {"message", "type", "param", "code"}} too.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from ..net.origins import normal_origin
from .openai_api import ApiError

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
REMOTE_PATHS = ("/v1/", "/health", "/healthz", "/metrics")  # what other machines may reach (see above)
CORS_METHODS = "GET, POST, OPTIONS"
CORS_MAX_AGE = "600"
_HEADER_LIST = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*$")
log = logging.getLogger("lambdasplit.web")


def host_of(value: str) -> str:
    """The host part of a Host header or an origin's netloc ('[::1]:8480' -> '::1'), lower-case."""
    try:
        return (urlsplit(f"//{value}").hostname or "").lower()
    except ValueError:  # a malformed port or bracket
        return ""


def is_loopback(address: str) -> bool:
    """Whether a peer's address is this machine's loopback (::ffff:127.0.0.1 too, on a socket of `--host ::`)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address == "localhost"
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


def guard(app: FastAPI, allow_hosts: tuple[str, ...] = (), allow_origins: tuple[str, ...] = ()) -> None:
    """Install the checks above and the OpenAI-shaped error handlers on `app`."""
    hosts = LOOPBACK_HOSTS | {h.lower() for h in allow_hosts}
    origins = {normal_origin(o) for o in allow_origins}

    @app.middleware("http")
    async def checks(request: Request, call_next):
        host = host_of(request.headers.get("host", ""))
        origin = request.headers.get("origin")
        # an origin of --allow-origin, on the API: the page and its /api stay this app's own
        allowed = origin is not None and origin.lower().rstrip("/") in origins and request.url.path.startswith("/v1/")
        if host not in hosts:
            return ApiError(403, f"this app answers for loopback names only, not for host {host!r} (add it with "
                                 "--allow-host)", code="forbidden_host").response()
        if origin and not allowed and host_of(urlsplit(origin).netloc) not in LOOPBACK_HOSTS:  # "null" too
            return ApiError(403, f"requests from pages of {origin} are refused (allow one with --allow-origin)",
                            code="forbidden_origin").response()
        peer = request.client.host if request.client else ""
        if not is_loopback(peer) and not request.url.path.startswith(REMOTE_PATHS):
            return ApiError(403, "the page and its API answer this machine only; other machines reach /v1",
                            code="forbidden_peer").response()
        if request.method == "OPTIONS" and "access-control-request-method" in request.headers:
            if not allowed:
                return ApiError(403, f"cross-origin requests from {origin} are not allowed here (allow an origin "
                                     "on /v1 with --allow-origin)", code="forbidden_origin").response()
            return Response(status_code=204, headers=_preflight(request, origin))
        response = await call_next(request)
        if allowed:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers.append("Vary", "Origin")
        return response

    _error_handlers(app)


def _preflight(request: Request, origin: str) -> dict[str, str]:
    headers = {"Access-Control-Allow-Origin": origin, "Access-Control-Allow-Methods": CORS_METHODS,
               "Access-Control-Max-Age": CORS_MAX_AGE, "Vary": "Origin"}
    asked = request.headers.get("access-control-request-headers", "").strip()
    if asked and _HEADER_LIST.match(asked):  # the origin is trusted: the headers it asks for (the key among them)
        headers["Access-Control-Allow-Headers"] = asked
    return headers


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        if exc.status_code == 404:
            error = ApiError(404, f"no such route: {request.method} {request.url.path}", code="unknown_route")
        elif exc.status_code == 405:
            error = ApiError(405, f"{request.url.path} does not take {request.method}", code="method_not_allowed")
        else:
            error = ApiError(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500
                             else "server_error")
        response = error.response()
        response.headers.update(exc.headers or {})  # Allow, for a 405
        return response

    @app.exception_handler(RequestValidationError)
    async def bad_query(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"][1:]) or None
        return ApiError(400, f"{where}: {first['msg']}" if where else first["msg"], param=where).response()

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error").response()
