"""Pages in a browser as devices: which origins may reach a body server, and CORS for them.

A browser tells the server which page a request comes from (the Origin header); programs do not send one.
A request or WebSocket upgrade that carries an Origin is refused (403 `forbidden_origin`) unless that
origin was given with `serve --allow-origin`, so no other site's page can use a body server through its
visitors' browsers. For the allowed origins, preflights are answered (204, the methods and headers the
device uses) and every answer carries Access-Control-Allow-Origin. Requests without an Origin are not
touched.
"""

from __future__ import annotations

import json

ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"
ALLOW_HEADERS = "authorization, content-type, x-session-key"
MAX_AGE = "600"


class OriginGuard:
    """ASGI middleware: the origin allow-list and CORS for HTTP requests and WebSocket upgrades."""

    def __init__(self, app, origins: frozenset[str]):
        self.app, self.origins = app, origins

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        origin = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"origin"), None)
        if origin is None:
            return await self.app(scope, receive, send)
        if origin.lower().rstrip("/") not in self.origins:
            return await _refuse(scope, receive, send, origin)
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)
        cors = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
        if scope["method"] == "OPTIONS":  # a preflight: answered here, before any route or token check
            await send({"type": "http.response.start", "status": 204, "headers": cors + [
                (b"access-control-allow-methods", ALLOW_METHODS.encode()),
                (b"access-control-allow-headers", ALLOW_HEADERS.encode()), (b"access-control-max-age", MAX_AGE.encode())]})
            return await send({"type": "http.response.body", "body": b""})

        async def with_cors(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *cors,
                                                   (b"access-control-expose-headers", b"retry-after")]}
            await send(message)

        return await self.app(scope, receive, with_cors)


async def _refuse(scope, receive, send, origin: str) -> None:
    body = json.dumps({"error": "forbidden_origin", "message": f"requests from pages of {origin} are refused "
                       "(a body server allows a browser page's origin with serve --allow-origin)"}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 403, "headers": headers})
        return await send({"type": "http.response.body", "body": body})
    await receive()  # websocket.connect
    if "websocket.http.response" in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", "status": 403, "headers": headers})
        return await send({"type": "websocket.http.response.body", "body": body})
    await send({"type": "websocket.close", "code": 4403, "reason": "forbidden_origin"})
