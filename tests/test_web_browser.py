"""The web UI in real headless Chromium (Debian's package, driven by Playwright; never a downloaded browser).

Screenshots of the main views are kept in test-artifacts/ (or $LAMBDASPLIT_ARTIFACTS)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import WEB_LEAKAGE

from lambdasplit.net.tap import observe

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("LAMBDASPLIT_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts"))
# the flags that keep Chromium off the network: this machine (and a user's) has no business with Google's hosts
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]

if CHROMIUM is None:
    if os.environ.get("LAMBDASPLIT_REQUIRE_BROWSER"):
        raise RuntimeError("LAMBDASPLIT_REQUIRE_BROWSER is set but there is no chromium on PATH "
                           "(apt-get install chromium)")
    pytest.skip("no chromium on PATH (Debian package 'chromium'); ./run test installs it as root",
                allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


def open_page(browser, app):
    """The app's page, ready; afterwards, no errors logged and nothing fetched from outside the device."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    outside = []
    page.on("request", lambda req: outside.append(req.url) if not req.url.startswith((app.url, "data:")) else None)
    page.goto(f"{app.url}/")
    page.wait_for_selector("body[data-ready='1']")
    yield page
    context.close()
    assert not errors, f"the page logged errors: {errors}"
    assert not outside, f"the page fetched from outside the device: {outside}"


@pytest.fixture
def page(browser, web):
    yield from open_page(browser, web)


@pytest.fixture
def image_page(browser, image_web):
    yield from open_page(browser, image_web)


def ask(page, prompt: str, max_tokens: int | None = None) -> None:
    if max_tokens is not None:
        page.fill("#max_tokens", str(max_tokens))
    page.fill("[data-testid=prompt]", prompt)
    page.click("[data-testid=send]")


def finished(page):
    page.wait_for_selector("[data-testid=finish]", timeout=120_000)
    return page.locator("[data-testid=assistant-message]").last


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def test_chat_streams_tokens_and_the_wire_panel_counts_bytes(page, web):
    prompt = "What is the difference between AI, ML and DL?"
    ask(page, prompt, max_tokens=48)
    # tokens arrive while the answer is still being generated, not all at the end
    page.wait_for_function("() => { const b = document.querySelector('[data-testid=assistant-message]');"
                           " return b && b.classList.contains('streaming') && b.textContent.length > 0 }",
                           timeout=120_000)
    partial = page.locator("[data-testid=assistant-message]").text_content()
    answer = finished(page)
    assert len(answer.text_content()) > len(partial) > 0
    assert answer.get_attribute("data-finish") in ("length", "stop")
    up = int(page.get_attribute("[data-testid=bytes-up]", "data-bytes"))
    down = int(page.get_attribute("[data-testid=bytes-down]", "data-bytes"))
    steps = int(page.text_content("[data-testid=steps]"))
    assert up > 576 * 4 * 10 and down > 576 * 4 and steps >= 2  # the prompt's states went up in fp32
    assert "ms" in page.text_content("[data-testid=latency]")
    hex_up = page.text_content("[data-testid=hex-up]")
    assert hex_up.split()[1:5] == ["4c", "53", "50", "4c"]  # an LSPL frame
    assert prompt in page.text_content("[data-testid=cloud-only]")  # what cloud-only would have sent
    shown = hex_up + page.text_content("[data-testid=hex-down]")
    assert "difference" not in shown and "AI, ML" not in shown
    carried = b"".join(r.up + r.down for r in web.link.recordings)
    assert prompt.encode() not in carried and b"difference" not in carried  # the real traffic, too
    # the heatmap drew the state: a 24 x 24 grid for D = 576
    assert page.evaluate("() => document.querySelector('[data-testid=heat-up]').width") == 24
    # the read-back of this conversation's uplink: every fed position, the truth above what the attack read
    page.wait_for_selector("#readback[data-done='1']", timeout=60_000)
    summary = page.locator("[data-testid=readback-summary]")
    finish = page.text_content("[data-testid=finish]").split()
    fed = int(summary.get_attribute("data-positions"))
    assert fed > int(finish[0]) and fed == page.locator("#readback .tok").count()
    assert 0 <= int(summary.get_attribute("data-hits")) <= fed and "layer 1" in summary.text_content()
    assert "difference" in page.text_content("#readback .tokens")  # the truth, from the device
    shot(page, "web-chat.png")


