"""The emulated slower device: after each head and tail pass, the client waits (k - 1) x what it took."""

from __future__ import annotations

import pytest
from test_cli import cli

from lambdasplit.client.generate import SplitClient


def test_slower_device_waits_k_minus_one_times_its_compute(smol_dir):
    plain = SplitClient(smol_dir, server=None, wire="fp32").generate("Hi", max_new_tokens=4, stop_at_eos=False)
    slow = SplitClient(smol_dir, server=None, wire="fp32", device_slowdown=3.0)
    got = slow.generate("Hi", max_new_tokens=4, stop_at_eos=False)
    s = got.stats
    assert got.token_ids == plain.token_ids  # the same answer, only later
    assert s.device_slowdown == 3.0 and s.head_tail_s > 0
    assert s.emulated_wait_s == pytest.approx(2 * s.head_tail_s, rel=1e-9)
    assert s.device_s >= s.head_tail_s + s.emulated_wait_s  # the waits count as device time
    assert plain.stats.emulated_wait_s == 0


@pytest.mark.parametrize("k", [0.5, 0, -2, 5000])
def test_bad_slowdown(smol_dir, k):
    with pytest.raises(ValueError, match="device_slowdown"):
        SplitClient(smol_dir, server=None, device_slowdown=k)


@pytest.mark.slow
def test_cli_labels_the_emulation(full_server):
    r = cli("generate", "--server", full_server.url, "--device-slowdown", "2", "--max-new-tokens", "3", "--stats", "Hi")
    assert r.returncode == 0, r.stderr
    assert "EMULATED device 2x slower" in r.stderr
