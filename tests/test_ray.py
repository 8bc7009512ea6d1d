"""The body server on Ray Serve (`lambdasplit serve --ray`): a real local Ray instance, two real replicas of
the body (split 1:29 of the embedded model) behind Serve's HTTP proxy, and real clients.

- affinity: concurrent sessions each stay on the replica that holds their KV cache (proved from the
  replicas' own step counters, and by no recovery on the client), with the unsplit model's tokens;
- both transports (WebSocket, HTTP POST) pass the proxy, with frames up to the advertised limit;
- a replica killed mid-generation: the client replays on another replica, and the output is the same;
- the CLI's refusals, and one end-to-end `lambdasplit serve --ray` subprocess.

One Ray instance and one deployment serve the whole module (the CLI's own start runs first, before it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("ray", reason="needs Ray Serve: pip install 'lambdasplit[ray]'")

from helpers import hf_greedy  # noqa: E402

from lambdasplit.client.body import Retry  # noqa: E402
from lambdasplit.client.generate import GenerationStats, SplitClient  # noqa: E402
from lambdasplit.client.transport import BodyConnection, BodyError  # noqa: E402
from lambdasplit.server.app import ServerSettings  # noqa: E402
from lambdasplit.server.main import READY_LINE  # noqa: E402
from lambdasplit.wire.frame import Frame, encode_frame  # noqa: E402
from lambdasplit.wire.protocol import SessionRequest  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["What is the difference between AI, ML and DL?", "Name three colours.", "Why is the sky blue?",
           "Write a haiku about rain."]
TOKENS = 6
MAX_POSITIONS = 256  # per session: small KV reservations, and a frame at the size limit is refused as too long


def _client(smol_dir, url: str, transport: str = "ws", **kw) -> SplitClient:
    return SplitClient(smol_dir, server=url, split=(1, 29), wire="fp32", transport=transport, speculate="off",
                       **kw)


def _steps(metrics: str) -> int:
    """lambdasplit_steps_total over both transports, from one replica's Prometheus text."""
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in metrics.splitlines()
               if line.startswith("lambdasplit_steps_total"))


@pytest.fixture(scope="module")
def reference(hf_model, smol_dir):
    """The unsplit model's greedy tokens for each prompt (the chat template the client applies)."""
    encode = _client(smol_dir, "http://127.0.0.1:9").encode_prompt  # no connection is made to encode
    return {p: hf_greedy(hf_model, encode(p), TOKENS) for p in PROMPTS}


# ---- the CLI (first: no Ray instance of this module runs yet) ----------------------------------

def _serve_fails(capsys, *args: str) -> str:
    from lambdasplit.cli import main

    with pytest.raises(SystemExit) as info:
        main(["serve", *args])
    assert info.value.code not in (0, None)
    return str(info.value.code) + capsys.readouterr().err


@pytest.mark.parametrize("args, words", [
    (["--ray", "--replicas", "0"], ["--replicas", "at least 1"]),
    (["--ray", "--ray-cpus-per-replica", "0"], ["--ray-cpus-per-replica", "positive"]),
    (["--ray", "--cloud-only"], ["--cloud-only", "drop --ray"]),
    (["--ray", "--model", "digits"], ["text-to-image", "drop --ray"]),
    (["--replicas", "2"], ["go with --ray"]),
    (["--ray", "--host", "0.0.0.0"], ["refusing to listen on 0.0.0.0"]),
    (["--ray", "--tls-cert", "cert.pem"], ["both --tls-cert and --tls-key"]),
])
def test_cli_refuses(capsys, args, words):
    message = _serve_fails(capsys, *args)
    for word in words:
        assert word in message, message


