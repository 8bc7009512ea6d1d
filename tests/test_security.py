"""TLS, bearer tokens and session ownership, against a real server process (HTTPS and WSS on loopback),
and the rules for listening beyond loopback."""

from __future__ import annotations

import json
import os
import ssl
import stat
import subprocess
import sys

import pytest
import websockets.sync.client as ws_client
from helpers import http_call, make_certs
from test_cli import ROOT, cli, failed_clearly
from websockets.exceptions import InvalidStatus

from lambdasplit.client.body import Retry
from lambdasplit.client.generate import SplitClient
from lambdasplit.client.transport import BodyConnection, BodyError
from lambdasplit.server.auth import AuthError, TokenBook, add_token, token_hash
from lambdasplit.server.main import check_exposure
from lambdasplit.server.process import ServerProcess
from lambdasplit.wire.protocol import SESSION_KEY_HEADER, SessionRequest

PROMPT = "What is the difference between AI, ML and DL?"


# ---- token files --------------------------------------------------------------------------------

def test_token_file_keeps_only_hashes(tmp_path):
    path = tmp_path / "tokens"
    r = cli("token", "new", "--file", str(path), "--name", "alice", timeout=60)
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    assert token.startswith("lsk_") and len(token) > 40
    text = path.read_text()
    assert token not in text and f"sha256:{token_hash(token)}  alice" in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    book = TokenBook.load(path)
    assert book.check(f"Bearer {token}").name == "alice"
    for bad in (None, "", "Bearer", f"Basic {token}", f"Bearer {token}x", "Bearer lsk_nope"):
        with pytest.raises(AuthError):
            book.check(bad)
    r = subprocess.run([sys.executable, "-m", "lambdasplit", "token", "hash", "--name", "bob"], input=token + "\n",
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.stdout.strip() == f"sha256:{token_hash(token)}  bob"


def test_bad_token_files(tmp_path):
    raw = tmp_path / "raw"
    raw.write_text("lsk_" + "a" * 43 + "\n")
    with pytest.raises(ValueError, match="looks like a token itself"):
        TokenBook.load(raw)
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no token hashes"):
        TokenBook.load(empty)
    with pytest.raises(ValueError, match="cannot read"):
        TokenBook.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="expected 'sha256"):
        add_token(raw)  # never appends to a file the server could not read


# ---- listening beyond loopback ------------------------------------------------------------------

def test_exposure_rules():
    assert check_exposure("127.0.0.1", False, False, False) is None
    assert check_exposure("::1", False, False, False) is None
    assert check_exposure("0.0.0.0", True, True, False) is None
    for tls, tokens, missing in ((False, True, "TLS"), (True, False, "tokens"), (False, False, "TLS")):
        with pytest.raises(SystemExit, match=f"refusing to listen on 0.0.0.0 without {missing}"):
            check_exposure("0.0.0.0", tls, tokens, False)
        assert "WARNING" in check_exposure("0.0.0.0", tls, tokens, True)


def test_serve_refuses_a_public_address_in_the_clear():
    failed_clearly(cli("serve", "--host", "0.0.0.0", "--port", "0", timeout=60), "refusing to listen on 0.0.0.0",
                   "--insecure")


@pytest.mark.slow
def test_serve_needs_both_tls_files(tmp_path):
    ca, cert, key = make_certs(tmp_path)
    failed_clearly(cli("serve", "--port", "0", "--tls-cert", str(cert), timeout=60), "both --tls-cert and --tls-key")
    failed_clearly(cli("serve", "--port", "0", "--tls-cert", str(cert), "--tls-key", str(ca), timeout=60),
                   "cannot load the TLS certificate")


# ---- a TLS + token server -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def secure(tmp_path_factory, smol_dir):
    folder = tmp_path_factory.mktemp("secure")
    ca, cert, key = make_certs(folder)
    tokens = folder / "tokens"
    alice, bob = add_token(tokens, "alice"), add_token(tokens, "bob")
    with ServerProcess(str(smol_dir), "0:30", "--tls-cert", str(cert), "--tls-key", str(key), "--tokens",
                       str(tokens), "--log-level", "info") as server:
        assert server.url.startswith("https://")
        yield server, str(ca), alice, bob


