"""The eavesdropper's view: a recording link proxy in front of real servers, a passive parser of the bytes it
recorded, and the `eavesdrop` command end to end. The observer is given bytes only; the device's own results
are used to check what it read."""

from __future__ import annotations

import os
import random
import re
import socket
import ssl
import struct
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli import cli
from test_link import _push, sink  # noqa: F401  (the byte-sink fixture)

from lambdasplit.net import certs
from lambdasplit.net.link import LinkProxy, LinkSpec, Recording
from lambdasplit.net.tap import observe, parse_http, parse_websocket
from lambdasplit.privacy.eavesdrop import capture_cloud, capture_split, in_plain_text, prompt_rows, reconstruct
from lambdasplit.server.process import ServerProcess
from lambdasplit.wire.codecs import session_codecs
from lambdasplit.wire.frame import MAGIC, Frame, encode_frame

PROMPT = "My PIN is 4721 and I have diabetes."
FUZZ = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))


# ---- the recording link ---------------------------------------------------------------------------

def test_the_link_records_each_connection_each_way(sink):  # noqa: F811
    with LinkProxy(*sink, LinkSpec(), record=True) as link:
        payload = os.urandom(200_000)
        for n in (10, 200_000):
            with socket.create_connection(("127.0.0.1", link.port)) as s:
                s.sendall(payload[:n])
                s.shutdown(socket.SHUT_WR)
                while s.recv(100):
                    pass
        rec = link.recordings
    assert [(r.up, r.down) for r in rec] == [(payload[:10], b"10"), (payload, b"200000")]
    assert all(r.complete for r in rec) and link.bytes_up == 200_010


def test_the_recording_stops_at_its_limit_and_counts_the_rest(sink):  # noqa: F811
    with LinkProxy(*sink, LinkSpec(), record=True, record_limit=1000) as link:
        assert _push(link.port, 5000)[0] == 5000  # forwarded in full
        (rec,) = link.recordings
    assert len(rec.up) + len(rec.down) == 1000 and rec.dropped_up + len(rec.up) == 5000 and not rec.complete
    assert any("record limit" in p for p in observe([rec]).problems)
    with LinkProxy(*sink, LinkSpec()) as link:  # recording is off by default
        _push(link.port, 10)
        assert link.recordings == []


# ---- captures through real servers -----------------------------------------------------------------

@pytest.fixture(scope="module")
def ws_capture(smol_dir, full_server):
    """The default split, WebSocket steps, a seeded rotation up (the observer needs the session's seed)."""
    return capture_split(smol_dir, full_server.url, split=(1, 29), wire=("had+int8", "fp32"), prompt=PROMPT,
                         max_new_tokens=6)


@torch.inference_mode()
def test_the_tap_recovers_exactly_the_frames_the_device_sent(smol_dir, ws_capture):
    from lambdasplit.models.llm import load_split

    cap = ws_capture
    obs = observe(cap.recordings)
    assert not obs.problems, obs.problems
    assert [c.protocol for c in obs.connections] == ["http", "http+websocket"]
    (session,) = obs.sessions
    up, down = obs.decoded("up"), obs.decoded("down")
    assert len(up) == len(down) == len(cap.token_ids)  # one step per token, the last token is never sent
    assert [f.step for f in up] == list(range(len(up))) and {f.codec for f in up} == {"had+int8"}
    n_prompt = len(cap.prompt_ids)
    assert prompt_rows(obs, session.session_id) == n_prompt and up[0].shape == (n_prompt, 576)

    # replay the device: the uplink must be its head states through the session's codec, bit for bit;
    # the downlink (fp32) must make its tail choose exactly the tokens it generated
    model = load_split(smol_dir, 1, 29, parts=("head", "tail"))
    wire = session.request["wire"]
    codec = session_codecs(wire["up"], wire["down"], seed=wire["seed"], x=1, y=29)[0]
    wrong = session_codecs(wire["up"], wire["down"], seed=wire["seed"] + 1, x=1, y=29)[0]
    head_cache, tail_cache = model.head.layers.new_cache(), model.tail.layers.new_cache()
    steps = [cap.fed_ids[:n_prompt]] + [[t] for t in cap.fed_ids[n_prompt:]]  # as the device's Stepper ran
    pos, chosen = 0, []
    for ids, sent, back in zip(steps, up, down):
        hidden = model.head(torch.tensor([ids]), head_cache, pos)[0]
        assert torch.equal(sent.tensor, codec.decode(codec.encode(hidden), tuple(hidden.shape)))
        assert (sent.tensor - hidden).norm() < 0.02 * hidden.norm()
        assert (wrong.decode(codec.encode(hidden), tuple(hidden.shape)) - hidden).norm() > 0.5 * hidden.norm()
        chosen.append(int(model.tail(back.tensor.unsqueeze(0), tail_cache, pos)[0, -1].argmax()))
        pos += len(ids)
    assert chosen == cap.token_ids


