"""Fuzzing the frame decoder and the session protocol (hypothesis, derandomized so CI is reproducible).

In-process: 10,000 malformed frames, each either refused with a FrameError or decoded to a finite
tensor of the shape its header states. Over real sockets: 10,000 malformed messages into a live
session while another session generates; the server answers each with an error frame that
carries nothing of the other session, stays up, and the other session's answer is unchanged.
"""

from __future__ import annotations

import json
import struct

import msgpack
import pytest
import torch
import websockets.sync.client as ws_client
from helpers import http_call, ws_url
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lambdasplit.client.generate import SplitClient
from lambdasplit.wire.codecs import make_codec
from lambdasplit.wire.frame import Frame, FrameError, Limits, decode_frame, encode_frame
from lambdasplit.wire.protocol import SESSION_KEY_HEADER, SessionRequest

FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
D = 576


def _valid(rows: int = 2, codec: str = "fp32", step: int = 0, pos: int = 0) -> bytes:
    g = torch.Generator().manual_seed(rows)
    return encode_frame(Frame("hidden", step=step, pos=pos, tensor=torch.randn(rows, D, generator=g),
                              codec=make_codec(codec)))


def _header(data: bytes) -> dict:
    hlen = struct.unpack_from("<I", data, 5)[0]
    return msgpack.unpackb(data[9:9 + hlen])


def _with_header(data: bytes, header: dict) -> bytes:
    hlen = struct.unpack_from("<I", data, 5)[0]
    packed = msgpack.packb(header)
    return data[:5] + struct.pack("<I", len(packed)) + packed + data[9 + hlen:]


BASE = [_valid(1), _valid(3), _valid(2, "int8"), _valid(1, "had+int4")]
FIELD_VALUES = st.one_of(st.integers(min_value=-2**63, max_value=2**64 - 1), st.floats(allow_nan=True),
                         st.text(max_size=20), st.binary(max_size=20), st.none(), st.booleans(),
                         st.lists(st.integers(min_value=-5, max_value=2**40), max_size=5),
                         st.dictionaries(st.text(max_size=5), st.integers(-2**63, 2**63 - 1), max_size=3))


@st.composite
def malformed(draw) -> bytes:
    """A frame broken in one of many ways: bytes flipped, cut or added, header fields replaced, or noise."""
    data = bytearray(draw(st.sampled_from(BASE)))
    how = draw(st.sampled_from(["flip", "truncate", "extend", "field", "drop_field", "noise", "prefix"]))
    if how == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
    elif how == "truncate":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif how == "extend":
        data += draw(st.binary(min_size=1, max_size=64))
    elif how == "field":
        header = _header(bytes(data))
        header[draw(st.sampled_from(sorted(header) + ["extra", "zzz"]))] = draw(FIELD_VALUES)
        data = bytearray(_with_header(bytes(data), header))
    elif how == "drop_field":
        header = _header(bytes(data))
        header.pop(draw(st.sampled_from(sorted(header))))
        data = bytearray(_with_header(bytes(data), header))
    elif how == "noise":
        data = bytearray(draw(st.binary(max_size=512)))
    else:  # a valid prefix claiming a huge header
        data = bytearray(b"LSPL\x02" + struct.pack("<I", draw(st.integers(0, 2**32 - 1))) + bytes(data[9:40]))
    return bytes(data)


@pytest.mark.slow
@settings(max_examples=10_000, **FUZZ)
@given(data=malformed())
def test_decoder_refuses_or_decodes_sanely(data):
    try:
        frame = decode_frame(data, Limits(max_frame_bytes=1 << 20))
    except FrameError:
        return
    if frame.kind == "hidden":  # a mutation that happened to leave a valid frame
        assert torch.isfinite(frame.tensor).all()
        assert frame.tensor.numel() * 4 <= 1 << 24


@pytest.fixture(scope="module")
def fuzzed(full_server, smol_dir):
    """A session for the attacker to abuse, next to a victim generating, both on the shared server."""
    client = SplitClient(smol_dir, server=full_server.url, split=(1, 29), wire="fp32")
    request = SessionRequest(model_fingerprint=client.model.body_fingerprint(), x=1, y=29, dtype="float32")
    status, opened, _ = http_call(full_server.url, "POST", "/v1/sessions", request.model_dump_json().encode())
    assert status == 200, opened
    with ws_client.connect(ws_url(full_server.url, opened["session_id"]), max_size=1 << 27,
                           additional_headers={SESSION_KEY_HEADER: opened["key"]}) as ws:
        yield client, ws


@pytest.mark.slow
def test_session_protocol_under_fuzz(full_server, smol_dir, fuzzed):
    client, ws = fuzzed
    reference = SplitClient(smol_dir, server=None, split=(1, 29), wire="fp32").generate(
        "Hi there", max_new_tokens=10, stop_at_eos=False).token_ids
    victim = client.generate_ids(client.encode_prompt("Hi there"), max_new_tokens=10, stop_at_eos=False)
    victim_out = [next(victim)]  # the victim's session is open and holds its cache
    replies = []

    @settings(max_examples=10_000, **FUZZ)
    @given(data=malformed())
    def attack(data):
        ws.send(data)
        reply = decode_frame(ws.recv(timeout=30))
        replies.append(reply.kind)
        assert reply.kind == "error" or reply.tensor.shape[1] == D  # a lucky valid frame is simply served
        assert reply.tensor is None or reply.tensor.shape[0] <= 3  # never more rows than the attacker sent

    attack()
    victim_out += list(victim)
    assert victim_out == reference  # the other session never noticed
    assert len(replies) >= 10_000 and replies.count("error") >= 9_000
    assert http_call(full_server.url, "GET", "/healthz")[0] == 200


@pytest.mark.parametrize("body", [b"", b"{", b"[]", b'{"x": 1}', json.dumps({"model_fingerprint": 1}).encode(),
                                  json.dumps({"model_fingerprint": "a", "x": -1, "y": 10 ** 30}).encode(),
                                  json.dumps({"model_fingerprint": "a", "x": 1, "y": 29, "max_positions": 0}).encode(),
                                  json.dumps({"model_fingerprint": "a", "x": 1, "y": 29,
                                              "wire": {"up": "int99", "seed": -1}}).encode()])
def test_bad_session_requests_are_4xx(full_server, body):
    status, reply, _ = http_call(full_server.url, "POST", "/v1/sessions", body)
    assert 400 <= status < 500, (status, reply)
