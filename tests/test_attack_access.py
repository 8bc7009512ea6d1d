"""Attacks on access, against real server processes: session hijack with a leaked id, connection
exhaustion, a full server, a replica that comes up late; and the docs routes and JSON logs.

- a session's steps need its key (X-Session-Key), which only its opener got: a stranger with a leaked id
  gets the reply an unknown session gets, and the victim's text does not change;
- logs hold a prefix of each session id, never the whole id, and every line is JSON;
- 1,000 connections that never finish their request head are closed (over the per-client cap at once,
  the rest at the header timeout) while a normal client is served, and the server's fds come back;
- the client honours Retry-After within its patience, and takes up a replica that was down at its start.
"""

from __future__ import annotations

import contextlib
import json
import resource
import select
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from attack_helpers import MB, RssWatch
from helpers import Driver, hidden_frame, http_call, ws_url
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from lambdasplit.client.body import Retry
from lambdasplit.client.generate import SplitClient
from lambdasplit.client.transport import BodyConnection, BodyError
from lambdasplit.models.llm import load_split
from lambdasplit.server.auth import add_token
from lambdasplit.server.main import READY_LINE
from lambdasplit.server.process import ServerProcess
from lambdasplit.wire.frame import decode_frame
from lambdasplit.wire.protocol import FRAME_TYPE, SESSION_KEY_HEADER, SessionRequest

D = 576
SPLIT = (1, 29)
PROMPT = "Name three colours."
FAST = Retry(attempts=4, base_s=0.2, cap_s=1.0)


def fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


@pytest.fixture(scope="module")
def server(smol_dir):
    """One session at a time, idle sessions freed after 4 s (so a full server's Retry-After is short), and an
    access log that prints every request path."""
    with ServerProcess(str(smol_dir), "1:29", "--max-sessions", "1", "--idle-ttl", "4", "--log-level", "info") as srv:
        yield srv


@pytest.fixture(scope="module")
def device(smol_dir):
    return load_split(smol_dir, *SPLIT, parts=("head", "tail"))


@pytest.fixture(scope="module")
def baseline(smol_dir, server):
    client = SplitClient(smol_dir, server=server.url, split=SPLIT, wire="fp32", retry=FAST)
    return client, client.generate(PROMPT, max_new_tokens=8).text


def _ws_answer(url: str, sid: str, headers: dict | None = None) -> tuple:
    """How the server answers a WebSocket for `sid`: a refused upgrade (its status and body), or its first frame."""
    try:
        with connect(ws_url(url, sid), max_size=None, additional_headers=headers or {}) as ws:
            reply = decode_frame(ws.recv(timeout=30))
            return "frame", reply.code, reply.message
    except InvalidStatus as exc:
        return "http", exc.response.status_code, bytes(exc.response.body)


def _greedy(device, conn, ids: list[int], n: int, between=None) -> list[int]:
    driver = Driver(device, conn, SessionRequest(model_fingerprint=device.body_fingerprint(), x=SPLIT[0], y=SPLIT[1]))
    tokens = [driver.advance(ids)]
    for _ in range(n - 1):
        if between is not None:
            between(driver)
        tokens.append(driver.advance([tokens[-1]]))
    conn.close()
    return tokens


def test_a_leaked_id_without_the_key_opens_nothing(server, device, tokenizer, baseline):
    ids = tokenizer(PROMPT)["input_ids"]
    clean = _greedy(device, BodyConnection(server.url), ids, 6)
    unknown_http = http_call(server.url, "POST", "/v1/sessions/not-a-session/step", hidden_frame(1, D, step=0, pos=0),
                             FRAME_TYPE)
    unknown_delete = http_call(server.url, "DELETE", "/v1/sessions/not-a-session")
    unknown_ws = _ws_answer(server.url, "not-a-session")
    seen = []

    def attack(driver) -> None:
        sid, step, pos = driver.opened.session_id, driver.step, driver.pos
        assert len(driver.opened.key) >= 32 and driver.opened.key != sid
        frame = hidden_frame(1, D, step=step, pos=pos)  # the very frame the victim would send next
        for headers in ({}, {SESSION_KEY_HEADER: "wrong"}, {SESSION_KEY_HEADER: sid}):
            r = http_call(server.url, "POST", f"/v1/sessions/{sid}/step", frame, FRAME_TYPE, headers)
            assert r[:2] == unknown_http[:2], r  # nothing about the session: the unknown-session answer
            assert _ws_answer(server.url, sid, headers) == unknown_ws
        for headers in ({}, {SESSION_KEY_HEADER: "wrong"}):  # headers given: helpers add no key of their own
            assert http_call(server.url, "DELETE", f"/v1/sessions/{sid}", headers=headers)[:2] == unknown_delete[:2]
        seen.append(sid)

    attacked = _greedy(device, BodyConnection(server.url, transport="http"), ids, 6, between=attack)
    assert attacked == clean and len(seen) == 5
    assert unknown_http[0] == 404 and unknown_http[1]["error"] == "unknown_session"
    # logs: a prefix of the ids, never a whole one; every line after the start is JSON
    time.sleep(0.3)
    lines = list(server.log)
    text = "\n".join(lines)
    assert seen[0][:8] in text and not any(sid in text for sid in seen)
    start = next(i for i, line in enumerate(lines) if line.startswith(READY_LINE))
    records = [json.loads(line) for line in lines[start + 1:]]
    assert any(r["logger"] == "uvicorn.access" and "/step" in r["msg"] for r in records)


