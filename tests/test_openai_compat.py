"""The web app as other software sees it, over real sockets: the legacy text completions through the official
`openai` client and LangChain, errors in OpenAI's shape on every route, /health and /metrics, and what
--allow-host, --allow-origin and --served-model-name open (a second `lambdasplit web`, listening on every
address as it must for an app in a container)."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

import openai
import pytest
from helpers import hf_greedy, http_call

MODEL = "SmolLM2-135M-Instruct"
NAMES = ["smol", "smol-alias", "third-name"]
KEY = "compat-key-51a7"
ORIGIN = "http://localhost:3000"


@pytest.fixture(scope="module")
def api(web):
    return openai.OpenAI(base_url=f"{web.url}/v1", api_key=web.api_key, max_retries=0, timeout=120)


def greedy_continuation(hf_model, tokenizer, prompt: str, n: int) -> str:
    """The unsplit model's greedy continuation of a raw prompt (no chat template), cut at EOS."""
    ids = hf_greedy(hf_model, tokenizer(prompt)["input_ids"], n)
    eos = tokenizer.eos_token_id
    return tokenizer.decode(ids[:ids.index(eos)] if eos in ids else ids, skip_special_tokens=True)


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


# ---- text completions ----------------------------------------------------------------------------

def test_completions_whole_and_streamed(api, hf_model, tokenizer):
    prompt = "The three primary colors are"
    expected = greedy_continuation(hf_model, tokenizer, prompt, 10)
    r = api.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=10)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == MODEL
    assert r.choices[0].text == expected  # fp32 wire, greedy: exactly the unsplit model's continuation
    assert r.choices[0].index == 0 and r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"]) and 0 < r.usage.completion_tokens <= 10

    chunks = list(api.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=10, stream=True,
                                         stream_options={"include_usage": True}))
    pieces = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert len(pieces) > 3 and "".join(pieces) == expected
    assert all(c.object == "text_completion" for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [r.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == r.usage.total_tokens


@pytest.mark.slow
def test_completions_of_several_prompts_stop_and_seed(api, hf_model, tokenizer):
    prompts = ["Once upon a time", "def fibonacci(n):"]
    r = api.completions.create(model=MODEL, prompt=prompts, temperature=0, max_tokens=6)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [greedy_continuation(hf_model, tokenizer, p, 6) for p in prompts]
    expected = greedy_continuation(hf_model, tokenizer, prompts[0], 12)
    word = expected.split()[2]
    r = api.completions.create(model=MODEL, prompt=prompts[0], temperature=0, max_tokens=12, stop=[word])
    assert r.choices[0].text == expected[:expected.index(word)] and r.choices[0].finish_reason == "stop"
    sampled = {api.completions.create(model=MODEL, prompt=prompts[0], temperature=1, top_p=0.9, seed=11,
                                      max_tokens=8).choices[0].text for _ in range(2)}
    assert len(sampled) == 1


@pytest.mark.parametrize("extra, status, param, code", [
    ({"echo": True}, 400, "echo", "unsupported_parameter"),
    ({"n": 2}, 400, "n", "unsupported_parameter"),
    ({"best_of": 3}, 400, "best_of", "unsupported_parameter"),
    ({"logprobs": 2}, 400, "logprobs", "unsupported_parameter"),
    ({"suffix": "end"}, 400, "suffix", "unsupported_parameter"),
    ({"prompt": [1, 2, 3]}, 400, "prompt", "unsupported_parameter"),
    ({"prompt": []}, 400, "prompt", None),
    ({"model": "gpt-3.5-turbo-instruct"}, 404, "model", "model_not_found"),
    ({"temperature": 5}, 400, "temperature", None),
])
def test_completions_refuse_what_they_cannot_do(web, extra, status, param, code):
    payload = {"model": MODEL, "prompt": "Hello", "max_tokens": 2, **extra}
    got, body, _ = http_call(web.url, "POST", "/v1/completions", json.dumps(payload).encode(),
                             headers=auth(web.api_key))
    assert got == status, body
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
    assert (body["error"]["param"], body["error"]["code"], body["error"]["type"]) == (param, code,
                                                                                      "invalid_request_error")


def test_langchain_chat_and_completions(web, hf_model, tokenizer):
    langchain_openai = pytest.importorskip("langchain_openai")
    chat = langchain_openai.ChatOpenAI(model=MODEL, base_url=f"{web.url}/v1", api_key=web.api_key, temperature=0,
                                       max_tokens=8, max_retries=0)
    answer = chat.invoke("Name three primary colors.")
    assert answer.content and answer.response_metadata["finish_reason"] in ("length", "stop")
    llm = langchain_openai.OpenAI(model=MODEL, base_url=f"{web.url}/v1", api_key=web.api_key, temperature=0,
                                  max_tokens=6, max_retries=0)
    assert llm.invoke("Once upon a time") == greedy_continuation(hf_model, tokenizer, "Once upon a time", 6)


# ---- errors on every route, health, metrics --------------------------------------------------------

@pytest.mark.parametrize("method, path, status, code", [
    ("GET", "/v1/nothing-here", 404, "unknown_route"),
    ("GET", "/no/such/page", 404, "unknown_route"),
    ("GET", "/static/missing.js", 404, "unknown_route"),
    ("GET", "/v1/chat/completions", 405, "method_not_allowed"),
    ("DELETE", "/v1/models", 405, "method_not_allowed"),
    ("PUT", "/api/chat", 405, "method_not_allowed"),
    ("GET", "/api/leakage?x=one&y=2", 400, None),
])
def test_every_route_answers_errors_in_openais_shape(web, method, path, status, code):
    got, body, headers = http_call(web.url, method, path, headers=auth(web.api_key))
    assert got == status, body
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == code
    if status == 405:
        assert headers.get("allow")


def test_health_and_metrics(web, api, full_server):
    for path in ("/health", "/healthz"):
        assert http_call(web.url, "GET", path)[:2] == (200, {"status": "ok"})  # no key for liveness
        assert http_call(full_server.url, "GET", path)[:2] == (200, {"status": "ok"})
    assert http_call(web.url, "GET", "/metrics")[0] == 401  # the API key, as for /v1
    api.completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0)
    status, text, headers = http_call(web.url, "GET", "/metrics", headers=auth(web.api_key))
    assert status == 200 and headers["content-type"].startswith("text/plain")
    values = parse_metrics(text.decode())
    assert values['lambdasplit_web_completion_tokens_total{api="completions"}'] >= 2
    assert values["lambdasplit_web_first_token_seconds_count"] >= 1
    assert values["process_resident_memory_bytes"] > 0 and values["process_cpu_seconds_total"] > 0
    _, server_text, _ = http_call(full_server.url, "GET", "/metrics")
    server = parse_metrics(server_text.decode())
    assert server['lambdasplit_steps_total{transport="ws"}'] > 0 and server["process_resident_memory_bytes"] > 0
    assert server["lambdasplit_rss_bytes"] > 0 and "lambdasplit_sessions" in server


def parse_metrics(text: str) -> dict[str, float]:
    return {name: float(value) for name, value in (line.rsplit(" ", 1) for line in text.splitlines()
                                                   if line and not line.startswith("#"))}


# ---- other hosts, origins and names ------------------------------------------------------------------

@pytest.fixture(scope="module")
def open_web(full_server):
    """`lambdasplit web` on every address, for host.docker.internal and pages of ORIGIN, answering to NAMES."""
    from lambdasplit.web.process import WebProcess

    with WebProcess(full_server.url, "--split", "1:29", "--host", "0.0.0.0", "--allow-host", "host.docker.internal",
                    "--allow-origin", ORIGIN, "--served-model-name", *NAMES[:2], "--served-model-name", NAMES[2],
                    env={"LAMBDASPLIT_API_KEY": KEY}) as app:
        yield app
        assert app.proc.poll() is None, "the web app died during the tests:\n" + "\n".join(app.log)


def test_served_model_names(open_web):
    headers = {**auth(KEY), "Host": f"host.docker.internal:{urlsplit(open_web.url).port}"}  # as from a container
    status, body, _ = http_call(open_web.url, "GET", "/v1/models", headers=headers)
    assert status == 200 and [m["id"] for m in body["data"]] == NAMES
    client = openai.OpenAI(base_url=f"{open_web.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    r = client.chat.completions.create(model=NAMES[2], messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert r.model == NAMES[2] and r.choices[0].message.content is not None
    assert client.models.retrieve(NAMES[1]).id == NAMES[1]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)  # only the served names


def test_allowed_host_and_cors(open_web):
    port = urlsplit(open_web.url).port
    status, body, _ = http_call(open_web.url, "GET", "/v1/models",
                                headers={**auth(KEY), "Host": f"evil.example:{port}"})
    assert status == 403 and body["error"]["code"] == "forbidden_host"
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type, x-stainless-lang"}
    status, _, headers = http_call(open_web.url, "OPTIONS", "/v1/chat/completions", headers=preflight)
    assert status == 204 and headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in headers["access-control-allow-methods"]
    assert "authorization" in headers["access-control-allow-headers"]
    status, body, headers = http_call(open_web.url, "GET", "/v1/models", headers={**auth(KEY), "Origin": ORIGIN})
    assert status == 200 and headers["access-control-allow-origin"] == ORIGIN
    # any other origin: no CORS headers, and its preflight is refused
    other = "http://localhost:4000"
    status, body, headers = http_call(open_web.url, "OPTIONS", "/v1/chat/completions",
                                      headers={**preflight, "Origin": other})
    assert status == 403 and body["error"]["code"] == "forbidden_origin"
    assert "access-control-allow-origin" not in headers
    status, _, headers = http_call(open_web.url, "GET", "/v1/models", headers={**auth(KEY), "Origin": other})
    assert status == 200 and "access-control-allow-origin" not in headers
    # the allowed origin reaches the API only: the page's own API stays the page's
    status, body, headers = http_call(open_web.url, "GET", "/api/info", headers={"Origin": "http://example.com:3000"})
    assert status == 403 and "access-control-allow-origin" not in headers
    # and the key is still needed
    assert http_call(open_web.url, "GET", "/v1/models", headers={"Origin": ORIGIN})[0] == 401


def test_other_machines_reach_the_api_only(open_web):
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    url = f"http://{address}:{urlsplit(open_web.url).port}"
    headers = {**auth(KEY), "Host": "host.docker.internal"}
    assert http_call(url, "GET", "/v1/models", headers=headers)[0] == 200
    assert http_call(url, "GET", "/health", headers=headers)[0] == 200
    for path in ("/", "/api/info"):
        status, body, _ = http_call(url, "GET", path, headers=headers)
        assert status == 403 and body["error"]["code"] == "forbidden_peer"


def _non_loopback_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


@pytest.mark.slow
def test_listening_beyond_loopback_needs_a_key():
    from test_cli import cli, failed_clearly

    failed_clearly(cli("web", "--server", "http://127.0.0.1:9", "--host", "0.0.0.0", timeout=60), "API key")
    failed_clearly(cli("web", "--server", "http://127.0.0.1:9", "--allow-origin", "localhost:3000", timeout=60),
                   "--allow-origin")
