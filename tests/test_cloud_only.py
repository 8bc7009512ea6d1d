"""Cloud-only mode (the paper's baseline): a real `serve --cloud-only` process, text over HTTP."""

from __future__ import annotations

import json

import pytest
from helpers import http_call
from test_cli import cli, failed_clearly

from lambdasplit.client.cloud import CloudClient
from lambdasplit.client.generate import SplitClient
from lambdasplit.client.transport import BodyError
from lambdasplit.server.process import ServerProcess


@pytest.fixture(scope="module")
def cloud(smol_dir):
    with ServerProcess(str(smol_dir), "0:30", "--cloud-only") as server:
        yield server
        assert server.proc.poll() is None, "\n".join(server.log)


def test_same_greedy_answer_as_the_local_model(smol_dir, cloud):
    prompt = "What is the difference between AI, ML and DL?"
    local = SplitClient(smol_dir, server=None, wire="fp32").generate(prompt, max_new_tokens=16, stop_at_eos=False)
    got = CloudClient(cloud.url).generate(prompt, max_new_tokens=16, stop_at_eos=False)
    assert got.token_ids == local.token_ids and got.text == local.text
    assert got.prompt_tokens == local.stats.prompt_tokens
    t = got.traffic
    if t.counted_at_socket:
        # the prompt went up in plain text: the request is at least as long as it
        assert t.socket_up >= len(prompt) and t.socket_down > 16 * len('{"token": 1, "text": ""}')


def test_info_and_no_split_sessions(cloud):
    status, body, _ = http_call(cloud.url, "GET", "/v1/info")
    assert status == 200 and body["mode"] == "cloud-only"
    status, body, _ = http_call(cloud.url, "POST", "/v1/sessions", json.dumps({"x": 1, "y": 29}).encode())
    assert status == 409 and body["error"] == "cloud_only" and "/v1/complete" in body["message"]


@pytest.mark.parametrize("options, code", [({"max_new_tokens": 0}, "http_422"), ({"temperature": -1}, "http_422"),
                                           ({"max_new_tokens": 9000}, "too_long"), ({"top_p": 0}, "http_422")])
def test_bad_requests_are_refused_clearly(cloud, options, code):
    with pytest.raises(BodyError) as info:
        CloudClient(cloud.url).generate("Hi", **options)
    assert info.value.code == code
    assert CloudClient(cloud.url).generate("Hi", max_new_tokens=2).token_ids  # and it goes on serving


def test_empty_prompt_is_refused(cloud):
    with pytest.raises(BodyError):
        CloudClient(cloud.url).generate("", max_new_tokens=2)


@pytest.mark.slow
def test_cli_cloud_only(cloud):
    r = cli("generate", "--server", cloud.url, "--cloud-only", "--max-new-tokens", "4", "--ignore-eos", "--stats",
            "Hi")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "plain text" in r.stderr
    failed_clearly(cli("generate", "--cloud-only", "--max-new-tokens", "2", "Hi"), "--server")
