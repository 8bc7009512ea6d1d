"""The device's local API over real sockets: the official `openai` client through the split, the page's
own event stream, errors in OpenAI's shape, the loopback guard, and what the network carried."""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

import openai
import pytest
from helpers import hf_greedy, http_call

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def api(web):
    return openai.OpenAI(base_url=f"{web.url}/v1", api_key=web.api_key, max_retries=0, timeout=120)


def greedy_answer(hf_model, tokenizer, prompt: str, n: int) -> tuple[str, bool]:
    """The unsplit model's greedy answer (n tokens, cut at EOS), and whether it hit EOS."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    ids = hf_greedy(hf_model, tokenizer(text, add_special_tokens=False)["input_ids"], n)
    eos = tokenizer.eos_token_id
    return tokenizer.decode(ids[:ids.index(eos)] if eos in ids else ids, skip_special_tokens=True), eos in ids


def sse_events(url: str, payload: dict, stop_after=None, path: str = "/api/chat") -> tuple[int, list]:
    """POST payload to `path` and read the server-sent events; `stop_after(event)` may act mid-stream."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    try:
        conn.request("POST", path, json.dumps(payload), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            return resp.status, [json.loads(resp.read())]
        events = []
        for line in resp:
            if line.startswith(b"data: "):
                events.append(json.loads(line[6:]))
                if stop_after is not None:
                    stop_after(events[-1])
        return resp.status, events
    finally:
        conn.close()


def test_models(api):
    assert [m.id for m in api.models.list()] == [MODEL]
    assert api.models.retrieve(MODEL).owned_by == "lambdasplit"
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("gpt-4o")


def test_openai_client_streams_through_the_split(api, hf_model, tokenizer):
    prompt = "Name three primary colors."
    expected, _ = greedy_answer(hf_model, tokenizer, prompt, 16)
    stream = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                         temperature=0, max_tokens=16, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3, "the answer must arrive in pieces"
    assert "".join(pieces) == expected  # fp32 wire, greedy: exactly the unsplit model's answer
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish in (["length"], ["stop"])
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens <= 16 and usage.prompt_tokens > 5
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_stop_max_tokens_and_usage(api, hf_model, tokenizer):
    prompt = "Count from one to ten in words."
    expected, _ = greedy_answer(hf_model, tokenizer, prompt, 24)
    word = expected.split()[3]
    messages = [{"role": "user", "content": prompt}]
    r = api.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24, stop=[word, "zzz"])
    assert r.choices[0].message.content == expected[:expected.index(word)]
    assert r.choices[0].finish_reason == "stop" and r.object == "chat.completion"
    r = api.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_completion_tokens=3)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    assert expected.startswith(r.choices[0].message.content)


def test_seed_makes_sampling_reproducible(api):
    def sample(seed):
        r = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}],
                                        temperature=1.0, top_p=0.95, seed=seed, max_tokens=12)
        return r.choices[0].message.content

    first = sample(7)
    assert first and sample(7) == first


@pytest.mark.parametrize("payload, status, param, code", [
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", "model_not_found"),
    ({"model": MODEL, "messages": []}, 400, "messages", None),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400, "temperature", None),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n", "unsupported_parameter"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
     400, "tools", "unsupported_parameter"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]},
     400, "stop", None),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages", None),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages", None),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens", None),
])
def test_errors_have_openais_shape(web, payload, status, param, code):
    got, body, _ = http_call(web.url, "POST", "/v1/chat/completions", json.dumps(payload).encode(),
                             headers={"Authorization": f"Bearer {web.api_key}"})
    assert got == status, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param and error["code"] == code
    assert error["type"] == "invalid_request_error"


def test_a_prompt_longer_than_the_context(api):
    with pytest.raises(openai.BadRequestError, match="no room is left"):
        api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 9000}])


