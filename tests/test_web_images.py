"""The web app's Image tab API over real sockets: an image through a body server that holds the U-Net, its
steps as server-sent events (the picture so far, the noise that crossed the network, the bytes), bad settings
refused, and a stop between steps. Runs on the digits model when it has been made, else on a tiny random one."""

from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import pytest
from helpers import http_call
from PIL import Image
from test_web_api import sse_events

PROMPT = "a handwritten digit 7"


def picture(data_url: str) -> Image.Image:
    """A data: URL's PNG (the magic checked before decoding)."""
    prefix = "data:image/png;base64,"
    assert data_url.startswith(prefix)
    data = base64.b64decode(data_url[len(prefix):])
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(data))


def image_events(app, payload: dict, stop_after=None) -> tuple[int, list]:
    return sse_events(app.url, payload, stop_after, path="/api/image")


def test_info_describes_the_image_server(image_web):
    status, info, _ = http_call(image_web.url, "GET", "/api/info")
    image = info["image"]
    assert status == 200 and info["diffusion"] is True
    assert image["server"] == image_web.image_server.url and image["default_size"] == 32
    assert image["model"] == image["device_model"] and "ddim" in image["schedulers"]
    assert {"fp16", "int8", "int4", "had+int4"} <= set(image["codecs"]) and image["defaults"]["prompt"] == PROMPT
    assert info["model"] == "SmolLM2-135M-Instruct"  # the chat side is still there


def test_an_image_streams_its_steps(image_web):
    from lambdasplit.client.images import ImageClient
    from lambdasplit.models.diffusion import ImageOptions

    steps = 5
    status, events = image_events(image_web, {"prompt": PROMPT, "steps": steps, "seed": 3, "codec": "int8"})
    assert status == 200 and [e["type"] for e in events] == ["start"] + ["step"] * steps + ["done"]
    start, done, stepped = events[0], events[-1], events[1:-1]
    assert start["id"] and start["steps"] == steps and start["size"] == [32, 32] and start["bytes_up"] > 1000
    assert start["wire"] == {"up": "fp16", "down": "int8"}
    assert [e["index"] for e in stepped] == list(range(steps))
    assert all(e["bytes"] > 0 for e in stepped)
    assert [e["bytes_down"] for e in stepped] == list(np.cumsum([e["bytes"] for e in stepped]))
    for e in stepped:
        assert picture(e["noise"]).size == (128, 128)  # a 16 x 16 latent's noise, scaled up to be seen
        assert picture(e["noise"]).mode == "RGBA"
    previews = [picture(e["image"]) for e in stepped if "image" in e]
    assert len(previews) == steps - 1 and all(p.size == (32, 32) for p in previews)  # the last one is `done`'s
    assert done["finish_reason"] == "done" and done["steps"] == steps
    assert done["bytes_down"] == stepped[-1]["bytes_down"] and done["bytes_up"] == start["bytes_up"]
    assert done["bytes_per_step"] == pytest.approx(done["bytes_down"] / steps, abs=0.1)
    assert 0 < done["cloud_s"] <= done["seconds"]
    # the page's picture is the image the split client makes with the same settings
    client = ImageClient(str(image_web.folder), server=image_web.image_server.url, up="fp16", down="int8")
    direct = client.generate(PROMPT, ImageOptions(steps=steps, seed=3))
    got = np.asarray(picture(done["image"]).convert("RGB"), dtype=int)
    assert np.abs(got - np.asarray(direct.images[0], dtype=int)).max() <= 2
    # the same frames, but for the header's timing field, whose msgpack width follows the step's duration
    assert all(abs(a - e["bytes"]) <= 4 for a, e in zip(direct.step_bytes, stepped, strict=True))

    _, fewer = image_events(image_web, {"prompt": PROMPT, "steps": 2, "codec": "int4"})
    assert fewer[-1]["bytes_per_step"] < done["bytes_per_step"]  # the codec the page picks is the one used


@pytest.mark.parametrize("payload, words", [
    ({"prompt": PROMPT, "steps": 0}, "steps"),
    ({"prompt": PROMPT, "steps": 5000}, "steps"),
    ({"prompt": PROMPT, "codec": "int9"}, "int9"),
    ({"prompt": PROMPT, "up": "bogus"}, "bogus"),
    ({"prompt": PROMPT, "guidance": 100}, "guidance"),
    ({"prompt": PROMPT, "scheduler": "ancestral"}, "scheduler"),
    ({"prompt": PROMPT, "size": 64}, "size: Extra inputs are not permitted"),
    ({"prompt": ""}, "prompt"),
    ({"steps": 5}, "prompt: Field required"),
])
def test_bad_settings_are_refused(image_web, payload, words):
    status, body = image_events(image_web, payload)
    assert status == 400 and words in body[0]["error"]["message"], body


def test_guarded_like_the_chat(image_web):
    status, body, _ = http_call(image_web.url, "POST", "/api/image", b"[1, 2")
    assert status == 400 and "JSON" in body["error"]["message"]
    status, body, _ = http_call(image_web.url, "POST", "/api/image", json.dumps({"prompt": PROMPT}).encode(),
                                headers={"Origin": "https://attacker.example"})
    assert status == 403 and body["error"]["code"] == "forbidden_origin"


def test_stop_between_steps(image_web):
    stopped, start = [], {}

    def stop_early(event):
        if event["type"] == "start":
            start.update(event)
        if event["type"] == "step" and event["index"] == 1 and not stopped:
            stopped.append(http_call(image_web.url, "POST", f"/api/image/{start['id']}/stop")[0])

    status, events = image_events(image_web, {"prompt": PROMPT, "steps": 60}, stop_after=stop_early)
    done = events[-1]
    assert status == 200 and stopped == [204]
    assert done["type"] == "done" and done["finish_reason"] == "cancelled" and 2 <= done["steps"] < 60
    assert picture(done["image"]).size == (32, 32)  # the latent as far as it got
    assert http_call(image_web.url, "POST", f"/api/image/{start['id']}/stop")[0] == 404


def test_large_images_are_previewed_within_a_fifth_of_the_time():
    from types import SimpleNamespace

    from lambdasplit.web.images import Progress

    progress, step = Progress(started=time.perf_counter() - 1.0), SimpleNamespace(index=3, steps=25)
    assert progress.preview_due(step, 512)  # nothing decoded yet
    progress.decoding_s = 0.3  # decoding has taken 30% of the time
    assert not progress.preview_due(step, 512) and progress.preview_due(step, 64)  # small ones: every step
    assert not progress.preview_due(SimpleNamespace(index=24, steps=25), 64)  # the last step's is `done`'s
