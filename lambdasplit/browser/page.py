"""The page of the browser device: its files, the runtimes it loads, and a server that gives it the headers
WASM threads need.

`write_page` copies the page (index.html, device.js, sampling.js, wire.js) and the runtimes it imports (ONNX
Runtime Web's WASM and WebGPU builds, tokenizers.js, jinja.js: installed from the npm registry at setup, by `./run` or
`npm ci --prefix lambdasplit/browser`, and served from this folder, never from a CDN) next to the exported
parts. Any static host can serve the folder; for ONNX Runtime's threads it must send
`Cross-Origin-Opener-Policy: same-origin` and `Cross-Origin-Embedder-Policy: require-corp` (without them
the page still works, on one thread). `serve_page` is such a host, for this machine.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAGE_FILES = ("index.html", "device.js", "sampling.js", "wire.js")
RUNTIME_FILES = {  # file in node_modules -> name the page imports
    "onnxruntime-web/dist/ort.wasm.min.mjs": "ort.wasm.min.mjs",
    "onnxruntime-web/dist/ort-wasm-simd-threaded.mjs": "ort-wasm-simd-threaded.mjs",
    "onnxruntime-web/dist/ort-wasm-simd-threaded.wasm": "ort-wasm-simd-threaded.wasm",
    "onnxruntime-web/dist/ort.webgpu.min.mjs": "ort.webgpu.min.mjs",  # the WebGPU build: fetched only when used
    "onnxruntime-web/dist/ort-wasm-simd-threaded.asyncify.mjs": "ort-wasm-simd-threaded.asyncify.mjs",
    "onnxruntime-web/dist/ort-wasm-simd-threaded.asyncify.wasm": "ort-wasm-simd-threaded.asyncify.wasm",
    "@huggingface/tokenizers/dist/tokenizers.min.mjs": "tokenizers.min.mjs",
    "@huggingface/jinja/dist/index.js": "jinja.js",
}
LICENSES = {"onnxruntime-web": "onnxruntime-web", "@huggingface/tokenizers": "tokenizers.js", "@huggingface/jinja": "jinja"}
ISOLATION = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"}


def runtime_dir() -> Path:
    """The node_modules holding the page's runtimes ($LAMBDASPLIT_NPM_DIR, else beside this package)."""
    folder = Path(os.environ.get("LAMBDASPLIT_NPM_DIR") or HERE / "node_modules")
    missing = [f for f in RUNTIME_FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"the page's runtimes are not installed ({folder / missing[0]} is missing): install "
                                f"them from the npm registry with: npm ci --prefix {HERE} (./run test does it)")
    return folder


def write_page(out: Path, server: str | None = None, int8: bool = False, backend: str = "auto") -> int:
    """Copy the page and its runtimes into `out` (beside the exported parts); returns the bytes written. The
    page's config names the body `server`, whether it loads the `int8` parts, and its `backend` (device.js)."""
    modules = runtime_dir()
    written = 0
    for source, name in [*((HERE / "static" / f, f) for f in PAGE_FILES),
                         *((modules / f, name) for f, name in RUNTIME_FILES.items())]:
        shutil.copy(source, out / name)
        written += (out / name).stat().st_size
    (out / "licenses").mkdir(exist_ok=True)
    for package, name in LICENSES.items():
        if (license_file := modules / package / "LICENSE").is_file():
            shutil.copy(license_file, out / "licenses" / f"{name}.LICENSE")
    (out / "config.json").write_text(json.dumps({"server": server or "", "int8": int8, "backend": backend}) + "\n")
    return written


class _PageHandler(SimpleHTTPRequestHandler):
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript", ".js": "text/javascript",
                      ".wasm": "application/wasm", ".onnx": "application/octet-stream", ".json": "application/json"}

    def end_headers(self):
        for name, value in ISOLATION.items():
            self.send_header(name, value)
        super().end_headers()

    def log_message(self, *args):  # quiet: a page load is many requests
        pass


def serve_page(folder: Path, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """Serve `folder` with the cross-origin isolation headers, on a daemon thread; returns the server
    (its `server_address` has the port; `shutdown()` stops it)."""
    server = ThreadingHTTPServer((host, port), functools.partial(_PageHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, name="lambdasplit-page", daemon=True).start()
    return server
