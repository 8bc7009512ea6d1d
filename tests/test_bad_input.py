"""Bad input to a real body server: every case gets a clear error, and nothing else is disturbed.

Session A is opened once and stepped (with the right greedy token checked) after every bad case,
so each test also proves that the server, and a session that saw a bad frame, go on working.
"""

from __future__ import annotations

import contextlib
import time

import pytest
from helpers import Driver, decode_reply, hf_greedy, hidden_frame, http_call, post_json, session_key, ws_url
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from lambdasplit.client.generate import SplitClient
from lambdasplit.client.transport import BodyConnection, BodyError
from lambdasplit.models.llm import load_split
from lambdasplit.server.process import ServerProcess
from lambdasplit.wire.frame import Frame, encode_frame
from lambdasplit.wire.protocol import SessionRequest

D = 576
X, Y = 4, 26
MAX_POS = 64
MAX_FRAME = int(0.15 * (1 << 20))  # 157286 bytes: 65 float32 rows fit, 69 do not
ROWS_OVER = 69  # just over the frame limit, under the WebSocket message limit (limit + 4096)
ROWS_WAY_OVER = 100  # over the WebSocket message limit too
A_PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def server(smol_dir):
    with ServerProcess(str(smol_dir), f"{X}:{Y}", "--max-positions", str(MAX_POS), "--max-frame-mb", "0.15",
                       "--max-sessions", "3") as srv:
        yield srv


@pytest.fixture(scope="module")
def device(smol_dir):
    return load_split(smol_dir, X, Y, parts=("head", "tail"))


@pytest.fixture(scope="module")
def fingerprint(device):
    return device.body_fingerprint()


def good_request(fingerprint, **over) -> dict:
    return {**SessionRequest(model_fingerprint=fingerprint, x=X, y=Y).model_dump(), **over}


class SessionA:
    """A healthy session stepped between bad cases; every step must give the reference token."""

    def __init__(self, driver: Driver, prompt_ids: list[int], reference: list[int]):
        self.driver, self.prompt_ids, self.reference = driver, prompt_ids, reference
        self.tokens: list[int] = []

    @property
    def conn(self) -> BodyConnection:
        return self.driver.conn

    @property
    def id(self) -> str:
        return self.driver.opened.session_id

    def ok(self) -> None:
        new = self.prompt_ids if not self.tokens else [self.tokens[-1]]
        token = self.driver.advance(new)
        i = len(self.tokens)
        assert token == self.reference[i], f"session A went wrong at token {i}"
        self.tokens.append(token)


@pytest.fixture(scope="module")
def session_a(server, device, fingerprint, tokenizer, hf_model):
    ids = tokenizer(A_PROMPT)["input_ids"]
    reference = hf_greedy(hf_model, ids, MAX_POS - len(ids))
    conn = BodyConnection(server.url, transport="ws")
    driver = Driver(device, conn, SessionRequest(model_fingerprint=fingerprint, x=X, y=Y))
    assert driver.opened.max_positions == MAX_POS and driver.opened.max_frame_bytes == MAX_FRAME
    a = SessionA(driver, ids, reference)
    a.ok()
    yield a
    conn.close()


def assert_error(status_and_body, status: int, code: str, *words: str) -> dict:
    got_status, body = status_and_body[:2]
    assert got_status == status, f"HTTP {got_status} {body!r}, expected {status}"
    assert isinstance(body, dict), body
    assert body["error"] == code, body
    for word in words:
        assert word.lower() in body["message"].lower(), f"{word!r} not in {body['message']!r}"
    return body


def assert_body_error(call, code: str, *words: str) -> BodyError:
    with pytest.raises(BodyError) as info:
        call()
    assert info.value.code == code, f"{info.value}, expected {code}"
    for word in words:
        assert word.lower() in str(info.value).lower(), f"{word!r} not in {str(info.value)!r}"
    return info.value


# ---- unknown and closed sessions ------------------------------------------------------------

def test_unknown_session_http_step(server, session_a):
    r = http_call(server.url, "POST", "/v1/sessions/not-a-session/step", hidden_frame(1, D, step=0, pos=0),
                  "application/x-lambdasplit-frame")
    assert_error(r, 404, "unknown_session", "unknown")
    session_a.ok()


