"""Attacks on the body server's compute and memory, against a real server process.

- A PrivateLoRA device that stalls mid-step (never answers the server's adapter question) or answers slowly
  (every 2.5 s) must not hold up anyone else: its step waits on a thread of its own, not on the shared compute
  thread, and a device that does not answer within --exchange-timeout loses its step with a clear error.
- Training sessions keep a forward step's graph until its gradient comes back: they reserve it against the
  memory budget, are refused with 503 + Retry-After when it is full, cannot step more rows than they reserved,
  and give it back as soon as their WebSocket closes.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from attack_helpers import MB, RssWatch
from helpers import hidden_frame, http_call

from lambdasplit.client.generate import SplitClient
from lambdasplit.client.transport import BodyConnection, BodyError
from lambdasplit.models.privatelora import PrivateLoraSpec
from lambdasplit.server.process import ServerProcess
from lambdasplit.wire.frame import Frame, decode_frame, encode_frame
from lambdasplit.wire.protocol import SessionRequest, WireFormat

EXCHANGE_TIMEOUT = 8.0  # seconds the server gives a device to answer its adapter question (> the victim's run)
BUDGET_MB = 64
TOKENS = 24
FP32 = WireFormat(up="fp32", down="fp32")


@pytest.fixture(scope="module")
def server(smol_dir):
    with ServerProcess(str(smol_dir), "1:29", "--exchange-timeout", str(EXCHANGE_TIMEOUT),
                       "--kv-budget-mb", str(BUDGET_MB)) as process:
        yield process
        assert process.proc.poll() is None, "the server died:\n" + "\n".join(process.log)


@pytest.fixture(scope="module")
def victim(server, smol_dir):
    return SplitClient(smol_dir, server=server.url, split=(1, 29), wire="fp32", speculate="off")


def _info(url: str):
    with BodyConnection(url, transport="http") as conn:
        return conn.info()


class LoraDevice:
    """A PrivateLoRA device that sends one step, then answers the server's adapter questions every `every`
    seconds (None: never). `asked` is set at the first question; `final` is what ended its step."""

    def __init__(self, url: str, fingerprint: str, every: float | None):
        self.every, self.answered, self.final = every, 0, None
        self.asked, self.stop = threading.Event(), threading.Event()
        self.asked_at = self.ended_at = 0.0
        self.conn = BodyConnection(url, transport="ws", timeout=60)
        spec = PrivateLoraSpec(rank=4, targets=("q_proj", "v_proj"), seed=3)
        self.conn.open_session(SessionRequest(model_fingerprint=fingerprint, x=1, y=29, wire=FP32, max_positions=64,
                                              private_lora=spec.request()))
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.asked.wait(30), "the server never asked the device for its adapters"

    def _run(self) -> None:
        self.conn._ws_send(hidden_frame(4, 576, step=0, pos=0))
        while True:
            try:
                frame = decode_frame(self.conn._ws_receive())
            except BodyError as exc:
                self.final = exc
                break
            if frame.kind != "lora":
                self.final = frame
                break
            if not self.asked.is_set():
                self.asked_at = time.monotonic()
                self.asked.set()
            if self.every is None or self.stop.wait(self.every):
                continue  # a stalled device: it reads on, and never answers
            answer = Frame("lora", step=frame.step, pos=0, tensor=torch.zeros(frame.tensor.shape), codec="fp32")
            self.conn._ws_send(encode_frame(answer))
            self.answered += 1
        self.ended_at = time.monotonic()

    def close(self) -> None:
        self.stop.set()
        self.conn.close()
        self.thread.join(10)


def _generate(client: SplitClient, prompt: list[int]) -> float:
    started = time.perf_counter()
    assert len(list(client.generate_ids(prompt, max_new_tokens=TOKENS, stop_at_eos=False))) == TOKENS
    return time.perf_counter() - started


@pytest.mark.slow
def test_a_stalled_or_slow_privatelora_device_holds_up_no_one_else(server, victim):
    prompt = victim.encode_prompt("Write a few lines about a vegetable garden in spring.")
    _generate(victim, prompt)  # warm up
    solo = (_generate(victim, prompt) + _generate(victim, prompt)) / 2
    fingerprint = victim.model.body_fingerprint()
    stalled = LoraDevice(server.url, fingerprint, every=None)
    slow = None
    try:
        with_stalled = _generate(victim, prompt)  # the stalled step is waiting for its device meanwhile
        assert stalled.final is None, "the stalled step ended before the victim's generation did"
        slow = LoraDevice(server.url, fingerprint, every=2.5)
        with_slow = _generate(victim, prompt)
        print(f"\nvictim, {TOKENS} tokens: solo {solo:.2f} s, with a stalled PrivateLoRA device {with_stalled:.2f} s, "
              f"with a slow one {with_slow:.2f} s")
        assert with_stalled < 1.5 * solo and with_slow < 1.5 * solo, (solo, with_stalled, with_slow)

        stalled.thread.join(EXCHANGE_TIMEOUT + 10)  # the stalled step fails once the exchange timeout passes
        assert isinstance(stalled.final, Frame) and stalled.final.kind == "error", stalled.final
        assert stalled.final.code == "exchange_timeout" and "did not answer" in stalled.final.message
        assert "session is closed" in stalled.final.message
        waited = stalled.ended_at - stalled.asked_at
        assert EXCHANGE_TIMEOUT - 0.5 < waited < EXCHANGE_TIMEOUT + 3, waited
        with pytest.raises(BodyError) as exc:  # its session is gone, and the server closed its WebSocket
            stalled.conn._ws_receive()
        assert exc.value.code == "disconnected"

        assert slow.answered >= 1 and slow.final is None  # the slow device is still in its (long) step
    finally:
        stalled.close()
        if slow is not None:
            slow.close()
    deadline = time.monotonic() + 10
    while _info(server.url).sessions and time.monotonic() < deadline:  # both sessions freed with their sockets
        time.sleep(0.1)
    assert _info(server.url).sessions == 0
    assert http_call(server.url, "GET", "/healthz")[0] == 200


def _training(fingerprint: str, rows: int | None) -> dict:
    return SessionRequest(model_fingerprint=fingerprint, x=1, y=29, wire=FP32, cache=False, train=True,
                          max_positions=rows).model_dump()


def test_training_sessions_reserve_their_graph_and_free_it_on_disconnect(server, victim):
    fingerprint = victim.model.body_fingerprint()
    assert _info(server.url).kv_reserved_bytes == 0
    # a session of the server's default rows (512) needs more than the whole budget
    status, body, _ = http_call(server.url, "POST", "/v1/sessions", json.dumps(_training(fingerprint, None)).encode())
    assert status == 413 and "fewer positions" in body["message"], body

    rows = 32
    first = BodyConnection(server.url, transport="ws")
    opened = first.open_session(SessionRequest(**_training(fingerprint, rows)))
    assert opened.max_positions == rows
    info = _info(server.url)
    reserved = info.kv_reserved_bytes
    print(f"\ntraining session of {rows} rows over layers [1, 29): {reserved / MB:.1f} MiB reserved "
          f"({reserved / rows / MB:.2f} MiB per row)")
    assert 0.8 * MB * rows < reserved < 2 * MB * rows and info.sessions == 1

    # the budget (64 MiB) has no room for a second one: 503 with Retry-After, as for KV sessions
    status, body, headers = http_call(server.url, "POST", "/v1/sessions",
                                      json.dumps(_training(fingerprint, rows)).encode())
    assert status == 503 and body["error"] == "busy" and int(headers["retry-after"]) >= 1, body
    assert "training graphs" in body["message"]

    with pytest.raises(BodyError) as exc:  # no more rows than it reserved
        first.step(hidden_frame(rows + 1, 576, step=0, pos=0))
    assert exc.value.code == "too_long"
    with RssWatch(server.proc.pid) as watch:  # the graph it now holds fits in what it reserved
        out = first.step(hidden_frame(rows, 576, step=0, pos=0))
    assert out.tensor.shape == (rows, 576)
    print(f"RSS after a {rows}-row forward step: +{watch.growth / MB:.1f} MiB")
    assert watch.growth < 1.2 * reserved  # give or take the allocator's rounding

    first._ws.close()  # the device goes away without closing its session: the server frees it all the same
    deadline = time.monotonic() + 5
    while _info(server.url).kv_reserved_bytes and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _info(server.url).kv_reserved_bytes == 0 and _info(server.url).sessions == 0
    first._ws = None
    first.close()

    second = BodyConnection(server.url, transport="ws")  # and the room is there again
    try:
        second.open_session(SessionRequest(**_training(fingerprint, rows)))
        assert _info(server.url).kv_reserved_bytes == reserved
    finally:
        second.close()
    assert _info(server.url).kv_reserved_bytes == 0