def test_split_bytes_never_carry_the_prompt_while_cloud_only_does(smol_dir, ws_capture):
    assert not in_plain_text(ws_capture.recordings, PROMPT)
    for word in ("4721", "diabetes"):
        assert not any(word.encode() in r.up + r.down for r in ws_capture.recordings)
    with ServerProcess(str(smol_dir), "0:30", "--cloud-only") as cloud:
        cap = capture_cloud(cloud.url, prompt=PROMPT, max_new_tokens=6)
    assert in_plain_text(cap.recordings, PROMPT)
    (done,) = observe(cap.recordings).completions
    assert done.prompt == PROMPT and done.token_ids == cap.token_ids and done.answer == cap.text


@torch.inference_mode()
def test_http_steps_and_the_uplink_at_layer_0(smol_dir, full_server):
    """Steps as HTTP POSTs; at X = 0 the uplink carries embeddings, which the nearest-embedding attack
    turns back into every token the device sent (a floor that holds whatever the prompt)."""
    cap = capture_split(smol_dir, full_server.url, split=(0, 29), wire="int8", prompt=PROMPT, max_new_tokens=4,
                        transport="http")
    obs = observe(cap.recordings)
    assert not obs.problems, obs.problems
    assert [c.protocol for c in obs.connections] == ["http"]
    assert len(obs.decoded("up")) == len(obs.decoded("down")) == len(cap.token_ids)
    assert {f.carrier for f in obs.frames} == {"http"}
    results = {(r.direction, r.target): r for r in reconstruct(obs, smol_dir, 0, 29, capture=cap)}
    uplink = results["uplink", "input"]
    assert uplink.positions == list(range(len(cap.fed_ids))) and uplink.truth == cap.fed_ids
    assert uplink.rate(1) >= 0.95, uplink.rate(1)
    nxt = results["downlink", "next"]
    assert nxt.truth == cap.token_ids and nxt.guesses.shape == (len(cap.token_ids), 5)


