"""The split over a real body server gives the unsplit model's greedy tokens, and the wire carries
what the design says: the prompt's states once, then one 1 x D vector per step each way."""

from __future__ import annotations

import pytest
import torch
from helpers import Driver, hf_greedy

from lambdasplit.client.generate import GenerationStats, SplitClient
from lambdasplit.client.transport import BodyConnection
from lambdasplit.models.llm import load_split
from lambdasplit.server.process import ServerProcess
from lambdasplit.wire.frame import decode_frame
from lambdasplit.wire.protocol import SessionRequest

D = 576
N_NEW = 16
PROMPTS = [
    "What is the capital of France?",
    "What is the difference between AI, ML and DL?",
    "Write a short poem about the sea.",
]
SPLITS = [(0, 30), (1, 29), (8, 22), (30, 30), (0, 0)]

_clients: dict = {}


def client_for(folder, url, split, **kw) -> SplitClient:
    kw.setdefault("wire", "fp32")  # exactness needs the lossless wire, whatever the default is
    kw.setdefault("speculate", "off")  # one position per step, as the traffic checks count (drafts: test_speculative)
    key = (url, split, tuple(sorted(kw.items())))
    if key not in _clients:
        _clients[key] = SplitClient(folder, server=url, split=split, **kw)
    return _clients[key]


@pytest.fixture(scope="module")
def refs(smol_dir, hf_model, full_server):
    """Prompt ids (chat template) and the unsplit model's greedy continuation of each."""
    encoder = client_for(smol_dir, full_server.url, (1, 29))
    out = []
    for prompt in PROMPTS:
        ids = encoder.encode_prompt(prompt)
        out.append((prompt, ids, hf_greedy(hf_model, ids, N_NEW)))
    return out


def test_reference_agrees_with_hf_generate(refs, hf_model):
    """The greedy reference is what transformers' own generate(do_sample=False) gives (until EOS)."""
    for _, ids, ref in refs[:2]:
        x = torch.tensor([ids])
        with torch.inference_mode():
            gen = hf_model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                    max_new_tokens=N_NEW)[0, len(ids):].tolist()
        assert gen == ref[:len(gen)] and len(gen) >= 4


@pytest.mark.parametrize("split", SPLITS, ids=[f"{x}:{y}" for x, y in SPLITS])
def test_greedy_tokens_equal_unsplit_model_over_websocket(smol_dir, full_server, refs, split):
    client = client_for(smol_dir, full_server.url, split)
    assert (client.split.x, client.split.y) == split
    for prompt, ids, ref in refs:
        assert client.encode_prompt(prompt) == ids
        result = client.generate(prompt, max_new_tokens=N_NEW, stop_at_eos=False)
        assert result.token_ids == ref, f"split {split}, prompt {prompt!r}"
        assert result.stats.new_tokens == N_NEW and result.stats.prompt_tokens == len(ids)
        assert result.stats.traffic.steps == N_NEW


def test_http_transport_gives_the_same_tokens(smol_dir, full_server, refs):
    client = client_for(smol_dir, full_server.url, (8, 22), transport="http")
    for prompt, ids, ref in refs:
        assert client.generate(prompt, max_new_tokens=N_NEW, stop_at_eos=False).token_ids == ref


def test_without_cache_gives_the_same_tokens(smol_dir, full_server, refs):
    client = client_for(smol_dir, full_server.url, (1, 29), cache=False)
    prompt, ids, ref = refs[0]
    n = 10
    result = client.generate(prompt, max_new_tokens=n, stop_at_eos=False)
    assert result.token_ids == ref[:n]


def test_in_process_body_gives_the_same_tokens(smol_dir, refs):
    client = SplitClient(smol_dir, server=None, split=(1, 29))
    assert client.model.body is not None
    prompt, ids, ref = refs[1]
    result = client.generate(prompt, max_new_tokens=N_NEW, stop_at_eos=False)
    assert result.token_ids == ref and result.stats.traffic is None


def test_empty_prompt_is_refused(smol_dir, full_server):
    client = client_for(smol_dir, full_server.url, (1, 29))
    with pytest.raises(ValueError, match="empty"):
        list(client.generate_ids([], max_new_tokens=2))


def test_stream_pieces_make_the_text(smol_dir, full_server, refs, tokenizer):
    client = client_for(smol_dir, full_server.url, (1, 29))
    prompt, ids, ref = refs[0]
    stats = GenerationStats()
    text = "".join(client.stream(prompt, stats=stats, max_new_tokens=N_NEW, stop_at_eos=False))
    assert text == tokenizer.decode(ref, skip_special_tokens=True)
    assert stats.new_tokens == N_NEW