def test_docs_are_off_and_uvicorn_warnings_are_json(server):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert http_call(server.url, "GET", path)[0] == 404, path
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"\x00\x01 not HTTP at all\r\n\r\n")  # uvicorn warns: "Invalid HTTP request received."
        s.recv(1024)
    time.sleep(0.3)
    start = max(i for i, line in enumerate(server.log) if line.startswith(READY_LINE))
    records = [json.loads(line) for line in list(server.log)[start + 1:]]
    assert any(r["level"] == "warning" and r["logger"].startswith("uvicorn") for r in records), records[-3:]


@pytest.mark.slow
def test_a_full_server_is_waited_for_within_patience(smol_dir, server, baseline):
    client, text = baseline
    holder = BodyConnection(server.url, transport="http")
    holder.open_session(SessionRequest(model_fingerprint=client.model.body_fingerprint(), x=1, y=29))
    events = []
    patient = SplitClient(smol_dir, server=server.url, split=SPLIT, wire="fp32", retry=FAST, patience_s=30,
                          on_event=events.append)
    timer = threading.Timer(1.5, holder.close)  # the other session lets go after 1.5 s
    timer.start()
    started = time.monotonic()
    try:
        assert patient.generate(PROMPT, max_new_tokens=8).text == text
    finally:
        timer.cancel()
        holder.close()
    waited = time.monotonic() - started
    assert any("too_many_sessions" in e and "retrying in" in e for e in events), events
    assert 1.5 < waited < 15, waited

    holder.open_session(SessionRequest(model_fingerprint=client.model.body_fingerprint(), x=1, y=29))
    try:
        hasty = SplitClient(smol_dir, server=server.url, split=SPLIT, wire="fp32", retry=FAST, patience_s=2)
        started = time.monotonic()
        with pytest.raises(BodyError, match=r"gave up after \d+ tries in 2\.\d s; patience 2 s") as info:
            hasty.generate(PROMPT, max_new_tokens=2)
        assert info.value.code == "too_many_sessions" and time.monotonic() - started < 6
    finally:
        holder.close()


@pytest.mark.slow
def test_a_replica_down_at_the_start_is_taken_up_later(smol_dir, baseline):
    _, text = baseline
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        late_port = s.getsockname()[1]
    late_url = f"http://127.0.0.1:{late_port}"
    events = []
    with ServerProcess(str(smol_dir), "1:29") as first:
        client = SplitClient(smol_dir, server=[first.url, late_url], split=SPLIT, wire="fp32", retry=FAST,
                             on_event=events.append)
        assert client.generate(PROMPT, max_new_tokens=8).text == text
        assert any("left out of the route" in e for e in events)
        with ServerProcess(str(smol_dir), "1:29", "--port", str(late_port)) as late:
            assert late.url == late_url
            first.stop()  # the only replica the route knew of is gone
            assert client.generate(PROMPT, max_new_tokens=8).text == text
    assert any("answers now" in e for e in events), events


# ---- connections ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def guarded(smol_dir, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    token = add_token(tokens, "alice")
    with ServerProcess(str(smol_dir), "1:29", "--header-timeout", "1.5", "--max-connections", "300",
                       "--tokens", str(tokens), "--docs") as srv:
        yield srv, token