def _tls(ca: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca)


def test_the_tls_server_sends_no_session_tickets(secure):
    """A TLS 1.3 ticket arriving while a WebSocket client's reader thread waits on the socket made that
    client read and write one SSL object from two threads, and stalled its handshake now and then: the
    server sends none (server/main.py)."""
    server, ca, _, _ = secure
    host, port = server.url.removeprefix("https://").rsplit(":", 1)
    import socket

    with socket.create_connection((host, int(port)), timeout=30) as raw:
        with _tls(ca).wrap_socket(raw, server_hostname=host) as tls:
            assert tls.version() == "TLSv1.3"
            tls.sendall(f"GET /v1/health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            reply = b""
            while chunk := tls.recv(4096):  # a ticket, if one were sent, comes before the reply
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 200")
            assert not tls.session.has_ticket


def test_generation_over_tls_with_a_token(secure, smol_dir):
    server, ca, alice, _ = secure
    reference = SplitClient(smol_dir, server=None, split=(1, 29), wire="fp32").generate(
        PROMPT, max_new_tokens=8, stop_at_eos=False)
    for transport in ("ws", "http"):
        client = SplitClient(smol_dir, server=server.url, split=(1, 29), wire="fp32", token=alice, ca_bundle=ca,
                             transport=transport)
        got = client.generate(PROMPT, max_new_tokens=8, stop_at_eos=False)
        assert got.token_ids == reference.token_ids
        assert got.stats.traffic.socket_up > got.stats.traffic.frame_up  # TLS records and headers on top


def test_an_untrusted_certificate_is_refused(secure, smol_dir):
    server, _, alice, _ = secure
    client = SplitClient(smol_dir, server=server.url, split=(1, 29), token=alice, retry=Retry(attempts=1))
    with pytest.raises(BodyError, match="--ca-bundle") as info:
        client.generate(PROMPT, max_new_tokens=2)
    assert info.value.code == "tls"


@pytest.mark.parametrize("token", [None, "lsk_not-a-token"])
def test_no_or_unknown_token_is_refused(secure, smol_dir, token):
    server, ca, _, _ = secure
    client = SplitClient(smol_dir, server=server.url, split=(1, 29), token=token, ca_bundle=ca, retry=Retry(attempts=1))
    with pytest.raises(BodyError) as info:
        client.generate(PROMPT, max_new_tokens=2)
    assert info.value.code == "unauthorized"
    status, body, headers = http_call(server.url, "GET", "/v1/info", tls=_tls(ca))
    assert status == 401 and body["error"] == "unauthorized" and headers["www-authenticate"].startswith("Bearer")
    assert http_call(server.url, "GET", "/metrics", tls=_tls(ca))[0] == 401
    assert http_call(server.url, "GET", "/healthz", tls=_tls(ca))[0] == 200  # liveness needs no token


def test_sessions_belong_to_their_token(secure, smol_dir):
    server, ca, alice, bob = secure
    client = SplitClient(smol_dir, server=server.url, split=(1, 29), wire="fp32", token=alice, ca_bundle=ca)
    request = SessionRequest(model_fingerprint=client.model.body_fingerprint(), x=1, y=29, dtype="float32")
    with BodyConnection(server.url, token=alice, ca_bundle=ca, transport="http") as mine:
        opened = mine.open_session(request)
        other = mine.open_session(request)  # a second one: ids are unguessable and distinct
        assert opened.session_id != other.session_id and len(opened.session_id) >= 32
        sid = opened.session_id
        as_bob = {"Authorization": f"Bearer {bob}"}
        for method, path in (("POST", f"/v1/sessions/{sid}/step"), ("DELETE", f"/v1/sessions/{sid}")):
            status, body, _ = http_call(server.url, method, path, b"x", headers=as_bob, tls=_tls(ca))
            assert status == 404 and body["error"] == "unknown_session", (method, body)
        # and over a WebSocket: the upgrade refused (404), exactly as for a session that does not exist
        wss = server.url.replace("https://", "wss://") + f"/v1/sessions/{sid}/ws"
        with pytest.raises(InvalidStatus) as refused:
            ws_client.connect(wss, ssl=_tls(ca), additional_headers=as_bob)
        assert refused.value.response.status_code == 404 and b"unknown_session" in refused.value.response.body
        # alice's session is untouched: its owner can still close it
        # bob with alice's session key too (leaked): the session is bound to her token as well
        status, body, _ = http_call(server.url, "DELETE", f"/v1/sessions/{sid}", tls=_tls(ca),
                                    headers={**as_bob, SESSION_KEY_HEADER: opened.key})
        assert status == 404 and body["error"] == "unknown_session", body
        # her token without the session's key opens nothing either
        status, body, _ = http_call(server.url, "DELETE", f"/v1/sessions/{sid}",
                                    headers={"Authorization": f"Bearer {alice}"}, tls=_tls(ca))
        assert status == 404 and body["error"] == "unknown_session", body
        status, body, _ = http_call(server.url, "DELETE", f"/v1/sessions/{sid}", tls=_tls(ca),
                                    headers={"Authorization": f"Bearer {alice}", SESSION_KEY_HEADER: opened.key})
        assert status == 200, body


def test_metrics_and_logs(secure, smol_dir):
    server, ca, alice, _ = secure
    client = SplitClient(smol_dir, server=server.url, split=(1, 29), token=alice, ca_bundle=ca)
    client.generate(PROMPT, max_new_tokens=4, stop_at_eos=False)
    status, text, _ = http_call(server.url, "GET", "/metrics", headers={"Authorization": f"Bearer {alice}"},
                                tls=_tls(ca))
    assert status == 200
    metrics = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            metrics[name] = float(value)
    assert metrics['lambdasplit_steps_total{transport="ws"}'] >= 4
    assert metrics["lambdasplit_sessions_opened_total"] >= 1
    assert metrics["lambdasplit_unauthorized_total"] >= 0
    assert metrics["lambdasplit_kv_budget_bytes"] > 0 and metrics["lambdasplit_rss_bytes"] > 0
    assert metrics["lambdasplit_batch_size_count"] >= 4
    assert metrics["lambdasplit_step_seconds_count"] >= 4
    assert metrics["lambdasplit_bytes_received_total"] > 0
    logs = [line for line in server.log if line.startswith("{")]
    events = [json.loads(line) for line in logs]
    assert any(e.get("event") == "session_open" and e.get("client") == "alice" for e in events)
    assert all(alice not in line and PROMPT not in line for line in server.log)  # no secrets, no text


@pytest.mark.slow
def test_token_from_a_file_on_the_command_line(secure, tmp_path):
    server, ca, alice, _ = secure
    token_file = tmp_path / "token"
    token_file.write_text(alice + "\n")
    r = cli("generate", "--server", server.url, "--ca-bundle", ca, "--token-file", str(token_file),
            "--max-new-tokens", "3", "Hi")
    assert r.returncode == 0, r.stderr
    env = {k: v for k, v in os.environ.items() if k != "LAMBDASPLIT_TOKEN"}
    r = subprocess.run([sys.executable, "-m", "lambdasplit", "generate", "--server", server.url, "--ca-bundle", ca,
                        "--retries", "1", "--max-new-tokens", "3", "Hi"], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=120)
    failed_clearly(r, "unauthorized")


def test_cloud_only_takes_no_tokens(tmp_path):
    tokens = tmp_path / "tokens"
    add_token(tokens)
    failed_clearly(cli("serve", "--cloud-only", "--port", "0", "--tokens", str(tokens), timeout=60),
                   "--cloud-only", "checks no tokens")