def test_stops_at_eos(smol_dir, full_server, refs, tokenizer):
    prompt, ids, ref = refs[0]
    eos = tokenizer.eos_token_id
    if eos not in ref:
        pytest.skip("the reference continuation has no EOS within the first tokens")
    client = client_for(smol_dir, full_server.url, (1, 29))
    result = client.generate(prompt, max_new_tokens=N_NEW)
    assert result.token_ids == ref[:ref.index(eos) + 1]


def test_seeded_sampling_is_the_same_remote_and_local(smol_dir, full_server, refs):
    prompt = refs[2][0]
    remote = client_for(smol_dir, full_server.url, (1, 29))
    local = SplitClient(smol_dir, server=None, split=(1, 29))
    opts = dict(max_new_tokens=12, temperature=0.9, top_k=40, top_p=0.95, seed=7, stop_at_eos=False)
    a = remote.generate(prompt, **opts).token_ids
    assert a == remote.generate(prompt, **opts).token_ids  # reproducible
    assert a == local.generate(prompt, **opts).token_ids  # the wire changes nothing


def test_interleaved_sessions_stay_independent(smol_dir, full_server, refs):
    """Two sessions on one server, stepped alternately, each get their own correct continuation."""
    model = load_split(smol_dir, 2, 27, parts=("head", "tail"))
    fp = model.body_fingerprint()
    drivers = []
    for (_, ids, ref), transport in zip(refs[:2], ("ws", "http")):
        conn = BodyConnection(full_server.url, transport=transport)
        drivers.append((Driver(model, conn, SessionRequest(model_fingerprint=fp, x=2, y=27)), ids, ref, []))
    try:
        pending = [None, None]
        for step in range(10):
            for i, (driver, ids, ref, got) in enumerate(drivers):
                token = driver.advance(ids if step == 0 else [pending[i]])
                got.append(token)
                pending[i] = token
        for driver, ids, ref, got in drivers:
            assert got == ref[:10]
    finally:
        for driver, *_ in drivers:
            driver.conn.close()


# ---- what the wire carries ------------------------------------------------------------------

def test_cached_steps_carry_one_vector_each_way(smol_dir, full_server, refs):
    prompt, ids, ref = refs[1]
    model = load_split(smol_dir, 1, 29, parts=("head", "tail"))
    request = SessionRequest(model_fingerprint=model.body_fingerprint(), x=1, y=29)
    with BodyConnection(full_server.url) as conn:
        driver = Driver(model, conn, request)
        assert driver.opened.hidden_size == D and driver.opened.x == 1 and driver.opened.y == 29
        tokens = [driver.advance(ids)]
        for _ in range(N_NEW - 1):
            tokens.append(driver.advance([tokens[-1]]))
        traffic = conn.measured()
    assert tokens == ref

    first = decode_frame(driver.up_frames[0])
    assert tuple(first.tensor.shape) == (len(ids), D) and first.pos == 0 and first.step == 0
    header_sizes = {len(driver.up_frames[0]) - len(ids) * D * 4}
    for i, frame in enumerate(driver.up_frames[1:], start=1):
        f = decode_frame(frame)
        assert tuple(f.tensor.shape) == (1, D), f"step {i} sent {list(f.tensor.shape)}"
        assert f.pos == len(ids) + i - 1 and f.step == i
        header_sizes.add(len(frame) - D * 4)
    assert max(header_sizes) < 100  # the rest of each frame is the 1 x 576 float32 payload
    assert traffic.steps == N_NEW
    assert traffic.frame_up == sum(len(f) for f in driver.up_frames)
    payload_down = (len(ids) + N_NEW - 1) * D * 4  # the same shapes come back (the Driver checks each reply)
    assert payload_down < traffic.frame_down < payload_down + N_NEW * 100  # and each header stays small
    assert traffic.socket_up >= traffic.frame_up > 0
    assert traffic.socket_down >= traffic.frame_down > 0


@pytest.mark.parametrize("transport", ["ws", "http"])
def test_traffic_accounting_with_cache(smol_dir, full_server, refs, transport):
    prompt, ids, ref = refs[0]
    client = client_for(smol_dir, full_server.url, (1, 29), transport=transport)
    result = client.generate(prompt, max_new_tokens=N_NEW, stop_at_eos=False)
    t = result.stats.traffic
    assert t.counted_at_socket
    rows = len(ids) + N_NEW - 1  # the prompt once, then one row per step
    assert rows * D * 4 <= t.frame_up <= rows * D * 4 + N_NEW * 100
    assert rows * D * 4 <= t.frame_down <= rows * D * 4 + N_NEW * 100
    assert t.socket_up >= t.frame_up and t.socket_down >= t.frame_down
    # headers are an overhead, not a multiple: WebSocket adds a few bytes a step, HTTP a few hundred
    assert t.socket_up <= t.frame_up + N_NEW * 600 + 2000
    assert result.stats.first_frame_up[:4] == b"LSPL"
    assert decode_frame(result.stats.first_frame_up).tensor.shape == (len(ids), D)


