"""A body server that dies mid-generation: the client reconnects (the same URL, or the next server in its
list), opens a new session, replays the prefix, and the answer is token for token the uninterrupted one."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from lambdasplit.client.body import Retry
from lambdasplit.client.generate import GenerationStats, SplitClient
from lambdasplit.client.transport import BodyError
from lambdasplit.server.process import ServerProcess

PROMPT = "What is the difference between AI, ML and DL?"
TOKENS = 20


@pytest.fixture(scope="module")
def reference(smol_dir):
    client = SplitClient(smol_dir, server=None, split=(1, 29), wire="fp32")
    return client.generate(PROMPT, max_new_tokens=TOKENS, stop_at_eos=False).token_ids


def _run_killing(client: SplitClient, victim: ServerProcess, after: int, then=None) -> tuple[list[int], GenerationStats]:
    stats, out = GenerationStats(), []
    ids = client.encode_prompt(PROMPT)
    for token in client.generate_ids(ids, max_new_tokens=TOKENS, stop_at_eos=False, stats=stats):
        out.append(token)
        if len(out) == after:
            victim.proc.kill()  # SIGKILL: no goodbye, the session and its cache vanish
            victim.proc.wait()
            if then is not None:
                then()
    return out, stats


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["ws", "http"])
def test_fails_over_to_the_next_server(smol_dir, full_server, reference, transport):
    events = []
    with ServerProcess(str(smol_dir), "0:30") as doomed:
        client = SplitClient(smol_dir, server=[doomed.url, full_server.url], split=(1, 29), wire="fp32",
                             transport=transport, retry=Retry(attempts=4, base_s=0.05), on_event=events.append)
        out, stats = _run_killing(client, doomed, after=7)
    assert out == reference
    assert stats.recoveries == 1 and any("replaying" in e for e in events), events
    assert stats.traffic.steps == TOKENS  # one step per token: the replay rides on the step that failed


@pytest.mark.slow
def test_waits_for_the_same_server_to_come_back(smol_dir, reference):
    with socket.socket() as s:  # a port the replacement can bind again
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    first = ServerProcess(str(smol_dir), "0:30", "--port", str(port))
    started: list[ServerProcess] = []

    def restart():
        def run():
            time.sleep(1.0)  # the client sees refused connections first, and backs off
            started.append(ServerProcess(str(smol_dir), "0:30", "--port", str(port)))
        threading.Thread(target=run, daemon=True).start()

    try:
        client = SplitClient(smol_dir, server=first.url, split=(1, 29), wire="fp32",
                             retry=Retry(attempts=10, base_s=0.5, cap_s=4.0))
        out, stats = _run_killing(client, first, after=5, then=restart)
    finally:
        first.stop()
        for server in started:
            server.stop()
    assert started and started[0].url == first.url
    assert out == reference and stats.recoveries == 1


def test_gives_up_with_a_clear_error(smol_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens here once the socket closes
    client = SplitClient(smol_dir, server=[dead, dead], split=(1, 29), retry=Retry(attempts=3, base_s=0.01))
    started = time.monotonic()
    with pytest.raises(BodyError) as info:
        client.generate(PROMPT, max_new_tokens=2)
    assert info.value.code == "unreachable" and "cannot reach" in str(info.value)
    assert time.monotonic() - started < 10


def test_backoff_grows_and_is_capped():
    retry = Retry(attempts=8, base_s=0.5, cap_s=4.0)
    waits = [retry.wait(k) for k in range(8)]
    assert 0.3 < waits[0] < 0.7 and waits[2] > waits[0] and max(waits) <= 4.0 * 1.25
