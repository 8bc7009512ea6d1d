"""The socket byte counts against a packet capture of the loopback port (tcpdump). Skipped, with the
reason, where tcpdump is missing or capturing is not permitted."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from lambdasplit.client.generate import SplitClient
from lambdasplit.net.capture import Capture, CaptureError


def test_socket_counts_agree_with_a_packet_capture(smol_dir, full_server):
    port = urlsplit(full_server.url).port
    client = SplitClient(smol_dir, server=full_server.url, split=(1, 29), wire="fp32")
    try:
        with Capture(port) as cap:
            result = client.generate("What is the difference between AI, ML and DL?", max_new_tokens=12,
                                     stop_at_eos=False)
    except CaptureError as exc:
        pytest.skip(f"no packet capture here: {exc}")
    t = result.stats.traffic
    if not t.counted_at_socket:
        pytest.skip("this OS does not report per-socket TCP byte counts")
    assert cap.segments > 12
    assert t.socket_up > 41 * 576 * 4 and t.socket_down > 12 * 576 * 4  # the prompt's states, then a row a step
    assert abs(cap.to_port - t.socket_up) <= 0.02 * t.socket_up, (cap.to_port, t.socket_up)
    assert abs(cap.from_port - t.socket_down) <= 0.02 * t.socket_down, (cap.from_port, t.socket_down)