def test_traffic_grows_without_cache(smol_dir, full_server, refs):
    prompt, ids, ref = refs[0]
    n = 8
    cached = client_for(smol_dir, full_server.url, (1, 29)).generate(prompt, max_new_tokens=n, stop_at_eos=False)
    uncached = client_for(smol_dir, full_server.url, (1, 29), cache=False).generate(
        prompt, max_new_tokens=n, stop_at_eos=False)
    assert uncached.token_ids == cached.token_ids == ref[:n]
    t = uncached.stats.traffic
    resent = sum(len(ids) + i for i in range(n)) * D * 4  # the whole sequence, every step
    assert resent <= t.frame_up <= resent + n * 100
    assert t.frame_up > 3 * cached.stats.traffic.frame_up


def test_fp16_wire_halves_the_bytes_and_keeps_the_text(smol_dir, full_server, refs, tokenizer):
    prompt, ids, ref = refs[1]
    fp16 = client_for(smol_dir, full_server.url, (1, 29), wire="fp16").generate(
        prompt, max_new_tokens=N_NEW, stop_at_eos=False)
    prefix = 0
    while prefix < N_NEW and fp16.token_ids[prefix] == ref[prefix]:
        prefix += 1
    assert prefix >= 6, (fp16.token_ids, ref)
    rows = len(ids) + N_NEW - 1
    t = fp16.stats.traffic
    assert rows * D * 2 <= t.frame_up <= rows * D * 2 + N_NEW * 100
    assert rows * D * 2 <= t.frame_down <= rows * D * 2 + N_NEW * 100
    assert decode_frame(fp16.stats.first_frame_up).codec == "fp16"


@pytest.mark.parametrize("wire", [("fp16", "fp32"), ("bf16", "bf16")])
def test_other_wire_formats(smol_dir, full_server, refs, wire):
    prompt, ids, ref = refs[0]
    result = client_for(smol_dir, full_server.url, (1, 29), wire=wire).generate(
        prompt, max_new_tokens=8, stop_at_eos=False)
    assert result.token_ids[:3] == ref[:3]
    t = result.stats.traffic
    rows = len(ids) + 7
    up_size, down_size = ({"fp16": 2, "bf16": 2, "fp32": 4}[c] for c in wire)
    assert rows * D * up_size <= t.frame_up <= rows * D * up_size + 8 * 100
    assert rows * D * down_size <= t.frame_down <= rows * D * down_size + 8 * 100


# ---- a server holding only part of the model ------------------------------------------------

@pytest.fixture(scope="module")
def middle_server(smol_dir):
    with ServerProcess(str(smol_dir), "4:26") as server:
        yield server


def test_body_server_holds_only_its_layers(smol_dir, middle_server):
    with BodyConnection(middle_server.url, transport="http") as conn:
        info = conn.info()
    assert (info.x, info.y, info.num_layers, info.hidden_size) == (4, 26, 30, D)
    assert info.holds == [f"model.layers.{i}" for i in range(4, 26)]
    for never in ("model.embed_tokens", "model.norm", "lm_head"):
        assert not any(h.startswith(never) for h in info.holds)
    body = load_split(smol_dir, 4, 26, parts=("body",)).parameter_report()["body"]
    assert info.parameters == body["params"] and info.parameter_bytes == body["bytes"]
    full = load_split(smol_dir, 0, 30, parts=("body",)).parameter_report()["body"]
    assert info.parameters == full["params"] * 22 // 30  # 22 identical layers of 30
    assert info.rss_bytes > 0 and info.sessions == 0
    assert set(info.codecs) >= {"fp32", "fp16", "bf16"}


def test_partial_server_generates_correctly(smol_dir, middle_server, refs):
    prompt, ids, ref = refs[0]
    client = SplitClient(smol_dir, server=middle_server.url, wire="fp32")  # split taken from the server
    assert (client.split.x, client.split.y) == (4, 26)
    assert client.generate(prompt, max_new_tokens=8, stop_at_eos=False).token_ids == ref[:8]
    inner = client_for(smol_dir, middle_server.url, (10, 12))  # any sub-range of what it holds
    assert inner.generate(prompt, max_new_tokens=8, stop_at_eos=False).token_ids == ref[:8]


def test_no_session_left_behind(full_server):
    """Every generation above closed its session: the server holds none (and is still healthy)."""
    with BodyConnection(full_server.url, transport="http") as conn:
        info = conn.info()
    assert info.sessions == 0
    assert full_server.proc.poll() is None