def test_switching_the_codec(page, web):
    page.select_option("[data-testid=codec-up]", "int8")
    page.select_option("[data-testid=codec-down]", "fp16")
    before = len(web.link.recordings)
    ask(page, "Say hello.", max_tokens=6)
    finished(page)
    assert "up int8 · down fp16" in page.text_content("#wire-codecs")
    assert "1 × 576" in page.text_content("#down-len")
    # the session the network saw asked for these codecs, and its frames were that size
    seen = observe(web.link.recordings[before:])
    wires = [s.wire for s in seen.sessions]
    assert {"up": "int8", "down": "fp16"}.items() <= wires[-1].items()
    one_row_down = [f for f in seen.frames if f.direction == "down" and f.shape[:1] == (1,)]
    assert one_row_down and all(f.size < 576 * 2 + 200 for f in one_row_down)  # fp16: 2 bytes a value


def test_stop_a_generation(page):
    ask(page, "Write a very long story about a dragon who learns to code.", max_tokens=400)
    page.wait_for_function("() => document.querySelector('[data-testid=assistant-message]')?.textContent.length > 0",
                           timeout=120_000)
    page.click("[data-testid=stop]")
    answer = finished(page)
    assert answer.get_attribute("data-finish") == "cancelled"
    assert int(page.text_content("[data-testid=finish]").split()[0]) < 400
    page.wait_for_selector("#readback[data-done='1']", timeout=60_000)  # the run ends with its read-back
    assert page.is_enabled("[data-testid=send]")


def test_split_points_and_measured_leakage(page):
    leakage = page.locator("[data-testid=leakage]")
    assert f"{WEB_LEAKAGE[1]:.1%}" in leakage.text_content()  # the default split 1:29: uplink at layer 1
    page.fill("[data-testid=x]", "2")
    page.fill("[data-testid=y]", "28")
    page.dispatch_event("[data-testid=y]", "change")
    page.wait_for_function(f"() => document.querySelector('[data-testid=leakage]').textContent"
                           f".includes('{WEB_LEAKAGE[28]:.1%}')")
    text = leakage.text_content()
    assert f"{WEB_LEAKAGE[2]:.1%}" in text and "layer 2" in text and "layer 28" in text
    ask(page, "Hi!", max_tokens=4)
    finished(page)
    assert "split 2:28" in page.text_content("#wire-codecs")
    shot(page, "web-split.png")


def test_image_tab_renders_an_image(page, image_page):
    assert page.is_disabled("#tab-image")  # no image server: the tab stays off, saying why
    assert "diffusion" in page.get_attribute("#tab-image", "title")
    page = image_page
    page.click("#tab-image")
    assert page.is_hidden("#chat-pane") and page.is_visible("#image-pane")
    assert page.input_value("[data-testid=image-prompt]") == "a handwritten digit 7"
    page.fill("[data-testid=image-steps]", "10")
    page.select_option("[data-testid=image-codec]", "int8")
    page.click("[data-testid=generate]")
    page.wait_for_selector("[data-testid=image-out][data-finish=done]", timeout=120_000)
    assert page.get_attribute("[data-testid=image-step]", "data-step") == "10"
    figures = {name: int(page.get_attribute(f"[data-testid=image-{name}]", "data-bytes"))
               for name in ("step-bytes", "bytes-down", "bytes-up")}
    assert 0 < figures["step-bytes"] and figures["bytes-down"] >= 10 * figures["step-bytes"] * 0.9
    assert figures["bytes-up"] > 0
    sizes = page.evaluate("() => ['image-out', 'image-noise'].map((id) => document.getElementById(id).naturalWidth)")
    assert sizes == [32, 128]  # the 32 x 32 picture (shown large) and its 16 x 16 latent's noise, scaled up
    totals = page.text_content("[data-testid=image-totals]")
    assert "10 steps" in totals and "int8" in totals and "per step" in totals
    assert "a handwritten digit 7" in page.text_content("[data-testid=image-cloud-only]")
    shot(page, "web-image.png")
    page.click("#tab-chat")  # and back: the chat is as it was
    assert page.is_visible("[data-testid=prompt]") and page.is_hidden("#image-pane")
