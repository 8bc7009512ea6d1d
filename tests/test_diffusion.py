"""Text-to-image split over the real body server: exactness against diffusers' unsplit pipelines (tiny SD and
SDXL built from configs), the mirror latent under lossy codecs, and bad input."""

from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from attack_helpers import refill_floats
from tiny_pipelines import build_sd, build_sdxl, unsplit_image

from lambdasplit.client.images import ImageClient, ImageConnection
from lambdasplit.client.transport import BodyConnection, BodyError
from lambdasplit.models.diffusion import (
    DiffusionModelError,
    ImageOptions,
    PipelineFacts,
    make_scheduler,
    noise_picture,
    to_rows,
)
from lambdasplit.server.process import ServerProcess
from lambdasplit.wire.codecs import get_codec
from lambdasplit.wire.frame import Frame, Limits, decode_frame, encode_frame
from lambdasplit.wire.protocol import ImageSessionRequest, WireFormat

PROMPT = "a photo of a red house"


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return build_sd(tmp_path_factory.mktemp("pipelines") / "tiny-sd")


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return build_sdxl(tmp_path_factory.mktemp("pipelines") / "tiny-sdxl")


@pytest.fixture(scope="module")
def sd_server(tiny_sd):
    with ServerProcess(str(tiny_sd), "0:0") as server:
        yield server


@pytest.fixture(scope="module")
def sdxl_server(tiny_sdxl):
    with ServerProcess(str(tiny_sdxl), "0:0") as server:
        yield server


def split_image(folder, url, options: ImageOptions, up="fp32", down="fp32", prompt=PROMPT):
    client = ImageClient(str(folder), server=url, up=up, down=down)
    result = client.generate(prompt, options)
    return client.tail.decode(result.latent, output_type="np"), result


@pytest.mark.parametrize("scheduler", ["default", "euler"])
def test_sd_split_makes_the_unsplit_pipelines_image(tiny_sd, sd_server, scheduler):
    options = ImageOptions(steps=4, guidance=5.0, seed=3, scheduler=scheduler)
    ours, result = split_image(tiny_sd, sd_server.url, options)
    theirs = unsplit_image(tiny_sd, PROMPT, steps=4, guidance=5.0, seed=3, scheduler=scheduler)
    assert ours.shape == theirs.shape == (1, 32, 32, 3)
    assert np.array_equal(ours, theirs), np.abs(ours - theirs).max()
    assert len(result.step_bytes) == 4 and result.frame_bytes_down == sum(result.step_bytes)
    # a lossless fp32 noise frame: 4 channels x 16 x 16 floats, plus the frame's header
    assert all(4 * 16 * 16 * 4 < b < 4 * 16 * 16 * 4 + 200 for b in result.step_bytes)


def test_sdxl_split_makes_the_unsplit_pipelines_image(tiny_sdxl, sdxl_server):
    options = ImageOptions(steps=3, guidance=4.0, seed=11)
    ours, result = split_image(tiny_sdxl, sdxl_server.url, options)
    theirs = unsplit_image(tiny_sdxl, PROMPT, steps=3, guidance=4.0, seed=11)
    assert np.array_equal(ours, theirs), np.abs(ours - theirs).max()
    # the uplink carried the SDXL extras: pooled embeddings and time ids, besides the embeddings and latent
    parts = [decode_frame(f).extra["part"] for f in result.uplink_frames]
    assert parts == ["prompt_embeds", "pooled", "time_ids", "latent"]


def test_without_guidance_and_another_seed_the_image_changes(tiny_sd, sd_server):
    a, _ = split_image(tiny_sd, sd_server.url, ImageOptions(steps=3, guidance=1.0, seed=1))
    b, _ = split_image(tiny_sd, sd_server.url, ImageOptions(steps=3, guidance=1.0, seed=2))
    theirs = unsplit_image(tiny_sd, PROMPT, steps=3, guidance=1.0, seed=1)
    assert np.array_equal(a, theirs) and not np.array_equal(a, b)


@pytest.mark.parametrize("codec", ["int8", "int4", "had+int2"])
def test_lossy_noise_keeps_both_ends_in_step(tiny_sd, sd_server, codec):
    """The server steps its mirror with the noise it decoded from its own frame: the device's latent ends
    bit-identical to the mirror (the last frame carries the mirror's digest; a drift raises)."""
    options = ImageOptions(steps=4, guidance=5.0, seed=3)
    lossy, result = split_image(tiny_sd, sd_server.url, options, up="fp16", down=codec)
    exact, full = split_image(tiny_sd, sd_server.url, options)
    assert result.down_codec == codec and not np.array_equal(lossy, exact)
    assert sum(result.step_bytes) < sum(full.step_bytes) / 3


def test_each_side_loads_only_its_parts(tiny_sd, sd_server):
    with ImageConnection(sd_server.url) as conn:
        info = conn.image_info()
    assert info.task == "text-to-image" and info.holds == ["unet"] and info.kind == "sd"
    client = ImageClient(str(tiny_sd), server=sd_server.url)
    assert client.head.pipe.unet is None and client.head.pipe.vae is None
    assert not hasattr(client.tail, "unet")


def test_a_language_model_client_is_told_what_the_server_serves(sd_server):
    with pytest.raises(BodyError, match="text-to-image"):
        BodyConnection(sd_server.url).info()


def _open(url, folder, **overrides):
    facts = PipelineFacts.read(folder)
    request = ImageSessionRequest(model_fingerprint=facts.fingerprint(), steps=2, guidance=5.0, height=32, width=32,
                                  wire=WireFormat(up="fp32", down="fp32"))
    request = request.model_copy(update=overrides)
    conn = ImageConnection(url)
    return conn, conn.open_image_session(request), facts


