"""The device in a browser tab, end to end in real headless Chromium (Debian's package, through Playwright):
the page exported by `export-web` runs the tokenizer, the head and the tail in WASM, opens a session on a
real body server (`serve --allow-origin` for the page's origin, the key as a WebSocket subprotocol), and
generates the paper's prompt with the fp32 wire: its greedy tokens must equal the Python client's. What
crossed the WebSocket must hold neither the prompt nor the answer."""

from __future__ import annotations

import pytest
from test_web_browser import CHROMIUM, FLAGS  # noqa: F401  (skips without chromium, as the web UI's tests do)

from lambdasplit.browser.page import serve_page
from lambdasplit.client.generate import SplitClient
from lambdasplit.data import PAPER_PROMPT
from lambdasplit.server.process import ServerProcess

TOKENS = 32


@pytest.fixture(scope="module")
def page_folder(browser_export):
    server = serve_page(browser_export)
    yield browser_export, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def body(smol_dir, page_folder):
    """A body server for 1:29 that allows the page's origin, and the Python client's fp32-wire greedy tokens."""
    with ServerProcess(str(smol_dir), "1:29", "--allow-origin", page_folder[1]) as server:
        want = SplitClient(smol_dir, server=server.url, split=(1, 29), wire="fp32").generate(
            PAPER_PROMPT, max_new_tokens=TOKENS, stop_at_eos=False)
        yield server, want


@pytest.mark.slow
def test_the_page_generates_the_python_clients_tokens(page_folder, body):
    from playwright.sync_api import sync_playwright

    folder, origin = page_folder
    body, want = body
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page()
        errors, outside = [], []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: None if r.url.startswith((origin, body.url.replace("http", "ws"), body.url))
                else outside.append(r.url))
        fetched = []
        page.on("request", lambda r: fetched.append(r.url.rsplit("/", 1)[-1]))
        page.goto(origin + "/index.html")
        page.wait_for_function("window.lambdasplitDevice !== undefined", timeout=120_000)
        got = page.evaluate("""async ([server, prompt, n]) => {
            const device = window.lambdasplitDevice;
            await device.connect(server, { wire: "fp32" });
            const ids = [], started = performance.now();
            let first = 0, deviceMs = 0;
            for await (const t of device.generate(prompt, { maxNewTokens: n, stopAtEos: false })) {
                if (!ids.length) first = performance.now() - started;
                ids.push(t.id); deviceMs += t.deviceMs;
            }
            const seconds = (performance.now() - started) / 1000;
            const bytes = (frames) => Array.from(frames.map((f) => String.fromCharCode(...f)).join(""));
            const result = { ids, isolated: crossOriginIsolated, first, deviceMs: deviceMs / ids.length,
                             tokensPerS: ids.length / seconds, traffic: device.traffic,
                             wire: bytes(device.sent).join("") + bytes(device.received).join("") };
            device.close();
            return result;
        }""", [body.url, PAPER_PROMPT, TOKENS])
        default = page.evaluate("""async ([server, prompt]) => {  // no wire given: the model family's default
            const device = window.lambdasplitDevice;
            await device.connect(server);
            const ids = [];
            for await (const t of device.generate(prompt, { maxNewTokens: 8, stopAtEos: false })) ids.push(t.id);
            device.close();
            return { ids, wire: [device.up, device.down] };
        }""", [body.url, PAPER_PROMPT])
        browser.close()
    assert not errors, errors
    assert not outside, f"the page fetched from elsewhere: {outside}"
    assert got["isolated"]  # COOP/COEP from serve_page: ONNX Runtime may use its threads
    assert "ort-wasm-simd-threaded.wasm" in fetched  # no adapter: WASM, and the WebGPU build is never fetched
    assert not any("webgpu" in name or "asyncify" in name for name in fetched), fetched
    assert got["ids"] == want.token_ids
    assert default["wire"] == ["int6+out:4", "int8+out:4"] and len(default["ids"]) == 8
    wire = got["wire"].encode("latin-1")
    assert PAPER_PROMPT.encode() not in wire and want.text.strip()[:40].encode() not in wire
    for word in ("difference", "Machine"):
        assert word.encode() not in wire
    print(f"\nbrowser device: first token {got['first']:.0f} ms, device {got['deviceMs']:.1f} ms a token, "
          f"{got['tokensPerS']:.1f} tokens/s, {got['traffic']}")


WEBGPU_TOKENS = 4  # a software adapter (SwiftShader) takes seconds a token


@pytest.mark.slow
def test_the_page_runs_on_webgpu(page_folder, body):
    """With WebGPU enabled, Chromium offers SwiftShader's software adapter: the WebGPU build of ONNX Runtime runs
    the parts on it (?backend=webgpu) and gives the Python client's greedy tokens; `auto` keeps a software
    adapter off (WASM is faster), and a browser without an adapter refuses an explicit webgpu clearly."""
    from playwright.sync_api import sync_playwright

    _, origin = page_folder
    body, want = body
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[*FLAGS, "--enable-unsafe-webgpu"])
        page = browser.new_page()
        errors, fetched = [], []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: fetched.append(r.url.rsplit("/", 1)[-1]))
        page.goto(origin + "/index.html?backend=webgpu")
        page.wait_for_function("window.lambdasplitDevice !== undefined", timeout=120_000)
        got = page.evaluate("""async ([server, prompt, n]) => {
            const device = window.lambdasplitDevice;
            const { chooseBackend } = await import("./device.js");
            await device.connect(server, { wire: "fp32" });
            const ids = [];
            for await (const t of device.generate(prompt, { maxNewTokens: n, stopAtEos: false })) ids.push(t.id);
            device.close();
            return { ids, backend: device.backend, auto: await chooseBackend("auto"),
                     button: document.getElementById("go").textContent };
        }""", [body.url, PAPER_PROMPT, WEBGPU_TOKENS])
        browser.close()

        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)  # no WebGPU
        page = browser.new_page()
        page.goto(origin + "/index.html?backend=webgpu")
        page.wait_for_function("document.getElementById('stats').textContent !== ''", timeout=60_000)
        refused = page.text_content("#stats")
        browser.close()
    assert not errors, errors
    assert got["backend"] == "webgpu" and "WebGPU" in got["button"]
    assert got["ids"] == want.token_ids[:WEBGPU_TOKENS]
    assert got["auto"] == "wasm"  # SwiftShader is a software adapter
    assert "ort.webgpu.min.mjs" in fetched and "ort-wasm-simd-threaded.asyncify.wasm" in fetched
    assert "ort.wasm.min.mjs" not in fetched
    assert "no WebGPU adapter" in refused and "wasm" in refused
