"""The KV-cache memory budget: sessions reserve their maximum length when they open; when the budget
is full, new sessions get 503 with Retry-After, and the running ones go on untouched."""

from __future__ import annotations

import json

import pytest
from helpers import http_call

from lambdasplit.client.generate import SplitClient
from lambdasplit.client.transport import BodyConnection, BodyError
from lambdasplit.server.process import ServerProcess
from lambdasplit.wire.protocol import SessionRequest

PER_POSITION = 28 * 2 * 3 * 64 * 4  # layers [1, 29) of SmolLM2: a key and a value per KV head, fp32


@pytest.fixture(scope="module")
def small(smol_dir):
    budget = 2.5 * 64 * PER_POSITION  # room for two sessions of 64 positions, not three
    with ServerProcess(str(smol_dir), "1:29", "--kv-budget-mb", str(budget / 2**20)) as server:
        yield server


def _request(client: SplitClient, positions: int) -> SessionRequest:
    return SessionRequest(model_fingerprint=client.model.body_fingerprint(), x=1, y=29, dtype="float32",
                          max_positions=positions)


def test_budget_refuses_then_frees(small, smol_dir):
    client = SplitClient(smol_dir, server=small.url, split=(1, 29), wire="fp32")
    info = BodyConnection(small.url).info()
    assert info.kv_bytes_per_position == PER_POSITION and info.kv_budget_bytes == int(2.5 * 64 * PER_POSITION)
    a, b = BodyConnection(small.url, transport="http"), BodyConnection(small.url, transport="http")
    a.open_session(_request(client, 64))
    b.open_session(_request(client, 64))
    status, body, headers = http_call(small.url, "POST", "/v1/sessions", json.dumps(_request(client, 64).model_dump()).encode())
    assert status == 503 and body["error"] == "busy" and int(headers["retry-after"]) >= 1, body
    assert "KV-cache budget is full" in body["message"]
    # a session larger than the whole budget can never fit: a different, permanent error
    status, body, _ = http_call(small.url, "POST", "/v1/sessions", json.dumps(_request(client, 10_000).model_dump()).encode())
    assert status == 413 and "fewer positions" in body["message"]
    assert BodyConnection(small.url).info().kv_reserved_bytes == 2 * 64 * PER_POSITION
    a.close()  # frees its reservation
    c = BodyConnection(small.url, transport="http")
    c.open_session(_request(client, 64))
    for conn in (b, c):
        conn.close()
    assert BodyConnection(small.url).info().kv_reserved_bytes == 0


def test_running_sessions_finish_while_others_are_refused(small, smol_dir):
    reference = SplitClient(smol_dir, server=None, split=(1, 29), wire="fp32").generate(
        "Hi", max_new_tokens=12, stop_at_eos=False).token_ids
    client = SplitClient(smol_dir, server=small.url, split=(1, 29), wire="fp32")
    ids = client.encode_prompt("Hi")
    assert len(ids) + 12 <= 64
    holder = BodyConnection(small.url, transport="http")
    holder.open_session(_request(client, 64))  # one of the two places taken
    out = []
    for token in client.generate_ids(ids, max_new_tokens=12, stop_at_eos=False):  # takes the other place
        out.append(token)
        if len(out) == 3:
            status, body, _ = http_call(small.url, "POST", "/v1/sessions",
                                        json.dumps(_request(client, 64).model_dump()).encode())
            assert status == 503, body
    holder.close()
    assert out == reference


def test_client_asks_only_for_what_it_needs(small, smol_dir):
    client = SplitClient(smol_dir, server=small.url, split=(1, 29), wire="fp32")
    with pytest.raises(BodyError, match="fewer positions"):  # prompt + 2000 tokens cannot fit in this budget
        client.generate("Hi", max_new_tokens=2000)
