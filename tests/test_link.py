"""The emulated link: a real loopback TCP proxy in front of real servers. Only lower bounds on time
are asserted (a link may be slower than emulated on a busy machine, never faster)."""

from __future__ import annotations

import socket
import socketserver
import threading
import time

import pytest
from test_cli import cli, failed_clearly

from lambdasplit.client.generate import SplitClient
from lambdasplit.net.link import LinkError, LinkProxy, LinkSpec, link_to


@pytest.mark.parametrize("text, rate, delay", [("1000mbit,5ms", 1e9, 0.005), ("10mbit", 1e7, 0.0),
                                               ("20ms", None, 0.02), ("1gbit,500us", 1e9, 0.0005),
                                               ("0.5s, 64kbit", 64e3, 0.5)])
def test_link_specs(text, rate, delay):
    spec = LinkSpec.parse(text)
    assert spec.rate_bps == rate and abs(spec.delay_s - delay) < 1e-12


@pytest.mark.parametrize("text", ["", "fast", "10mb", "1000mbit,5ms,1s", "0mbit", "10mbit,20mbit", "5ms,6ms",
                                  "61s", "-5ms"])
def test_bad_link_specs(text):
    with pytest.raises(LinkError):
        LinkSpec.parse(text)


class _Sink(socketserver.BaseRequestHandler):
    """Reads until the client shuts down its side, then answers with the byte count."""

    def handle(self):
        n = 0
        while data := self.request.recv(1 << 16):
            n += len(data)
        self.request.sendall(str(n).encode())


@pytest.fixture
def sink():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address
    server.shutdown()
    server.server_close()


def _push(port: int, nbytes: int) -> tuple[int, float]:
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"\0" * nbytes)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while data := s.recv(100):
            reply += data
    return int(reply), time.perf_counter() - started


def test_rate_limit_and_byte_counts(sink):
    nbytes = 1_000_000
    with LinkProxy(*sink, LinkSpec.parse("20mbit")) as link:
        received, took = _push(link.port, nbytes)
        assert received == nbytes  # every byte arrives, in order of count
        assert took >= nbytes * 8 / 20e6 * 0.95  # 1 MB at 20 Mbit/s takes at least 0.4 s
        assert link.bytes_up == nbytes and link.bytes_down == len(str(nbytes))


def test_one_way_delay(sink):
    with LinkProxy(*sink, LinkSpec.parse("50ms")) as link:
        received, took = _push(link.port, 10)
    assert received == 10 and took >= 2 * 0.05 * 0.95  # there and back


def test_generation_through_the_link_is_the_same(smol_dir, full_server):
    """The same tokens through a 1 Gbit/s, 10 ms link as directly, each step paying at least the round trip,
    and the proxy's byte counts agree with the client's socket counts."""
    direct = SplitClient(smol_dir, server=full_server.url, split=(1, 29), wire="fp32")
    want = direct.generate("Hi", max_new_tokens=6, stop_at_eos=False)
    with link_to(full_server.url, "1000mbit,10ms") as link:
        linked = SplitClient(smol_dir, server=link.url, split=(1, 29), wire="fp32")
        got = linked.generate("Hi", max_new_tokens=6, stop_at_eos=False)
    assert got.token_ids == want.token_ids
    assert got.stats.network_s >= 6 * 2 * 0.010 * 0.95
    t = got.stats.traffic
    if t.counted_at_socket:
        # the proxy also carried the session's HTTP requests; the client's WebSocket is most of it
        assert abs(link.bytes_up - t.socket_up) <= 0.02 * t.socket_up + 2000
        assert abs(link.bytes_down - t.socket_down) <= 0.02 * t.socket_down + 2000


def test_proxy_to_a_closed_port_closes_the_connection():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with LinkProxy("127.0.0.1", port, LinkSpec.parse("1ms")) as link:
        with socket.create_connection(("127.0.0.1", link.port), timeout=5) as c:
            assert c.recv(10) == b""  # closed, not hung


@pytest.mark.slow
def test_cli_link(full_server):
    r = cli("generate", "--server", full_server.url, "--link", "1000mbit,5ms", "--max-new-tokens", "4",
            "--ignore-eos", "--stats", "Hi")
    assert r.returncode == 0, r.stderr
    assert "emulated link (1000 Mbit/s, 5 ms one way)" in r.stderr and "kB up" in r.stderr
    failed_clearly(cli("generate", "--link", "1000mbit,5ms", "--max-new-tokens", "2", "Hi"), "--server")
    failed_clearly(cli("generate", "--server", full_server.url, "--link", "fast", "--max-new-tokens", "2", "Hi"),
                   "fast")