def test_unknown_session_ws(server, session_a):
    # refused before the upgrade is accepted: an HTTP answer, and not a byte of a message is read
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(server.url, "not-a-session"), max_size=None)
    assert refused.value.response.status_code == 404
    assert b"unknown_session" in refused.value.response.body and b"unknown" in refused.value.response.body
    session_a.ok()


def test_unknown_session_delete(server, session_a):
    assert_error(http_call(server.url, "DELETE", "/v1/sessions/not-a-session"), 404, "unknown_session", "unknown")
    session_a.ok()


def test_closed_session(server, session_a, fingerprint):
    status, opened = post_json(server.url, "/v1/sessions", good_request(fingerprint))
    assert status == 200, opened
    sid = opened["session_id"]
    assert len(sid) >= 32 and sid != session_a.id
    with connect(ws_url(server.url, sid), max_size=None, additional_headers=session_key(sid)) as early:  # a step connection opened before the close
        status, body, _ = http_call(server.url, "DELETE", f"/v1/sessions/{sid}")
        assert status == 200 and body == {"closed": True}
        early.send(hidden_frame(2, D, step=0, pos=0))
        reply = decode_reply(early.recv(timeout=30))
        assert reply.kind == "error" and reply.code == "unknown_session" and "closed" in reply.message
    r = http_call(server.url, "POST", f"/v1/sessions/{sid}/step", hidden_frame(1, D, step=0, pos=0),
                  "application/x-lambdasplit-frame")
    assert_error(r, 404, "unknown_session", "closed")
    with pytest.raises(InvalidStatus) as refused:  # refused before the upgrade, as an HTTP answer
        connect(ws_url(server.url, sid), max_size=None, additional_headers=session_key(sid))
    assert refused.value.response.status_code == 404 and b"unknown_session" in refused.value.response.body
    assert_error(http_call(server.url, "DELETE", f"/v1/sessions/{sid}"), 404, "unknown_session")
    session_a.ok()


# ---- bad frames on session A's own connection -----------------------------------------------

@pytest.mark.parametrize("shape", [(1, D - 1), (1, D + 1), (D,), (1, 1, D)])
def test_wrong_hidden_size(session_a, shape):
    import torch

    d = session_a.driver
    frame = encode_frame(Frame("hidden", step=d.step, pos=d.pos, tensor=torch.zeros(shape)))
    assert_body_error(lambda: session_a.conn.step(frame), "bad_shape", str(D), str(list(shape)))
    session_a.ok()


def test_wrong_codec_for_the_session(session_a):
    d = session_a.driver
    frame = hidden_frame(1, D, step=d.step, pos=d.pos, codec="fp16")
    assert_body_error(lambda: session_a.conn.step(frame), "bad_codec", "fp32", "fp16")
    frame = hidden_frame(1, D, step=d.step, pos=d.pos, codec="bf16")
    assert_body_error(lambda: session_a.conn.step(frame), "bad_codec", "bf16")
    session_a.ok()


def test_wrong_step_number(server, session_a):
    d = session_a.driver
    for step in (d.step + 1, d.step - 1, d.step + 1000):
        frame = hidden_frame(1, D, step=step, pos=d.pos)
        assert_body_error(lambda: session_a.conn.step(frame), "bad_step", f"expected step {d.step}", f"got {step}")
    # the same on the HTTP path, to the same session
    r = http_call(server.url, "POST", f"/v1/sessions/{session_a.id}/step", hidden_frame(1, D, step=d.step + 1,
                  pos=d.pos), "application/x-lambdasplit-frame")
    assert_error(r, 400, "bad_step", f"expected step {d.step}")
    session_a.ok()


def test_wrong_position(session_a):
    d = session_a.driver
    for pos in (d.pos + 1, d.pos - 1, 0):
        frame = hidden_frame(1, D, step=d.step, pos=pos)
        assert_body_error(lambda: session_a.conn.step(frame), "bad_pos", f"expected position {d.pos}", f"got {pos}")
    session_a.ok()


@pytest.mark.parametrize("garbage", [b"", b"GET / HTTP/1.1\r\n\r\n", bytes(range(256)) * 4,
                                     b"LSPL\x02\xff\xff\xff\xff", b"LSPL\x02\x04\x00\x00\x00\xc1\xc1\xc1\xc1"])
