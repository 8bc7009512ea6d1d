"""The command line's errors say what was wrong and what to do, once, in the `lambdasplit CMD: error:` form,
and before anything slow has run: the real CLI in a subprocess against real servers on loopback."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

import pytest
from helpers import make_certs
from test_cli import cli, failed_clearly

from lambdasplit.server.process import ServerProcess


def test_serve_on_a_port_in_use_fails_at_once_and_suggests_port_0():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        started = time.monotonic()
        r = cli("serve", "--port", str(port), timeout=120)
        elapsed = time.monotonic() - started
    failed_clearly(r, "lambdasplit serve: error:", f"127.0.0.1:{port}", "in use", "--port 0")
    assert r.returncode == 2
    assert "loading" not in r.stderr  # refused before the model loads (about 8 s), not after
    assert elapsed < 4, f"serve took {elapsed:.1f} s to notice the port in use"


def test_serve_says_what_it_loads_then_where_it_listens(full_server):
    """--port 0 picks a free port and the ready line names it; the load is announced before it starts."""
    port = urlsplit(full_server.url).port
    assert port and port != 0
    lines = list(full_server.log)
    loading = next(i for i, line in enumerate(lines) if line.startswith("loading "))
    ready = next(i for i, line in enumerate(lines) if line.startswith("lambdasplit body server listening on"))
    assert loading < ready
    assert lines[loading] == "loading layers [0, 30) of SmolLM2-135M-Instruct (fp32) on cpu ...", lines[loading]
    assert f":{port} " in lines[ready]


@pytest.mark.slow
def test_https_at_a_plain_http_server(full_server):
    plain = full_server.url  # http://127.0.0.1:PORT
    r = cli("generate", "--server", plain.replace("http://", "https://"), "--max-new-tokens", "2", "Hi", timeout=120)
    failed_clearly(r, "lambdasplit generate: error:", "speaks plain HTTP", f"use {plain}")
    assert "WRONG_VERSION_NUMBER" not in r.stderr


@pytest.mark.slow
def test_http_at_a_tls_server(smol_dir, tmp_path):
    _, cert, key = make_certs(tmp_path)
    with ServerProcess(str(smol_dir), "0:1", "--tls-cert", str(cert), "--tls-key", str(key)) as server:
        assert server.url.startswith("https://")
        plain = server.url.replace("https://", "http://")
        r = cli("generate", "--server", plain, "--split", "0:1", "--max-new-tokens", "2", "Hi", timeout=120)
    failed_clearly(r, "lambdasplit generate: error:", "speaks TLS", f"use {server.url}")
    assert "RemoteDisconnected" not in r.stderr


@pytest.mark.parametrize("command", [["generate", "Hi"], ["chat"], ["demo"], ["bench", "decode"], ["web"],
                                     ["eavesdrop"]], ids=lambda c: c[0] if len(c) == 1 or c[0] != "bench" else "bench")
def test_a_malformed_wire_is_a_usage_error(command):
    started = time.monotonic()
    r = cli(*command, "--wire", "fp16,int8,fp32", timeout=60)
    failed_clearly(r, f"lambdasplit {' '.join(c for c in command if c != 'Hi')}: error: argument --wire:",
                   "CODEC or UP,DOWN", "'fp16,int8,fp32'")
    assert r.returncode == 2 and r.stdout == ""
    assert time.monotonic() - started < 10  # refused by the parser: nothing loaded or started


def test_an_unknown_codec_is_named_by_the_parser():
    r = cli("generate", "--wire", "int5", "Hi", timeout=60)
    failed_clearly(r, "argument --wire:", "int5", "8, 6, 4, 3, 2")


@pytest.mark.parametrize("split, words", [("5:2", ["split 5:2 is out of range", "N = 30"]),
                                          pytest.param("1:-40", ["split 1:-40 (that is 1:-10) is out of range"],
                                                       marks=pytest.mark.slow)])
def test_serve_bad_split_says_it_once(split, words):
    r = cli("serve", "--split", split, "--port", "0", timeout=120)
    failed_clearly(r, "lambdasplit serve: error:", *words)
    error = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(error) == 1 and "resolves to" not in r.stderr, r.stderr
    assert error[0].count(split) == 1, error[0]


def test_a_mistyped_local_path_is_not_asked_of_the_hub():
    """`--model tests/no-such-model` looks like a Hub id (owner/name), but tests/ is a folder here: a typo."""
    r = cli("generate", "--model", "tests/no-such-model", "Hi", timeout=120)
    failed_clearly(r, "lambdasplit generate: error:", "local path 'tests/no-such-model' does not exist",
                   "the folder tests/ is here")
    assert "Hub" not in r.stderr