def _half_open(host: str, port: int, source: str, n: int) -> list[socket.socket]:
    """n connections from `source` that send the start of a request head and never finish it."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind((source, 0))
        s.connect((host, port))
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        socks.append(s)
    return socks


def _all_closed(socks: list[socket.socket], within: float) -> tuple[int, int]:
    """Wait until the server has closed every socket (EOF or reset); (answered 503, closed) counts."""
    deadline, refused, live = time.monotonic() + within, 0, set(socks)
    by_fd = {s.fileno(): s for s in socks}
    poller = select.poll()  # not select(): in a whole suite's process these descriptors pass 1024
    for s in socks:
        poller.register(s, select.POLLIN)
    while live and time.monotonic() < deadline:
        for fd, _ in poller.poll(200):
            s = by_fd[fd]
            if s not in live:
                continue
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            refused += data.startswith(b"HTTP/1.1 503")
            if not data:
                live.discard(s)
                poller.unregister(fd)
    return refused, len(socks) - len(live)


def test_half_open_connections_are_cut_and_a_normal_client_is_served(smol_dir, guarded):
    server, token = guarded
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1400:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    host, port = server.url.removeprefix("http://").split(":")
    client = SplitClient(smol_dir, server=server.url, split=SPLIT, wire="fp32", retry=FAST, token=token)
    assert client.generate(PROMPT, max_new_tokens=2).text  # warm: the compute thread and its files are up
    time.sleep(0.3)
    before = fds(server.proc.pid)
    socks = _half_open(host, int(port), "127.0.0.2", 1000)
    try:
        during = fds(server.proc.pid)
        assert http_call(server.url, "GET", "/healthz")[0] == 200
        assert client.generate(PROMPT, max_new_tokens=4).text
        refused, closed = _all_closed(socks, within=8)
        assert closed == 1000 and refused >= 1000 - 128 - 5, (closed, refused)
        assert http_call(server.url, "GET", "/healthz")[0] == 200
    finally:
        for s in socks:
            s.close()
    time.sleep(0.5)
    after = fds(server.proc.pid)
    assert during > before + 64 and after <= before + 4, (before, during, after)
    # a server full in all: 503 with Retry-After, and served again once they go
    crowd = _half_open(host, int(port), "127.0.0.3", 120) + _half_open(host, int(port), "127.0.0.4", 120) + \
        _half_open(host, int(port), "127.0.0.5", 60)
    try:
        status, body, headers = http_call(server.url, "GET", "/healthz")
        assert status == 503 and body["error"] == "too_many_connections" and headers["retry-after"] == "1", body
    finally:
        for s in crowd:
            s.close()
    time.sleep(0.3)
    assert http_call(server.url, "GET", "/healthz")[0] == 200


def test_docs_only_when_asked_and_behind_the_token(guarded):
    server, token = guarded
    for path, served in (("/openapi.json", 200), ("/docs", 404), ("/redoc", 404)):  # no page that loads a CDN
        assert http_call(server.url, "GET", path)[0] == 401, path
        status, body, _ = http_call(server.url, "GET", path, headers={"Authorization": f"Bearer {token}"})
        assert status == served, (path, body)
    _, spec, _ = http_call(server.url, "GET", "/openapi.json", headers={"Authorization": f"Bearer {token}"})
    assert "/v1/sessions" in spec["paths"]


def test_a_refused_websocket_reaches_the_client_as_a_body_error(server, baseline):
    """The server refuses a second WebSocket on a session before accepting it (409 session_busy); the client
    says so in the server's words, not as the WebSocket library's InvalidStatus."""
    client, _ = baseline
    first = BodyConnection(server.url)
    opened = first.open_session(SessionRequest(model_fingerprint=client.model.body_fingerprint(), x=1, y=29))
    second = BodyConnection(server.url)
    try:
        second.session, second._session_headers = opened, dict(first._session_headers)
        with pytest.raises(BodyError) as refused:
            second._connect_ws()
        assert refused.value.code == "session_busy", refused.value
    finally:
        second.close()
        first.close()


def test_a_token_is_checked_before_any_body_is_read(guarded):
    """A request without a token that declares a 40 MB body gets its 401 from the headers alone, and a JSON
    request over 1 MiB is refused unread: the server reads and holds none of it."""
    server, token = guarded
    host, port = urlsplit(server.url).hostname, urlsplit(server.url).port
    for auth, code in (("", b"401"), (f"Authorization: Bearer {token}\r\n", b"413")):
        with RssWatch(server.proc.pid) as watch, socket.create_connection((host, port), timeout=10) as s:
            started = time.monotonic()
            s.sendall(f"POST /v1/sessions HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: application/json\r\n"
                      f"Content-Length: {40 * MB}\r\n\r\n".encode() + b"{" * 65536)
            status = s.recv(64)
            elapsed = time.monotonic() - started
            with contextlib.suppress(OSError):  # the server may have closed: the rest is never read
                for _ in range(64):
                    s.sendall(b"{" * MB)
            watch.sample()
        assert status.split()[1] == code, status
        assert elapsed < 0.5, elapsed
        assert watch.growth < 50 * MB, watch.growth
    assert http_call(server.url, "GET", "/healthz")[0] == 200