def test_garbage_bytes(server, session_a, garbage):
    assert_body_error(lambda: session_a.conn.step(garbage), "malformed")
    r = http_call(server.url, "POST", f"/v1/sessions/{session_a.id}/step", garbage,
                  "application/x-lambdasplit-frame")
    assert_error(r, 400, "malformed")
    session_a.ok()


def test_error_frame_sent_up(session_a):
    d = session_a.driver
    frame = encode_frame(Frame.error("oops", "not a hidden state", step=d.step))
    assert_body_error(lambda: session_a.conn.step(frame), "bad_kind", "hidden")
    session_a.ok()


def test_unknown_codec_in_frame(session_a):
    import struct

    import msgpack

    d = session_a.driver
    from lambdasplit.wire.frame import VERSION

    d = session_a.driver
    for codec, code in (("int4", "bad_codec"), ("int5", "bad_codec")):
        header = msgpack.packb({"kind": "hidden", "step": d.step, "pos": d.pos, "shape": [1, D], "codec": codec,
                                "nbytes": D // 2, "crc": 0})
        frame = struct.pack("<4sBI", b"LSPL", VERSION, len(header)) + header + b"\0" * (D // 2)
        assert_body_error(lambda: session_a.conn.step(frame), code, codec, "fp32")
    session_a.ok()


@contextlib.contextmanager
def other_ws(server, fingerprint):
    """The WebSocket of a second session (session A has its own open, and a session takes one at a time)."""
    status, opened = post_json(server.url, "/v1/sessions", good_request(fingerprint))
    assert status == 200, opened
    sid = opened["session_id"]
    try:
        with connect(ws_url(server.url, sid), max_size=None, additional_headers=session_key(sid)) as ws:
            yield ws
    finally:
        http_call(server.url, "DELETE", f"/v1/sessions/{sid}")


def test_text_websocket_message(server, session_a, fingerprint):
    with other_ws(server, fingerprint) as ws:
        ws.send("hello, I am text")
        reply = decode_reply(ws.recv(timeout=30))
        assert reply.kind == "error" and reply.code == "malformed" and "text" in reply.message
    session_a.ok()


# ---- size limits ----------------------------------------------------------------------------

def test_frame_over_limit_http(server, session_a):
    d = session_a.driver
    for rows in (ROWS_OVER, ROWS_WAY_OVER):
        frame = hidden_frame(rows, D, step=d.step, pos=d.pos)
        assert len(frame) > MAX_FRAME
        for chunked in (False, True):  # with a Content-Length, and streamed without one
            r = http_call(server.url, "POST", f"/v1/sessions/{session_a.id}/step", frame,
                          "application/x-lambdasplit-frame", chunked=chunked)
            assert_error(r, 413, "too_large", str(MAX_FRAME))
    session_a.ok()


def test_frame_over_limit_ws(server, session_a, fingerprint):
    d = session_a.driver
    frame = hidden_frame(ROWS_OVER, D, step=d.step, pos=d.pos)
    assert MAX_FRAME < len(frame) <= MAX_FRAME + 4096
    assert_body_error(lambda: session_a.conn.step(frame), "too_large", str(MAX_FRAME))
    session_a.ok()
    # far over: the server may answer with an error frame or drop that connection, never crash
    big = hidden_frame(ROWS_WAY_OVER, D, step=0, pos=0)
    with other_ws(server, fingerprint) as ws:
        ws.send(big)
        try:
            reply = decode_reply(ws.recv(timeout=30))
            assert reply.kind == "error" and reply.code == "too_large"
        except ConnectionClosed as exc:
            assert exc.rcvd is not None and exc.rcvd.code == 1009, exc  # 1009: message too big
    session_a.ok()


# ---- session requests that do not match -----------------------------------------------------

def test_model_mismatch(server, session_a, fingerprint):
    r = post_json(server.url, "/v1/sessions", good_request("0" * 64))
    body = assert_error(r, 409, "mismatch", "model mismatch", f"[{X}, {Y})", "0000000000000000")
    assert fingerprint[:16] in body["message"]
    # a fingerprint of the right layers of another split does not pass either
    other = load_split(server_model(server), X, Y - 1, parts=("body",)).body_fingerprint()
    assert_error(post_json(server.url, "/v1/sessions", good_request(other)), 409, "mismatch", "model mismatch")
    session_a.ok()


def server_model(server):
    i = server.cmd.index("--model")
    return server.cmd[i + 1]


@pytest.mark.parametrize("x, y", [(X - 1, Y), (X, Y + 1), (0, 30), (0, 0), (30, 30), (10, 5)])
def test_split_outside_the_served_range(server, session_a, fingerprint, x, y):
    r = post_json(server.url, "/v1/sessions", good_request(fingerprint, x=x, y=y))
    assert_error(r, 409, "mismatch", "split mismatch", f"[{X}, {Y})", f"[{x}, {y})")
    session_a.ok()


def test_sub_range_of_the_served_range_is_accepted(server, session_a, smol_dir):
    fp = load_split(smol_dir, 10, 12, parts=("body",)).body_fingerprint()
    status, opened = post_json(server.url, "/v1/sessions", good_request(fp, x=10, y=12))
    assert status == 200 and opened["x"] == 10 and opened["y"] == 12
    assert http_call(server.url, "DELETE", f"/v1/sessions/{opened['session_id']}")[0] == 200
    session_a.ok()


@pytest.mark.parametrize("direction, word", [("up", "uplink"), ("down", "downlink")])
def test_unknown_codec_in_session_request(server, session_a, fingerprint, direction, word):
    wire = {"up": "fp32", "down": "fp32", direction: "int5"}
    r = post_json(server.url, "/v1/sessions", good_request(fingerprint, wire=wire))
    assert_error(r, 409, "mismatch", f"{word} codec 'int5'", "8, 6, 4, 3, 2")
    session_a.ok()


@pytest.mark.parametrize("field, value, named", [("weights", "int8", "int8"), ("weights", "bf16", "bf16"),
                                                  ("dtype", "float16", "fp16"), ("dtype", "bfloat16", "bf16")])
def test_weights_mismatch(server, session_a, fingerprint, field, value, named):
    """A client expecting the body in other weights gets a 409 naming both formats (`dtype` is the field's
    older name, still honoured)."""
    r = post_json(server.url, "/v1/sessions", good_request(fingerprint, **{field: value}))
    assert_error(r, 409, "mismatch", "weights mismatch", "serves layers", "in fp32", f"expects {named}",
                 "--weights")
    session_a.ok()


@pytest.mark.parametrize("field, value", [("weights", "int3"), ("dtype", "float8")])
def test_unknown_weights_format(server, session_a, fingerprint, field, value):
    r = post_json(server.url, "/v1/sessions", good_request(fingerprint, **{field: value}))
    assert_error(r, 409, "mismatch", "weights mismatch", f"unknown weight format '{value}'", "fp32, bf16")
    session_a.ok()


def test_matching_weights_open(server, fingerprint):
    status, body = post_json(server.url, "/v1/sessions", good_request(fingerprint, weights="fp32"))
    assert status == 200, body
    assert body["weights"] == "fp32"
    assert http_call(server.url, "DELETE", f"/v1/sessions/{body['session_id']}")[0] == 200


def test_protocol_mismatch(server, session_a, fingerprint):
    r = post_json(server.url, "/v1/sessions", good_request(fingerprint, protocol="lambdasplit/0"))
    assert_error(r, 409, "mismatch", "protocol", "lambdasplit/0")
    session_a.ok()


def test_every_difference_is_named(server, session_a):
    r = post_json(server.url, "/v1/sessions", good_request("f" * 64, weights="fp16", wire={"up": "x", "down": "y"}))
    assert_error(r, 409, "mismatch", "model mismatch", "weights mismatch", "uplink codec 'x'", "downlink codec 'y'")
    session_a.ok()


@pytest.mark.parametrize("payload", [b"{", b"[]", b'{"x": 4, "y": 26}', b'{"model_fingerprint": "a", "x": "four", "y": 26}'])
def test_malformed_session_request(server, session_a, payload):
    status, body, _ = http_call(server.url, "POST", "/v1/sessions", payload)
    assert status == 422, (status, body)
    session_a.ok()


def test_client_refuses_a_server_with_other_layers(smol_dir, server, session_a):
    client = SplitClient(smol_dir, server=server.url, split=(2, 28))
    with pytest.raises(BodyError) as info:
        client.generate("Hi", max_new_tokens=2)
    assert info.value.code == "mismatch" and "split mismatch" in str(info.value)
    session_a.ok()


# ---- sequence length ------------------------------------------------------------------------

def test_prompt_longer_than_the_context(server, session_a, fingerprint):
    status, opened = post_json(server.url, "/v1/sessions", good_request(fingerprint))
    assert status == 200 and opened["max_positions"] == MAX_POS
    sid = opened["session_id"]
    try:
        frame = hidden_frame(MAX_POS + 1, D, step=0, pos=0)
        assert len(frame) <= MAX_FRAME  # refused for its length, not its size
        r = http_call(server.url, "POST", f"/v1/sessions/{sid}/step", frame, "application/x-lambdasplit-frame")
        assert_error(r, 413, "too_long", str(MAX_POS + 1), str(MAX_POS))
        with connect(ws_url(server.url, sid), max_size=None, additional_headers=session_key(sid)) as ws:
            ws.send(frame)
            reply = decode_reply(ws.recv(timeout=30))
            assert reply.kind == "error" and reply.code == "too_long" and str(MAX_POS) in reply.message
            # the refused frame left the session untouched: it can grow to exactly the limit, not past it
            ws.send(hidden_frame(40, D, step=0, pos=0))
            assert decode_reply(ws.recv(timeout=60)).tensor.shape == (40, D)
            ws.send(hidden_frame(25, D, step=1, pos=40))
            reply = decode_reply(ws.recv(timeout=30))
            assert reply.kind == "error" and reply.code == "too_long" and "65" in reply.message
            ws.send(hidden_frame(24, D, step=1, pos=40))
            reply = decode_reply(ws.recv(timeout=60))
            assert reply.kind == "hidden" and reply.tensor.shape == (24, D) and reply.pos == 40
            ws.send(hidden_frame(1, D, step=2, pos=64))
            reply = decode_reply(ws.recv(timeout=30))
            assert reply.kind == "error" and reply.code == "too_long"
    finally:
        http_call(server.url, "DELETE", f"/v1/sessions/{sid}")
    session_a.ok()


def test_session_asks_for_a_shorter_context(server, session_a, fingerprint):
    status, opened = post_json(server.url, "/v1/sessions", good_request(fingerprint, max_positions=10))
    assert status == 200 and opened["max_positions"] == 10
    sid = opened["session_id"]
    try:
        r = http_call(server.url, "POST", f"/v1/sessions/{sid}/step", hidden_frame(11, D, step=0, pos=0),
                      "application/x-lambdasplit-frame")
        assert_error(r, 413, "too_long", "10")
    finally:
        http_call(server.url, "DELETE", f"/v1/sessions/{sid}")
    # and it may not ask for more than the server allows
    status, opened = post_json(server.url, "/v1/sessions", good_request(fingerprint, max_positions=10_000))
    assert status == 200 and opened["max_positions"] == MAX_POS
    http_call(server.url, "DELETE", f"/v1/sessions/{opened['session_id']}")
    session_a.ok()


def test_uncached_session_is_limited_too(server, session_a, fingerprint):
    status, opened = post_json(server.url, "/v1/sessions", good_request(fingerprint, cache=False))
    assert status == 200
    sid = opened["session_id"]
    try:
        path = f"/v1/sessions/{sid}/step"
        r = http_call(server.url, "POST", path, hidden_frame(30, D, step=0, pos=0), "application/x-lambdasplit-frame")
        assert r[0] == 200
        # without a cache every step starts at position 0
        r = http_call(server.url, "POST", path, hidden_frame(31, D, step=1, pos=30), "application/x-lambdasplit-frame")
        assert_error(r, 400, "bad_pos", "expected position 0")
        r = http_call(server.url, "POST", path, hidden_frame(MAX_POS + 1, D, step=1, pos=0),
                      "application/x-lambdasplit-frame")
        assert_error(r, 413, "too_long")
    finally:
        http_call(server.url, "DELETE", f"/v1/sessions/{sid}")
    session_a.ok()


LONG_PROMPT = "one two three four five six seven eight nine ten " * 8  # 80 tokens


def test_client_prompt_longer_than_the_server_allows(smol_dir, server, session_a, tokenizer):
    assert len(tokenizer(LONG_PROMPT)["input_ids"]) > MAX_POS
    client = SplitClient(smol_dir, server=server.url, wire="fp16")  # fp16: the frame itself is small enough
    with pytest.raises(BodyError) as info:
        client.generate(LONG_PROMPT, chat=False, max_new_tokens=2)
    assert info.value.code == "too_long" and str(MAX_POS) in str(info.value)
    session_a.ok()


def test_client_refuses_a_frame_over_the_servers_size_limit(smol_dir, server, session_a):
    """The client learns the frame limit at session open and refuses an oversized frame before sending it."""
    model = load_split(smol_dir, X, Y, parts=())
    conn = BodyConnection(server.url)
    try:
        opened = conn.open_session(SessionRequest(model_fingerprint=model.body_fingerprint(), x=X, y=Y))
        assert opened.max_frame_bytes == MAX_FRAME
        frame = hidden_frame(70, D, step=0, pos=0)
        assert len(frame) > MAX_FRAME
        with pytest.raises(BodyError) as info:
            conn.step(frame)
        assert info.value.code == "too_large" and str(MAX_FRAME) in str(info.value)
        assert conn.traffic.steps == 0 and conn.traffic.frame_up == 0  # nothing was sent
        # the session is untouched: step 0 at position 0 still works
        reply = conn.step(hidden_frame(3, D, step=0, pos=0))
        assert tuple(reply.tensor.shape) == (3, D)
    finally:
        conn.close()
    session_a.ok()


# ---- capacity -------------------------------------------------------------------------------

def test_max_sessions(server, session_a, fingerprint):
    status, info, _ = http_call(server.url, "GET", "/v1/info")
    assert status == 200 and info["sessions"] == 1 and info["max_sessions"] == 3  # only A is left open
    opened = []
    try:
        for _ in range(2):
            status, body = post_json(server.url, "/v1/sessions", good_request(fingerprint))
            assert status == 200, body
            opened.append(body["session_id"])
        r = post_json(server.url, "/v1/sessions", good_request(fingerprint))
        assert_error(r, 503, "too_many_sessions", "3")
        session_a.ok()  # the full server still serves its sessions
        # freeing one makes room again
        assert http_call(server.url, "DELETE", f"/v1/sessions/{opened.pop()}")[0] == 200
        status, body = post_json(server.url, "/v1/sessions", good_request(fingerprint))
        assert status == 200
        opened.append(body["session_id"])
    finally:
        for sid in opened:
            http_call(server.url, "DELETE", f"/v1/sessions/{sid}")
    session_a.ok()


# ---- after all that -------------------------------------------------------------------------

def test_server_survived_everything(server, session_a):
    assert server.proc.poll() is None, "\n".join(server.log)
    status, body, _ = http_call(server.url, "GET", "/v1/health")
    assert status == 200 and body == {"status": "ok"}
    status, info, _ = http_call(server.url, "GET", "/v1/info")
    assert status == 200 and info["sessions"] == 1
    for _ in range(3):
        session_a.ok()
    assert len(session_a.tokens) >= 30  # A was stepped after every case above, always correctly
    assert not any("Traceback" in line for line in server.log), "\n".join(server.log)


# ---- idle sessions --------------------------------------------------------------------------

@pytest.mark.slow
def test_idle_sessions_expire(smol_dir):
    model = load_split(smol_dir, 14, 15, parts=("head", "tail"))
    fp = model.body_fingerprint()
    with ServerProcess(str(smol_dir), "14:15", "--idle-ttl", "2") as srv:
        status, opened = post_json(srv.url, "/v1/sessions", good_request(fp, x=14, y=15))
        assert status == 200 and opened["idle_ttl_s"] == 2
        sid = opened["session_id"]
        path = f"/v1/sessions/{sid}/step"
        assert http_call(srv.url, "POST", path, hidden_frame(3, D, step=0, pos=0), "application/x-lambdasplit-frame")[0] == 200
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if http_call(srv.url, "GET", "/v1/info")[1]["sessions"] == 0:
                break
            time.sleep(0.5)
        r = http_call(srv.url, "POST", path, hidden_frame(1, D, step=1, pos=3), "application/x-lambdasplit-frame")
        assert_error(r, 404, "unknown_session")
        assert http_call(srv.url, "GET", "/v1/info")[1]["sessions"] == 0