def test_cli_refuses_a_busy_port(capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        message = _serve_fails(capsys, "--ray", "--port", str(busy.getsockname()[1]))
    assert "cannot listen on 127.0.0.1" in message, message


def test_cli_without_ray_says_how_to_install(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    message = _serve_fails(capsys, "--ray")
    assert "pip install 'lambdasplit[ray]'" in message, message


def test_cli_serves_end_to_end(smol_dir, reference):
    """`lambdasplit serve --ray` as a real process: the standalone server's ready line with the Serve URL, a
    generation through it, and a clean exit on SIGTERM that leaves no Ray process behind."""
    import psutil

    cmd = [sys.executable, "-m", "lambdasplit", "serve", "--ray", "--replicas", "1", "--split", "1:29",
           "--model", str(smol_dir), "--port", "0", "--max-positions", str(MAX_POSITIONS)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    log: list[str] = []
    try:
        url = None
        for line in proc.stdout:
            log.append(line.rstrip())
            if line.startswith(READY_LINE):
                url = line[len(READY_LINE):].split()[0]
                break
        assert url, "\n".join(log)
        assert "Ray Serve: 1 replica" in log[-1]
        threading.Thread(target=lambda: [log.append(x.rstrip()) for x in proc.stdout], daemon=True).start()
        family = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        assert family, "Ray started no processes?"
        result = _client(smol_dir, url, "http").generate(PROMPTS[0], max_new_tokens=TOKENS, stop_at_eos=False)
        assert result.token_ids == reference[PROMPTS[0]]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, "\n".join(log)
        deadline = time.monotonic() + 30
        while (left := [pid for pid in family if psutil.pid_exists(pid)
                        and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"processes left behind: {[psutil.Process(p).cmdline()[:2] for p in left]}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_router_reads_the_session_from_serves_session_header():
    """What the router relies on in Ray: the session id the client sends in Serve's session header reaches it
    as the request's metadata (a canary for a Ray upgrade that changes this), and how ids map to replicas."""
    from ray.serve._private.common import RequestMetadata
    from ray.serve._private.constants import SERVE_SESSION_ID
    from ray.serve.request_router import PendingRequest

    from lambdasplit.client.transport import _routing
    from lambdasplit.server import ray_router as r

    assert SERVE_SESSION_ID.lower() == r.SESSION_HEADER.lower()

    def pending(session_id: str) -> PendingRequest:
        return PendingRequest(args=[], kwargs={}, metadata=RequestMetadata(
            request_id="r", internal_request_id="i", session_id=session_id))

    assert r.request_tag(pending("ab12cd34.Zx-_9q")) == "ab12cd34"
    assert r.request_tag(pending("ab12cd34.")) == "ab12cd34"  # a replica's own /metrics
    assert r.request_tag(pending("")) == r.request_tag(None) == ""
    assert r.request_tag(pending("untagged-id_9")) == ""  # a standalone server's id
    assert r.request_tag(pending("bad/tag.x")) == ""
    assert r.session_prefix("ab12cd34") == "ab12cd34." and len(r.replica_tag("odd id/with#chars")) == 16
    # the client sends the header only for ids that name a replica, and only well-formed ones
    assert _routing("ab12cd34.Zx") == {"X-Session-Id": "ab12cd34.Zx"}
    assert _routing("plainTokenUrlsafe_-") == {} and _routing("a.b\r\nX-Evil: 1") == {}


# ---- one Ray instance, one deployment of two replicas -------------------------------------------

@pytest.fixture(scope="module")
def ray_body(smol_dir):
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    from ray import serve

    from lambdasplit.server.ray_serve import start_ray_body

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level="warning")
    try:
        body = start_ray_body(smol_dir, 1, 29, replicas=2, port=0, cpus_per_replica=1,
                              settings=ServerSettings(max_positions=MAX_POSITIONS, max_sessions=16))
        try:
            yield body
        finally:
            body.shutdown()
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def test_sessions_stay_on_their_replica(ray_body, smol_dir, reference):
    """Four concurrent sessions (two over WebSocket, two over HTTP POST): each gets the unsplit model's tokens
    with no recovery, the sessions spread over both replicas, and each replica ran exactly the steps of the
    sessions whose ids it handed out. A step that reached the other replica would find no session there,
    and the client's replay would show as a recovery and as extra steps."""
    replicas = ray_body.wait_replicas()
    before = {r: _steps(ray_body.replica_metrics(r)) for r in replicas}
    clients = [_client(smol_dir, ray_body.url, "ws" if i % 2 == 0 else "http") for i in range(len(PROMPTS))]
    results, errors = [None] * len(PROMPTS), []
    start = threading.Barrier(len(PROMPTS))

    def run(i: int) -> None:
        try:
            start.wait()
            stats = GenerationStats()
            ids = clients[i].encode_prompt(PROMPTS[i])
            tokens = list(clients[i].generate_ids(ids, max_new_tokens=TOKENS, stop_at_eos=False, stats=stats))
            results[i] = tokens, stats
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    expected: dict[str, int] = {r: 0 for r in replicas}
    for prompt, (tokens, stats) in zip(PROMPTS, results):
        assert tokens == reference[prompt], prompt
        assert stats.recoveries == 0
        replica = ray_body.replica_of(stats.body.opened.session_id)
        assert replica in expected, (stats.body.opened.session_id, replicas)
        expected[replica] += stats.traffic.steps
    assert all(expected.values()), f"the sessions did not spread over the replicas: {expected}"
    after = {r: _steps(ray_body.replica_metrics(r)) for r in replicas}
    assert {r: after[r] - before[r] for r in replicas} == expected


@pytest.mark.parametrize("transport", ["ws", "http"])
def test_frames_up_to_the_limit_pass_the_proxy(ray_body, smol_dir, transport):
    """A frame of the advertised maximum size crosses the proxy whole: the replica refuses it for the session's
    length (too_long from its header over a WebSocket; too_large over HTTP, where the replica reads a body only up
    to the session's largest step), not the proxy for its size; and a normal step on the same session then works."""
    info = BodyConnection(ray_body.url).info()
    assert info.max_frame_bytes == 16 << 20  # the Serve proxy's WebSocket limit caps the default 64 MiB
    device = _client(smol_dir, ray_body.url, transport)
    conn = BodyConnection(ray_body.url, transport=transport)
    conn.open_session(SessionRequest(model_fingerprint=device.model.body_fingerprint(1, 29), x=1, y=29,
                                     max_positions=MAX_POSITIONS))
    try:
        header = len(encode_frame(Frame("hidden", step=0, pos=0, tensor=torch.zeros(1, 576), codec="fp32"))) - 576 * 4
        rows = (info.max_frame_bytes - header - 64) // (576 * 4)
        big = encode_frame(Frame("hidden", step=0, pos=0, tensor=torch.zeros(rows, 576), codec="fp32"))
        assert info.max_frame_bytes - 3 * 576 * 4 < len(big) <= info.max_frame_bytes
        with pytest.raises(BodyError) as refused:
            conn.step(big)
        assert refused.value.code == ("too_long" if transport == "ws" else "too_large"), refused.value
        reply = conn.step(encode_frame(Frame("hidden", step=0, pos=0, tensor=torch.randn(3, 576), codec="fp32")))
        assert reply.kind == "hidden" and tuple(reply.tensor.shape) == (3, 576)
    finally:
        conn.close()


def test_replica_killed_mid_generation(ray_body, smol_dir, reference):
    """Kill the replica that holds the session after a few tokens: the next step (HTTP POST) names a replica
    that is gone, so the router sends it to the live one, which knows no such session (unknown_session); the
    client opens a session there and replays, and the answer is the same. (Over a WebSocket the connection
    drops instead, and the client reopens the same way; tests/test_recovery.py covers that.) Last in the
    module: Serve's replacement replica may still be loading at teardown."""
    ray_body.wait_replicas()
    events: list[str] = []
    client = _client(smol_dir, ray_body.url, "http", retry=Retry(attempts=8, base_s=0.2, cap_s=2.0),
                     on_event=events.append)
    stats, out, killed = GenerationStats(), [], []
    ids = client.encode_prompt(PROMPTS[0])
    for token in client.generate_ids(ids, max_new_tokens=TOKENS, stop_at_eos=False, stats=stats):
        out.append(token)
        if len(out) == 2:
            first = stats.body.opened.session_id
            killed.append(ray_body.kill_replica(first))
    assert out == reference[PROMPTS[0]]
    assert stats.recoveries == 1, events
    assert any("replaying" in e for e in events), events
    assert ray_body.replica_of(stats.body.opened.session_id) != killed[0]
    assert killed[0] not in ray_body.replica_ids()
    assert any("unknown_session" in e for e in events), events