# ---- TLS, and the command ------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_over_tls_the_observer_gets_ciphertext(tmp_path):
    r = cli("eavesdrop", "--tls", "--max-new-tokens", "3", "--dump", str(tmp_path), PROMPT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "ciphertext only" in r.stdout and "(0 occurrences of the LSPL magic)" in r.stdout
    assert "nothing to attack" in r.stdout and "bits/byte" in r.stdout
    files = sorted((tmp_path / "split").iterdir())
    recordings = [Recording(files[i + 1].read_bytes(), files[i].read_bytes()) for i in range(0, len(files), 2)]
    assert len(recordings) >= 2 and not in_plain_text(recordings, PROMPT)
    obs = observe(recordings)
    assert {c.protocol for c in obs.connections} == {"tls"}
    assert not obs.frames and not obs.sessions and not obs.completions and obs.magic_hits == 0
    tls = obs.tls
    assert tls.types["application_data"] > 6 and tls.ciphertext > 10_000 and tls.entropy > 7.9
    assert not any(m in r.up + r.down for r in recordings for m in (MAGIC, b"HTTP/1.1", b"/v1/sessions"))


@pytest.mark.slow
def test_cli_split_prints_the_reconstruction_beside_the_truth(full_server):
    r = cli("eavesdrop", "--mode", "split", "--server", full_server.url, "--wire", "fp32", "--max-new-tokens", "8",
            timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "session opened in plain JSON: layers [1, 29)" in out and "is in the captured bytes: no" in out
    assert "frames decoded up: 8 (1 of [" in out and "codec fp32" in out
    for what in ("uplink (layer 1)", "downlink (layer 29)", "the token the model says next", "truth │", "spied │"):
        assert what in out, what
    assert "[eavesdrop] attacking" in r.stderr  # progress on stderr
    # the downlink at layer 29 is one layer from the output: the logit lens reads much of the answer
    m = re.search(r"reading the token the model says next\n  recovered (\d+)/8 tokens", out)
    assert m and int(m.group(1)) >= 2, out


# ---- a passive parser never crashes ----------------------------------------------------------------

def _ws(payload: bytes, opcode: int, fin: bool = True, mask: bytes | None = None) -> bytes:
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    size = bytes([n]) if n < 126 else bytes([126]) + struct.pack(">H", n) if n < 65536 else \
        bytes([127]) + struct.pack(">Q", n)
    if mask is None:
        return head + size + payload
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + bytes([size[0] | 0x80]) + size[1:] + mask + body


def _frame(rows: int, step: int, pos: int) -> bytes:
    return encode_frame(Frame("hidden", step=step, pos=pos, tensor=torch.randn(rows, 8), codec="fp16"))


def test_websocket_fragments_control_frames_and_chunked_http():
    one, two = _frame(3, 0, 0), _frame(1, 1, 3)
    key = b"\x01\x02\x03\x04"
    up = (_ws(one[:100], 2, fin=False, mask=key) + _ws(b"hi", 9, mask=key) + _ws(one[100:200], 0, False, key)
          + _ws(one[200:], 0, mask=key) + _ws(two, 2, mask=key) + _ws(struct.pack(">H", 1000), 8, mask=key))
    messages, problem = parse_websocket(up, masked=True)
    assert problem == "" and [m.opcode for m in messages] == [9, 2, 2, 8] and messages[1].data == one
    assert parse_websocket(up, masked=False)[1]  # a server must not mask: refused, not misread
    handshake = (b"GET /v1/sessions/abc/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
                 b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
    obs = observe([(handshake[0] + up, handshake[1] + _ws(two, 2))])
    assert [(f.direction, f.step, f.shape) for f in obs.frames] == [("up", 0, (3, 8)), ("up", 1, (1, 8)),
                                                                  ("down", 1, (1, 8))]
    assert all(f.tensor is not None and f.session_id == "abc" for f in obs.frames)
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(one[i:i + 50]), one[i:i + 50]) for i in range(0, len(one), 50))
    post = b"POST /v1/sessions/abc/step HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
    (req,), rest, problem = parse_http(post, requests=True)
    assert req.body == one and rest == b"" and problem == ""
    reply = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(two) + two
    obs = observe([(post, reply)])
    assert [(f.direction, f.carrier, f.shape) for f in obs.frames] == [("up", "http", (3, 8)),
                                                                     ("down", "http", (1, 8))]


def test_frames_of_a_session_the_capture_missed_are_reported_not_misdecoded():
    codec = session_codecs("had+int8", "fp32", seed=12345, x=1, y=29)[0]
    data = encode_frame(Frame("hidden", tensor=torch.randn(2, 64), codec=codec))
    (seen,) = observe([(b"\0" * 7 + data + b"junk", b"")]).frames  # no HTTP: carved out of raw bytes
    assert seen.tensor is None and "seed" in seen.problem and seen.shape == (2, 64)


@settings(max_examples=300, **FUZZ)
@given(up=st.binary(max_size=400), down=st.binary(max_size=400),
       prefix=st.sampled_from([b"", b"POST /v1/sessions/x/step HTTP/1.1\r\nContent-Length: 40\r\n\r\nLSPL\x02",
                               b"GET /v1/sessions/x/ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n", b"\x17\x03\x03\x00\x10",
                               b"HTTP/1.1 101 OK\r\n\r\n\x82\x7f", b"LSPL\x02\x10\x00\x00\x00"]))
def test_garbage_never_crashes_the_observer(up, down, prefix):
    obs = observe([(prefix + up, prefix + down), (up, b"")])
    assert len(obs.connections) == 2
    obs.problems, obs.tls, obs.states("up")  # noqa: B018  (the summaries work too)


def test_cut_and_damaged_real_captures_never_crash_the_observer(ws_capture):
    whole = ws_capture.recordings
    full = observe(whole)
    rng = random.Random(0)
    for trial in range(40):
        damaged = []
        for r in whole:
            up, down = bytearray(r.up), bytearray(r.down)
            for data in (up, down):
                for _ in range(3 if trial % 2 else 0):  # odd trials also flip bytes anywhere
                    data[rng.randrange(len(data))] ^= 0xFF
            damaged.append((bytes(up[:rng.randrange(len(up) + 1)]), bytes(down[:rng.randrange(len(down) + 1)])))
        obs = observe(damaged)
        assert len(obs.connections) == len(whole)
        assert all(f.tensor is not None or f.problem for f in obs.frames)
        if trial % 2 == 0:  # cut only: what decodes is a prefix of each direction's frames, bit for bit
            for direction in ("up", "down"):
                got = obs.decoded(direction)
                assert all(torch.equal(a.tensor, b.tensor) for a, b in zip(got, full.decoded(direction)))


# ---- certificates ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["cryptography", "openssl"])
def test_throwaway_certificates_pass_a_real_handshake(tmp_path, backend):
    ca, cert, key = certs.make_certs(tmp_path, backend=backend)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(tls.recv(10))

    threading.Thread(target=serve, daemon=True).start()
    client_ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(listener.getsockname()) as raw:
        with client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"ping")
            assert tls.recv(10) == b"ping"
    listener.close()
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["ca.pem", "cert.pem", "key.pem"]
