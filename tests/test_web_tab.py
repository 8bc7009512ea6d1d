"""The web UI with the device in the tab (`lambdasplit web --in-browser DIR`), in real headless Chromium: the
page runs the exported head and tail itself, opens its body session through the app (which holds the token),
streams frames to a real body server (`serve --allow-origin` for the app's origin) through a recording link,
and draws the same panels as with the Python device, plus the read-back of its own uplink."""

from __future__ import annotations

import socket

import pytest
from test_web_browser import CHROMIUM, FLAGS, shot  # noqa: F401  (skips without chromium)

from lambdasplit.client.generate import SplitClient
from lambdasplit.data import PAPER_PROMPT
from lambdasplit.net.link import link_to
from lambdasplit.net.tap import observe
from lambdasplit.server.auth import add_token
from lambdasplit.server.process import ServerProcess
from lambdasplit.web.process import WebProcess
from lambdasplit.web.readback import ReadBack

TOKENS = 16


@pytest.fixture(scope="module")
def tab_web(smol_dir, browser_export, tmp_path_factory):
    with socket.socket() as s:  # the app's port must be known before: the body server allows its origin
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    origin = f"http://127.0.0.1:{port}"
    folder = tmp_path_factory.mktemp("token")
    token = add_token(folder / "tokens", "tab")
    (folder / "token").write_text(token)
    with ServerProcess(str(smol_dir), "1:29", "--allow-origin", origin, "--tokens", str(folder / "tokens")) as body:
        link = link_to(body.url, "0ms", record=True)
        try:
            with WebProcess(link.url, "--port", str(port), "--wire", "fp32", "--token-file", str(folder / "token"),
                            "--in-browser", str(browser_export)) as app:
                app.body, app.link, app.token = body, link, token
                yield app
                assert app.proc.poll() is None, "the web app died during the tests:\n" + "\n".join(app.log)
        finally:
            link.stop()


@pytest.mark.slow
def test_the_tab_device_chats_like_the_python_device(smol_dir, tab_web):
    from playwright.sync_api import sync_playwright

    want_client = SplitClient(smol_dir, server=tab_web.body.url, split=(1, 29), wire="fp32",
                       token=tab_web.token)
    prompt_ids = want_client.encode_prompt(PAPER_PROMPT)
    want = want_client.generate(PAPER_PROMPT, max_new_tokens=TOKENS)
    link_ws = tab_web.link.url.replace("http", "ws")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_context(viewport={"width": 1400, "height": 1100}).new_page()
        errors, outside, posted = [], [], []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: (posted.append((r.url, r.post_data or "")) if r.url.startswith(tab_web.url)
                                      else None if r.url.startswith((link_ws, "data:")) else outside.append(r.url)))
        page.goto(f"{tab_web.url}/")
        page.wait_for_selector("body[data-tab-ready='1']", timeout=180_000)
        assert page.input_value("[data-testid=device-mode]") == "tab"
        assert "WASM threads" in page.text_content("#tab-status")  # no WebGPU adapter here; isolated: threads
        assert page.is_disabled("[data-testid=x]") and page.input_value("[data-testid=x]") == "1"
        offered = page.eval_on_selector_all("[data-testid=codec-up] option", "os => os.map((o) => o.value)")
        assert "fp32" in offered and "had+int4" not in offered  # only the codecs the page's wire module speaks
        page.select_option("[data-testid=codec-up]", "fp32")
        page.select_option("[data-testid=codec-down]", "fp32")
        page.fill("#max_tokens", str(TOKENS))
        page.fill("[data-testid=prompt]", PAPER_PROMPT)
        page.click("[data-testid=send]")
        page.wait_for_selector("#readback[data-done='1']", timeout=180_000)
        bubble = page.locator("[data-testid=assistant-message]").last
        answer = bubble.evaluate("(b) => b.firstChild.textContent")
        figures = {k: page.get_attribute(f"[data-testid={k}]", "data-bytes") for k in ("bytes-up", "bytes-down")}
        hex_up = page.text_content("[data-testid=hex-up]")
        cloud_only = page.text_content("[data-testid=cloud-only]")
        summary = page.locator("[data-testid=readback-summary]")
        hits, positions = int(summary.get_attribute("data-hits")), int(summary.get_attribute("data-positions"))
        readback = page.text_content("[data-testid=readback]")
        shot(page, "web-tab.png")
        tab_posts = [(url, data) for url, data in posted if data]
        tab_recordings = list(tab_web.link.recordings)
        # the same page, the other device: the Python head and tail answer through /api/chat
        page.select_option("[data-testid=device-mode]", "python")
        assert page.is_enabled("[data-testid=x]")
        page.fill("[data-testid=prompt]", "Thanks!")
        page.fill("#max_tokens", "4")
        page.click("[data-testid=send]")
        page.wait_for_selector("[data-device=python] [data-testid=finish]", timeout=120_000)
        page.wait_for_selector("#readback[data-done='1']", timeout=120_000)
        python_readback = page.text_content("[data-testid=readback]")
        browser.close()
    assert not errors, errors
    assert not outside, f"the page fetched from elsewhere: {outside}"
    assert answer == want.text  # greedy, fp32 wire: the tab's answer is the Python client's
    assert int(figures["bytes-up"]) > 576 * 4 * 20 and int(figures["bytes-down"]) > 576 * 4
    assert hex_up.split()[1:5] == ["4c", "53", "50", "4c"]
    assert PAPER_PROMPT in cloud_only
    # the read-back: every fed position (the prompt's and all but the last answer token), mostly recovered
    # the read-back: every fed position (the prompt's and all but the last answer token), and exactly what the
    # attack reads from the uplink frames the body server received (an observer's decoding of the recording)
    assert positions == len(prompt_ids) + len(want.token_ids) - 1
    seen = observe(tab_recordings)
    at, states = seen.states("up", seen.main_session())
    expected = ReadBack(smol_dir, 30, 576).run(1, at, states)
    truth = (prompt_ids + want.token_ids)
    assert at == list(range(positions))
    assert hits == sum(g[0] == truth[p] for p, g in zip(at, expected["guesses"]))
    assert f"{expected['attack']} attack on the uplink states at layer 1" in " ".join(readback.split())
    assert "attack on the uplink states at layer 1" in python_readback
    # the prompt and the answer stayed in the tab: not in the frames to the body server, not in what the page
    # posted to the app (the session's codecs, then base64 frames), and the page never used /api/chat for them
    carried = b"".join(r.up + r.down for r in tab_web.link.recordings)
    assert PAPER_PROMPT.encode() not in carried and b"difference" not in carried
    assert want.text.strip()[:30].encode() not in carried
    assert any(url.endswith("/api/body-session") for url, _ in tab_posts)
    assert any(url.endswith("/api/attack") for url, _ in tab_posts)
    assert not any(url.endswith("/api/chat") for url, _ in tab_posts)
    assert not any("difference" in data or want.text.strip()[:30] in data for _, data in tab_posts)
    assert tab_web.token not in "".join(data for _, data in posted)