def test_the_api_needs_its_key(web):
    payload = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": web.api_key}):
        status, body, _ = http_call(web.url, "POST", "/v1/chat/completions", payload, headers=headers)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{web.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert http_call(web.url, "GET", "/api/info")[0] == 200  # the page's own API is loopback-only, keyless


def test_garbage_body_is_a_clear_error(web):
    status, body, _ = http_call(web.url, "POST", "/v1/chat/completions", b"\xff not json",
                                headers={"Authorization": f"Bearer {web.api_key}"})
    assert status == 400 and "JSON" in body["error"]["message"]
    status, body, _ = http_call(web.url, "POST", "/api/chat", b"[1, 2")
    assert status == 400 and "JSON" in body["error"]["message"]


def test_only_loopback_hosts_and_origins(web):
    port = urlsplit(web.url).port
    status, body, _ = http_call(web.url, "GET", "/api/info", headers={"Host": f"attacker.example:{port}"})
    assert status == 403 and body["error"]["code"] == "forbidden_host"  # DNS rebinding
    status, body, _ = http_call(web.url, "POST", "/v1/chat/completions", b"{}",
                                headers={"Origin": "https://attacker.example"})
    assert status == 403 and body["error"]["code"] == "forbidden_origin"  # another site's page
    status, body, _ = http_call(web.url, "POST", "/api/chat", b"{}", headers={"Origin": "null"})
    assert status == 403 and body["error"]["code"] == "forbidden_origin"  # a sandboxed page
    status, body, _ = http_call(web.url, "GET", "/api/info", headers={"Origin": f"http://localhost:{port}"})
    assert status == 200 and body["model"] == MODEL and body["served"] == [0, 30]


def test_page_events_stop_and_bad_settings(web):
    prompt = "Write a long essay about the history of the bicycle."
    stopped = []

    def stop_early(event):
        # after a few pieces (the counters must have moved), not on the first: a stop that lands before
        # the second step would leave nothing to compare
        texts.append(event["type"] == "text")
        if sum(texts) == 3 and not stopped:
            stopped.append(http_call(web.url, "POST", f"/api/chat/{start['id']}/stop")[0])
        if event["type"] == "start":
            start.update(event)

    start, texts = {}, []
    status, events = sse_events(web.url, {"messages": [{"role": "user", "content": prompt}], "max_tokens": 200},
                                stop_after=stop_early)
    assert status == 200 and stopped == [204]
    assert events[0]["type"] == "start" and prompt in events[0]["cloud_only"]
    assert events[0]["split"] == [1, 29] and events[0]["wire"] == {"up": "fp32", "down": "fp32"}
    done = events[-2]  # the last: the attack's read-back
    assert done["type"] == "done" and done["finish_reason"] == "cancelled" and done["completion_tokens"] < 200
    wire = [e for e in events if e["type"] == "wire"]
    assert wire[-1]["bytes_up"] > wire[0]["bytes_up"] > 0 and wire[-1]["steps"] >= len(wire) - 1
    frames = next(e["frames"] for e in wire if "frames" in e)
    assert frames["up"]["dim"] == 576 and len(frames["up"]["state"]) == 576
    assert frames["up"]["hex"].split()[1:5] == ["4c", "53", "50", "4c"]  # "LSPL": a frame, not text
    assert http_call(web.url, "POST", f"/api/chat/{start['id']}/stop")[0] == 404  # finished: unknown now

    for settings, words in [({"x": 3, "y": 2}, "outside"), ({"up": "int9"}, "int9"), ({"x": 0, "y": 31}, "outside")]:
        status, body = sse_events(web.url, {"messages": [{"role": "user", "content": "hi"}], **settings})
        assert status == 400 and words in body[0]["error"]["message"], body


def test_the_attack_reads_back_the_uplink(web, smol_dir, tokenizer):
    """After `done`, the page's stream reads back this conversation's uplink (the prompt's and every fed answer
    token's state at X = 1) beside the truth; /api/attack does the same for frames a page posts, and at layer 0
    (the embeddings) the public-weights attack reads every token back."""
    import base64

    import torch

    from lambdasplit.models.llm import load_split
    from lambdasplit.wire.codecs import get_codec
    from lambdasplit.wire.frame import Frame, encode_frame

    prompt = "Where is the Eiffel tower?"
    status, events = sse_events(web.url, {"messages": [{"role": "user", "content": prompt}], "max_tokens": 6})
    assert status == 200 and [e["type"] for e in events[-2:]] == ["done", "attack"]
    attack, done = events[-1], events[-2]
    fed = done["prompt_tokens"] + done["completion_tokens"] - (done["finish_reason"] == "length")
    assert attack["positions"] == list(range(fed)) and attack["layer"] == 1 and attack["prompt_tokens"] > 5
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert attack["truth"][:len(ids)] == ids
    assert len(attack["guesses"]) == fed and all(len(g) == 5 for g in attack["guesses"])

    head = load_split(smol_dir, 0, 30, parts=("head",)).head
    with torch.inference_mode():
        embeddings = head(torch.tensor([ids]), None, 0)[0]
    fp16 = get_codec("fp16")
    frames = [encode_frame(Frame("hidden", pos=0, tensor=embeddings[:4], codec=fp16)),
              encode_frame(Frame("hidden", pos=4, tensor=embeddings[4:], codec=fp16))]
    body = {"layer": 0, "frames": [base64.b64encode(f).decode() for f in frames]}
    status, found, _ = http_call(web.url, "POST", "/api/attack", json.dumps(body).encode())
    assert status == 200 and found["positions"] == list(range(len(ids)))
    assert [g[0] for g in found["guesses"]] == ids and found["attack"] == "nearest-embedding"

    wrong_width = encode_frame(Frame("hidden", tensor=torch.zeros(2, 64), codec=get_codec("fp32")))
    for payload, words in [({"layer": 0, "frames": ["not base64!"]}, "not a base64"),
                           ({"layer": 0, "frames": [base64.b64encode(b"LSPL garbage").decode()]}, "frame 0"),
                           ({"layer": 0, "frames": [base64.b64encode(wrong_width).decode()]}, "576"),
                           ({"layer": 31, "frames": body["frames"]}, "layer"),
                           ({"layer": 0, "frames": []}, "frames"),
                           ({"layer": 0}, "frames")]:
        status, error, _ = http_call(web.url, "POST", "/api/attack", json.dumps(payload).encode())
        assert status == 400 and words in error["error"]["message"], (payload, error)
    assert http_call(web.url, "POST", "/api/attack", json.dumps(body).encode())[0] == 200  # still serving


def test_without_an_image_server_there_is_no_image_tab(web):
    status, info, _ = http_call(web.url, "GET", "/api/info")
    assert status == 200 and info["diffusion"] is False and "image" not in info
    status, body = sse_events(web.url, {"prompt": "a handwritten digit 7"}, path="/api/image")
    assert status == 404 and body[0]["error"]["code"] == "no_image_server"


def test_the_prompt_never_crosses_the_network(web):
    secret = "My bank PIN is 4729 and my name is Zebulon Quark."
    status, events = sse_events(web.url, {"messages": [{"role": "user", "content": secret}], "max_tokens": 8})
    answer = "".join(e["text"] for e in events if e["type"] == "text")
    assert status == 200 and answer.strip()
    recordings = web.link.recordings
    assert recordings and all(r.complete for r in recordings)
    carried = b"".join(r.up + r.down for r in recordings)
    assert b"LSPL" in carried  # the frames did cross
    # Only pieces that cannot turn up by chance: a bare "4729" can, inside a number in a frame's JSON
    # header (a body time of 0.04729 s), and so can a short answer ("Hi").
    pieces = [secret, "Zebulon Quark", "PIN is 4729"] + ([answer.strip()] if len(answer.strip()) >= 8 else [])
    for text in pieces:
        assert text.encode() not in carried, f"{text!r} crossed the network"


@pytest.mark.slow
def test_bench_web_writes_its_table(full_server, tmp_path):
    from test_cli import cli

    r = cli("bench", "web", "--server", full_server.url, "--split", "1:29", "--tokens", "6", "--repeats", "1",
            "--out", str(tmp_path), timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads((tmp_path / "web.json").read_text())["rows"]
    assert [row["path"].split(" (")[0] for row in rows] == ["direct", "web page events", "OpenAI API, streamed",
                                                           "OpenAI API, whole answer"]
    assert all(row["tokens"] == 6 and row["tokens_per_s"] > 0 for row in rows)
    assert rows[0]["ratio"] == 1.0 and rows[1]["first_token_ms"] > 0 and rows[3]["first_token_ms"] is None
    assert "| OpenAI API, streamed | 6 |" in (tmp_path / "web.md").read_text()