def _error(conn, data):
    conn.send(data)
    with pytest.raises(BodyError) as caught:
        conn.receive(Limits(), get_codec("fp32"))
    return caught.value


def test_bad_inputs_get_clear_errors_and_the_server_goes_on(tiny_sd, sd_server):
    with pytest.raises(BodyError, match="model mismatch"):
        _open(sd_server.url, tiny_sd, model_fingerprint="0" * 64)
    with pytest.raises(BodyError, match="multiple of 2"):
        _open(sd_server.url, tiny_sd, height=33)
    with pytest.raises(BodyError, match="int9"):
        _open(sd_server.url, tiny_sd, wire=WireFormat(up="int9", down="fp32"))
    with pytest.raises(BodyError, match="unknown scheduler"):
        _open(sd_server.url, tiny_sd, scheduler="ancestral")

    embeds = torch.zeros(2, 16, 32)
    cases = [
        (encode_frame(Frame("hidden", tensor=torch.zeros(8, 256), codec="fp32", extra={"part": "latent"})),
         "bad_shape"),  # the latent before the embeddings: refused by its width, before it is decoded
        (encode_frame(Frame("hidden", tensor=torch.zeros(2, 16, 31), codec="fp32", extra={"part": "prompt_embeds"})),
         "bad_shape"),
        (encode_frame(Frame("hidden", tensor=embeds, codec="fp16", extra={"part": "prompt_embeds"})), "bad_codec"),
        (refill_floats(encode_frame(Frame("hidden", tensor=embeds, codec="fp32", extra={"part": "prompt_embeds"})),
                       float("nan"), slice(None)), "non_finite"),
        (b"LSPL\x02garbage", "malformed"),
    ]
    for data, code in cases:
        conn, _, _ = _open(sd_server.url, tiny_sd)
        with conn:
            assert _error(conn, data).code == code
    # a session is used once: its socket is closed after an error, and the id is gone
    conn, opened, _ = _open(sd_server.url, tiny_sd)
    conn.close()
    req = urllib.request.Request(f"{sd_server.url}/v1/images/{opened.session_id}", method="DELETE")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(req, timeout=10)
    assert caught.value.code == 404 and json.loads(caught.value.read())["error"] == "unknown_session"
    # and after all that, an image still comes out right
    ours, _ = split_image(tiny_sd, sd_server.url, ImageOptions(steps=2, guidance=5.0, seed=3))
    assert np.array_equal(ours, unsplit_image(tiny_sd, PROMPT, steps=2, guidance=5.0, seed=3))


def test_options_are_checked_before_anything_runs(tiny_sd):
    with pytest.raises(DiffusionModelError, match="steps"):
        ImageOptions(steps=0).check()
    with pytest.raises(DiffusionModelError, match="unknown scheduler"):
        ImageOptions(scheduler="magic").check()
    facts = PipelineFacts.read(tiny_sd)
    assert len(make_scheduler(facts, "default", 7).timesteps) == 7  # the folder's own DDIM
    stochastic = dataclasses.replace(facts, scheduler_class="EulerAncestralDiscreteScheduler")
    with pytest.raises(DiffusionModelError, match="deterministic"):
        make_scheduler(stochastic, "default", 2)
    with pytest.raises(DiffusionModelError, match="multiple of 2"):
        facts.latent_shape(31, 32)


def test_noise_picture_is_rgba_one_channel_per_colour():
    noise = torch.zeros(1, 4, 8, 8)
    noise[0, 0, 0, 0] = 5.0  # a bright red pixel, the rest mid-grey
    noise[0, 3] = torch.randn(8, 8)
    picture = noise_picture(noise)
    assert picture.mode == "RGBA" and picture.size == (8, 8)
    pixels = np.asarray(picture)
    assert pixels[0, 0, 0] > 200 and pixels[1, 1, 0] < pixels[0, 0, 0]
    assert pixels[..., 3].std() > 10  # the fourth channel is the alpha plane
    assert to_rows(noise).shape == (4, 64)


def test_an_image_session_answers_only_its_opener(sd_server, tiny_sd):
    """Image sessions carry a session key too: the id alone opens no WebSocket and closes nothing, and
    the refusal is the unknown-session one, checked before the upgrade."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    request = ImageSessionRequest(model_fingerprint=PipelineFacts.read(tiny_sd).fingerprint(), steps=2, guidance=5.0,
                                  height=32, width=32, wire=WireFormat(up="fp32", down="fp32"))
    post = urllib.request.Request(f"{sd_server.url}/v1/images", data=json.dumps(request.model_dump()).encode(),
                                  headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(post, timeout=30) as reply:
        opened = json.loads(reply.read())
    assert len(opened["key"]) >= 32
    url = f"{sd_server.url}/v1/images/{opened['session_id']}"
    with pytest.raises(InvalidStatus) as refused:
        connect(url.replace("http://", "ws://") + "/ws", open_timeout=10)
    assert refused.value.response.status_code == 404
    for headers in ({}, {"X-Session-Key": "x" * 43}):
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(urllib.request.Request(url, headers=headers, method="DELETE"), timeout=10)
        assert caught.value.code == 404 and json.loads(caught.value.read())["error"] == "unknown_session"
    closing = urllib.request.Request(url, headers={"X-Session-Key": opened["key"]}, method="DELETE")
    with urllib.request.urlopen(closing, timeout=10) as reply:
        assert json.loads(reply.read()) == {"closed": True}
