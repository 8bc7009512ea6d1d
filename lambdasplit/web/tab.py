"""The device in the page (`lambdasplit web --in-browser`): the web UI runs the head and the tail in the tab.

    page ── GET /device/*            the exported parts, the tokenizer, device.js and its runtimes (ONNX Runtime Web)
         ── POST /api/body-session   a session on the body server, opened here with this app's token; the page
                                     gets its id and key, never the token
         ══ WebSocket ══════════════ body server: frames of hidden states, straight from the page (the key as a
                                     subprotocol; `serve --allow-origin` must name this app's origin)

The prompt and the answer stay in the page: this app sees neither (it sees, if the page asks for the
read-back panel, the uplink frames, which the body server received anyway). Every response carries the
cross-origin isolation headers that ONNX Runtime's WASM threads need.

The parts are those `lambdasplit export-web` writes (browser/export.py), for one split: a folder given on the
command line, or an export made once into the cache for the body server's split.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from ..browser.page import HERE as BROWSER_HERE
from ..browser.page import ISOLATION, PAGE_FILES, RUNTIME_FILES, runtime_dir
from ..browser.shared import SHARED_FILE
from ..client.transport import BodyConnection, BodyError
from ..util.cache import cache_root
from ..wire.protocol import SessionRequest, WireFormat
from ..wire.spec import parse_wire
from .openai_api import ApiError

PART_FILES = ("manifest.json", "head.onnx", "tail.onnx", "head.int8.onnx", "tail.int8.onnx", SHARED_FILE,
              "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm", ".json": "application/json",
         ".onnx": "application/octet-stream", ".jinja": "text/plain"}


def export_folder(model_folder: Path, x: int, y: int) -> Path:
    """Where the cache keeps the export of this model's split: named by the weights' files, so new weights
    get a new export."""
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in model_folder.glob("*.safetensors"))
    key = hashlib.sha256(json.dumps([str(model_folder.resolve()), files]).encode()).hexdigest()[:12]
    return cache_root() / "browser" / f"{model_folder.name}-{x}-{y}-{key}"


def prepare_export(model_folder: Path, x: int, y: int, log=print) -> Path:
    """The cached export of the split, made now if it is not there yet (a minute or so for the 135M model)."""
    from ..browser.export import export_web

    out = export_folder(model_folder, x, y)
    if not (out / "manifest.json").is_file():
        log(f"exporting the head and tail of split {x}:{y} to ONNX for the page, once, into {out} ...")
        partial = out.with_name(out.name + ".partial")
        export_web(model_folder, x, y, partial, int8=False, log=log)
        partial.replace(out)  # only a complete export is ever found
    return out


class SessionAsk(BaseModel):
    """What the page may ask for: the codecs and the length. The layers and the fingerprint are the export's."""

    model_config = ConfigDict(extra="forbid")
    up: str = Field(max_length=200)
    down: str = Field(max_length=200)
    seed: int = Field(0, ge=0, lt=2**31)
    max_positions: int | None = Field(None, ge=1)


class TabDevice:
    """The exported parts the page runs, and what the page needs from this app to reach the body server."""

    def __init__(self, folder: Path, servers: list[str], server_info, *, token: str | None = None,
                 ca_bundle: str | None = None):
        self.folder = Path(folder)
        path = self.folder / "manifest.json"
        if not path.is_file():
            raise ValueError(f"{self.folder} holds no manifest.json: give a folder `lambdasplit export-web` wrote")
        self.manifest = json.loads(path.read_text())
        x, y = self.manifest["split"]
        if (self.manifest["num_layers"], self.manifest["hidden_size"]) != (server_info.num_layers,
                                                                           server_info.hidden_size):
            raise ValueError(f"the export in {self.folder} is of {self.manifest['model']} "
                             f"({self.manifest['num_layers']} layers, D={self.manifest['hidden_size']}); the body "
                             f"server serves {server_info.model_name}: a mismatched model")
        if not server_info.x <= x <= y <= server_info.y:
            raise ValueError(f"the export's split {x}:{y} is outside what the body server serves: layers "
                             f"[{server_info.x}, {server_info.y})")
        self.files = {name: self.folder / name for name in PART_FILES if (self.folder / name).is_file()}
        self.files.update({name: BROWSER_HERE / "static" / name for name in PAGE_FILES if name != "index.html"})
        modules = runtime_dir()
        self.files.update({name: modules / source for source, name in RUNTIME_FILES.items()})
        self.servers, self.token, self.ca_bundle = servers, token, ca_bundle

    def describe(self) -> dict:
        m = self.manifest
        return {"tab": {"path": "/device/", "split": m["split"], "default_wire": m["default_wire"],
                        "server": self.servers[0], "download_bytes": sum(p["bytes"] for p in m["parts"].values())
                        + m.get("shared", {}).get("bytes", 0),
                        "check": m.get("check")}}

    def open_session(self, ask: SessionAsk) -> dict:
        """A session on the body server for the page: opened here (with the token), handed to the page."""
        try:
            parse_wire(f"{ask.up},{ask.down}")
        except ValueError as exc:
            raise ApiError(400, str(exc), code="bad_codec") from None
        x, y = self.manifest["split"]
        request = SessionRequest(model_fingerprint=self.manifest["body_fingerprint"], x=x, y=y,
                                 wire=WireFormat(up=ask.up, down=ask.down, seed=ask.seed),
                                 max_positions=ask.max_positions)
        connection = BodyConnection(self.servers[0], transport="http", token=self.token, ca_bundle=self.ca_bundle)
        try:
            opened = connection.hand_out_session(request)
        except BodyError as exc:
            raise ApiError(502 if exc.code in ("unreachable", "disconnected", "tls") else 409,
                           f"the body server refused the session: {exc}", code=exc.code) from None
        finally:
            connection.close()  # its HTTP connection only: the session is the page's now
        return opened.model_dump()

    def install(self, app: FastAPI) -> None:
        """The page's routes, and the isolation headers on every response."""

        @app.middleware("http")
        async def isolate(request: Request, call_next):
            response = await call_next(request)
            response.headers.update(ISOLATION)
            return response

        api = APIRouter()

        @api.get("/device/{name}", include_in_schema=False)
        def device_file(name: str):
            path = self.files.get(name)
            if path is None:
                raise ApiError(404, f"no device file {name!r}", code="not_found")
            return FileResponse(str(path), media_type=TYPES.get(path.suffix, "application/octet-stream"),
                                headers={"Cache-Control": "no-cache"})

        @api.post("/api/body-session")
        async def body_session(request: Request):
            from starlette.concurrency import run_in_threadpool

            try:
                ask = SessionAsk.model_validate(await request.json())
            except ValueError as exc:
                raise ApiError(400, f"a session request needs up and down codecs: {exc}".splitlines()[0]) from None
            return await run_in_threadpool(self.open_session, ask)

        app.include_router(api)
