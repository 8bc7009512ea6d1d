"""A body server for browser devices (`serve --allow-origin`): pages of the allowed origin get CORS answers and
open their WebSocket with the session key as a subprotocol (a page cannot set headers on a WebSocket, and a
secret never goes in a URL); pages of any other origin are refused; programs, which send no Origin, are not
affected."""

from __future__ import annotations

import json

import pytest
from helpers import decode_reply, hidden_frame, http_call, ws_url
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from lambdasplit.models.llm import load_split
from lambdasplit.server.auth import add_token
from lambdasplit.server.process import ServerProcess
from lambdasplit.wire.protocol import WS_KEY_PROTOCOL, WS_PROTOCOL, SessionRequest

PAGE, OTHER = "http://page.example:8000", "https://evil.example"


@pytest.fixture(scope="module")
def browser_server(smol_dir, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    token = add_token(tokens, "alice")
    fingerprint = load_split(smol_dir, 1, 29, parts=()).body_fingerprint()
    with ServerProcess(str(smol_dir), "1:29", "--tokens", str(tokens), "--allow-origin", PAGE + "/") as srv:
        srv.fingerprint = fingerprint
        yield srv, token


def _open(server, token: str, origin: str | None) -> tuple[int, dict, dict]:
    fingerprint = server.fingerprint
    body = json.dumps(SessionRequest(model_fingerprint=fingerprint, x=1, y=29).model_dump()).encode()
    headers = {"Authorization": f"Bearer {token}", **({"Origin": origin} if origin else {})}
    return http_call(server.url, "POST", "/v1/sessions", body, headers=headers)


def test_the_allowed_page_gets_cors_and_others_are_refused(browser_server):
    server, token = browser_server
    asked = {"Origin": PAGE, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}
    status, _, headers = http_call(server.url, "OPTIONS", "/v1/sessions", headers=asked)
    assert status == 204 and headers["access-control-allow-origin"] == PAGE
    assert "authorization" in headers["access-control-allow-headers"] and "POST" in headers["access-control-allow-methods"]
    status, body, headers = _open(server, token, PAGE)
    assert status == 200 and headers["access-control-allow-origin"] == PAGE and body["key"]
    for origin in (OTHER, "null"):
        status, body, headers = http_call(server.url, "OPTIONS", "/v1/sessions", headers={**asked, "Origin": origin})
        assert status == 403 and body["error"] == "forbidden_origin" and "access-control-allow-origin" not in headers
        status, body, _ = _open(server, token, origin)
        assert status == 403 and "serve --allow-origin" in body["message"]
    status, body, headers = _open(server, token, None)  # a program: no Origin, no CORS, as before
    assert status == 200 and "access-control-allow-origin" not in headers


def test_a_page_opens_its_websocket_with_the_key_as_a_subprotocol(browser_server):
    server, token = browser_server
    _, opened, _ = _open(server, token, PAGE)
    sid, key = opened["session_id"], opened["key"]
    with connect(ws_url(server.url, sid), origin=PAGE, subprotocols=[WS_PROTOCOL, WS_KEY_PROTOCOL + key]) as ws:
        assert ws.subprotocol == WS_PROTOCOL  # the key is never echoed back
        ws.send(hidden_frame(3, 576, step=0, pos=0))
        reply = decode_reply(ws.recv(timeout=60))
        assert reply.kind == "hidden" and tuple(reply.tensor.shape) == (3, 576)
    # once only: the key cannot open the session's WebSocket again, nor another session's
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(server.url, sid), origin=PAGE, subprotocols=[WS_PROTOCOL, WS_KEY_PROTOCOL + key])
    assert refused.value.response.status_code == 404


@pytest.mark.parametrize("case", ["wrong key", "other origin", "no protocol"])
def test_refused_websockets(browser_server, case):
    server, token = browser_server
    _, opened, _ = _open(server, token, PAGE)
    key = "x" * 43 if case == "wrong key" else opened["key"]
    protocols = [WS_KEY_PROTOCOL + key] + ([] if case == "no protocol" else [WS_PROTOCOL])
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(server.url, opened["session_id"]), origin=OTHER if case == "other origin" else PAGE,
                subprotocols=protocols)
    assert refused.value.response.status_code == {"wrong key": 404, "other origin": 403, "no protocol": 400}[case]
    if case != "wrong key":  # a refusal before the key was tried leaves it good for the page's own WebSocket
        with connect(ws_url(server.url, opened["session_id"]), origin=PAGE,
                     subprotocols=[WS_PROTOCOL, WS_KEY_PROTOCOL + opened["key"]]) as ws:
            assert ws.subprotocol == WS_PROTOCOL
