"""Speculative decoding across the split: drafts, verification, the draft length, the body's rollback,
and the promise that matters: greedy output identical to plain decoding, sampling that keeps the
target distribution, over the real server."""

from __future__ import annotations

import math

import pytest
import torch

from lambdasplit.client.drafts import EarlyExitDraft, NgramDraft
from lambdasplit.client.generate import GenerationStats, SplitClient
from lambdasplit.client.sampling import Sampler, SamplingParams
from lambdasplit.client.speculative import DraftLength, Speculator, expected_tokens, verify
from lambdasplit.client.transport import BodyConnection, BodyError
from lambdasplit.models.llm import load_split
from lambdasplit.wire.frame import Frame, encode_frame
from lambdasplit.wire.protocol import SessionRequest

D = 576
LIST_PROMPT = "List the days of the week, one per line, each with its number."
PROMPTS = ["What is the difference between AI, ML and DL?", LIST_PROMPT,
           "Write a Python function that returns the squares of the numbers 1 to 10."]


# ---- drafts -------------------------------------------------------------------------------------------
def test_ngram_draft_continues_the_latest_earlier_occurrence():
    draft = NgramDraft(max_n=3, min_n=1)
    ids = [5, 6, 7, 8, 9, 1, 2, 6, 7, 3, 4, 6, 7]
    assert draft.propose(ids, 2) == [3, 4]  # "6 7" last occurred before "3 4", not before "8 9"
    assert draft.propose([*ids, 3], 5) == [4, 6, 7, 3]  # grown context: "6 7 3" -> what followed it
    assert draft.propose([*ids, 3], 0) == []
    assert NgramDraft(min_n=2).propose([1, 2, 3, 4], 4) == []  # nothing repeats: no proposal
    assert NgramDraft(min_n=2).propose([1, 2, 1, 2], 3) == [1, 2]  # may run into the context's own end
    with pytest.raises(ValueError):
        NgramDraft(max_n=1, min_n=2)


def test_ngram_draft_starts_over_on_a_shorter_context():
    draft = NgramDraft(max_n=2, min_n=2)
    assert draft.propose([1, 2, 3, 1, 2], 1) == [3]
    assert draft.propose([7, 8, 7, 8], 2) == [7, 8]  # a new, shorter context: no stale entries
    assert draft.propose([7, 8, 9], 2) == []


def test_early_exit_draft_is_the_skip_path_greedy(smol_dir):
    model = load_split(smol_dir, 2, 28, parts=("head", "tail"))
    draft = EarlyExitDraft(model)
    ids = [1, 504, 3458, 282, 4649, 314]
    got = draft.propose(ids, 3)
    with torch.inference_mode():  # the reference: tail(head(.)) over the whole sequence, no cache
        seq, want = list(ids), []
        for _ in range(3):
            logits = model.tail(model.head(torch.tensor([seq]), None, 0), None, 0)[0, -1]
            want.append(int(torch.argmax(logits)))
            seq.append(want[-1])
    assert got == want
    assert draft.length == len(ids)  # rolled back to the committed tokens after drafting
    assert draft.propose([*ids, got[0]], 2) == want[1:3]  # caught up incrementally: the same guesses


# ---- verification ------------------------------------------------------------------------------------
def test_greedy_verification_accepts_while_drafts_are_the_argmax():
    logits = torch.full((4, 10), -5.0)
    for row, best in enumerate([3, 7, 2, 9]):
        logits[row, best] = 5.0
    greedy = Sampler(SamplingParams())
    assert verify(logits, [3, 7, 2], greedy) == (3, 9)  # all accepted, and the bonus token after them
    assert verify(logits, [3, 1, 2], greedy) == (1, 7)  # the second is wrong: corrected, the rest dropped
    assert verify(logits[:1], [], greedy) == (0, 3)
    with pytest.raises(ValueError):
        verify(logits, [3], greedy)


def _chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's test that counts come from probs (classes with expected >= 5; the rest pooled)."""
    n = counts.sum().item()
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big].float(), counts[~big].sum().float().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    stat = (((obs - exp) ** 2)[keep] / exp[keep]).sum().item()
    dof = int(keep.sum()) - 1
    # Wilson-Hilferty: the chi-square tail through a normal one (no scipy needed)
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, seed=1),
                                    SamplingParams(temperature=0.7, top_k=5, seed=2),
                                    SamplingParams(temperature=1.3, top_p=0.8, seed=3)],
                         ids=["t1", "t0.7-topk5", "t1.3-topp0.8"])
@pytest.mark.parametrize("draft", [0, 4, 9], ids=["likely-draft", "middling-draft", "unlikely-draft"])
def test_rejection_sampling_keeps_the_target_distribution(params, draft):
    """Whatever the draft, the token verification yields is distributed as the sampler's own p."""
    logits = torch.tensor([2.0, 1.5, 1.2, 1.0, 0.8, 0.5, 0.1, -0.5, -1.0, -3.0])
    sampler = Sampler(params)
    p = sampler.probs(logits)
    counts = torch.zeros(10)
    first = torch.zeros(10)
    second = logits.roll(3)  # the next row: what follows the draft, if accepted
    for _ in range(6000):
        n, token = verify(torch.stack([logits, second]), [draft], sampler)
        counts[draft if n == 1 else token] += 1
        first[token if n == 0 else draft] += 1
    assert counts.equal(first)
    assert _chi_square_p(counts, p) > 1e-3, (counts, p * 6000)
    assert counts[p == 0].sum() == 0  # never a token the filters removed


def test_the_chi_square_check_can_fail():
    """The statistical check above rejects a wrong distribution (so its passing means something)."""
    p = torch.tensor([0.5, 0.3, 0.2])
    wrong = torch.tensor([2200.0, 1800.0, 2000.0])
    assert _chi_square_p(wrong, p) < 1e-6
    assert _chi_square_p(torch.tensor([3010.0, 1790.0, 1200.0]), p) > 1e-3


# ---- the draft length -----------------------------------------------------------------------------------
def test_expected_tokens():
    assert expected_tokens(0.0, 5) == 1
    assert expected_tokens(1.0, 5) == 6
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)


def test_draft_length_follows_acceptance_and_round_time():
    slow_link = DraftLength(max_k=8)
    for k in (1, 3, 5, 2, 6, 0):  # 100 ms round trips, 1 ms per extra row, most drafts accepted
        slow_link.record(k, k - (k > 3), k + 1, 0.1 + 0.001 * k)
    assert slow_link.acceptance > 0.7
    assert slow_link.round_s(1) == pytest.approx(0.1)
    assert slow_link.round_s(5) == pytest.approx(0.104)  # between 4 and 6 rows, seen
    assert slow_link.round_s(9) > slow_link.round_s(7)  # beyond what was seen: a little more per row
    assert slow_link.choose() >= 5
    assert slow_link.choose(limit=2) == 2

    useless = DraftLength(max_k=8, explore_every=1000)  # no round trip to hide, rows cost, drafts never match
    for k in (1, 2, 3, 1, 2, 4, 1, 0, 2):
        useless.record(k, 0, k + 1, 0.01 + 0.004 * k)
    assert useless.acceptance < 0.15
    assert useless.choose() == 0

    cpu = DraftLength(max_k=8)  # one row is cheap, two cost much more (a CPU's GEMV vs GEMM), then flat
    for rows, seconds in ((1, 0.06), (2, 0.09), (9, 0.1)):
        cpu.record(rows - 1, 0, rows, seconds)
    cpu.accepted, cpu.rejected = 1.0, 1.0  # half the drafts accepted
    assert cpu.choose() > 2  # one draft would not pay for the jump; several do

    explorer = DraftLength(max_k=8, explore_every=2)
    explorer.accepted, explorer.rejected = 0.0, 50.0
    explorer.record(1, 0, 2, 0.02)
    explorer.record(0, 0, 1, 0.01)
    assert [explorer.choose() for _ in range(4)] == [0, 1, 0, 1]  # a cheap look now and then


# ---- the body's rollback, frame by frame ----------------------------------------------------------------
@pytest.fixture(scope="module")
def body_parts(smol_dir):
    return load_split(smol_dir, 1, 29, parts=("head", "body", "tail"))


def _request(model, cache=True) -> SessionRequest:
    return SessionRequest(model_fingerprint=model.body_fingerprint(), x=1, y=29, cache=cache)


def _step(conn, step, pos, tensor, rollback=None):
    extra = {} if rollback is None else {"rollback": rollback}
    return conn.step(encode_frame(Frame("hidden", step=step, pos=pos, tensor=tensor, extra=extra)))


def test_rollback_forgets_positions_like_a_fresh_session(body_parts, full_server):
    torch.manual_seed(0)
    states = torch.randn(9, D)
    with BodyConnection(full_server.url) as conn, BodyConnection(full_server.url) as fresh:
        assert conn.open_session(_request(body_parts)).rollback  # the server says it takes rollbacks
        fresh.open_session(_request(body_parts))
        _step(conn, 0, 0, states[:5])
        _step(conn, 1, 5, states[5:8])  # three "drafts" at 5..7
        again = _step(conn, 2, 6, states[8:9], rollback=True)  # keep 6 positions, then a new row at 6
        _step(fresh, 0, 0, states[:6])
        want = _step(fresh, 1, 6, states[8:9])
        # position 5's keys came from a 3-row pass here and a 6-row pass there: the sums run in another order
        # (seen: 1.5e-4 apart on one of 576 values); a rollback that kept a draft would be off by O(1)
        torch.testing.assert_close(again.tensor, want.tensor, rtol=1e-3, atol=1e-3)
        nothing_dropped = _step(conn, 3, 7, states[:1], rollback=True)  # to the end itself: a plain step
        assert nothing_dropped.pos == 7
        follow = _step(conn, 4, 8, states[1:2])  # and the session goes on from there
        assert follow.pos == 8


def test_bad_rollbacks_get_clear_errors_and_the_session_survives(body_parts, full_server):
    states = torch.randn(4, D)
    with BodyConnection(full_server.url) as conn:
        conn.open_session(_request(body_parts))
        _step(conn, 0, 0, states[:3])
        with pytest.raises(BodyError, match="bad_rollback.*cache holds only 3"):
            _step(conn, 1, 5, states[3:4], rollback=True)  # "back" beyond the cache
        with pytest.raises(BodyError, match="bad_pos.*expected position 3"):
            _step(conn, 1, 1, states[3:4])  # an earlier position without saying it is a rollback
        with pytest.raises(BodyError, match="bad_rollback.*true or false"):
            _step(conn, 1, 1, states[3:4], rollback="yes")
        with pytest.raises(BodyError, match="malformed.*'pos'"):  # past the start: refused before any check
            conn.step(_negative_pos_frame(states[3:4]))
        ok = _step(conn, 1, 1, states[3:4], rollback=True)  # a good rollback still works after all that
        assert ok.pos == 1 and tuple(ok.tensor.shape) == (1, D)
    with BodyConnection(full_server.url) as conn:
        assert not conn.open_session(_request(body_parts, cache=False)).rollback
        with pytest.raises(BodyError, match="bad_rollback.*no KV cache"):
            _step(conn, 0, 0, states[:2], rollback=True)


def _negative_pos_frame(tensor) -> bytes:
    import zlib

    import msgpack

    from lambdasplit.wire.frame import _PREFIX, MAGIC, VERSION

    payload = tensor.numpy().astype("<f4").tobytes()
    header = msgpack.packb({"kind": "hidden", "step": 1, "pos": -2, "shape": list(tensor.shape), "codec": "fp32",
                            "nbytes": len(payload), "crc": zlib.crc32(payload), "extra": {"rollback": True}})
    return _PREFIX.pack(MAGIC, VERSION, len(header)) + header + payload


# ---- end to end over the real server --------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(smol_dir, full_server):
    return SplitClient(smol_dir, server=full_server.url, split=(1, 29), wire="fp32")


def _generate(client, prompt, n, **kw):
    stats = GenerationStats()
    ids = client.encode_prompt(prompt)
    tokens = list(client.generate_ids(ids, max_new_tokens=n, stop_at_eos=False, stats=stats, **kw))
    return tokens, stats


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ngram", "self"])
def test_greedy_speculation_is_token_for_token_plain_greedy(client, mode):
    drafted = accepted = 0
    for prompt in PROMPTS:
        plain, plain_stats = _generate(client, prompt, 40, speculate="off")
        fast, stats = _generate(client, prompt, 40, speculate=mode)
        assert fast == plain, prompt
        assert plain_stats.decode_rounds == 39 and plain_stats.speculation.rounds == 0
        drafted += stats.speculation.drafted
        accepted += stats.speculation.accepted
        assert stats.decode_rounds == stats.speculation.rounds <= 39
    assert drafted > accepted or mode == "ngram"  # the self draft is often wrong: rollbacks happened
    if mode == "ngram":
        assert accepted > 0  # the list repeats itself: drafts were accepted, fewer round trips


class _Oracle:
    """A draft source that knows the plain greedy answer and is right except at every third draft."""

    name = "oracle"

    def __init__(self, prompt_len, answer):
        self.prompt_len, self.answer = prompt_len, answer

    def propose(self, ids, k):
        done = len(ids) - self.prompt_len
        guess = self.answer[done:done + k]
        return [t if (done + i) % 3 else (t + 1) % 1000 for i, t in enumerate(guess)]


@pytest.mark.slow
def test_rollbacks_and_a_lost_server_keep_the_output(smol_dir, client):
    """Many rejected drafts (rollback on every round), through a server that dies mid-answer."""
    from lambdasplit.client.body import Retry
    from lambdasplit.server.process import ServerProcess

    ids = client.encode_prompt(PROMPTS[0])
    plain = list(client.generate_ids(ids, max_new_tokens=30, stop_at_eos=False, speculate="off"))
    with ServerProcess(str(smol_dir), "1:29") as doomed, ServerProcess(str(smol_dir), "1:29") as spare:
        other = SplitClient(smol_dir, server=[doomed.url, spare.url], split=(1, 29), wire="fp32",
                            retry=Retry(attempts=4, base_s=0.05))
        speculator = Speculator(_Oracle(len(ids), plain), DraftLength(max_k=4))
        stats = GenerationStats()
        out = []
        for token in other.generate_ids(ids, max_new_tokens=30, stop_at_eos=False, stats=stats,
                                        speculate=speculator):
            out.append(token)
            if len(out) == 12:
                doomed.stop()
    assert out == plain
    assert stats.recoveries == 1
    assert stats.speculation.drafted > stats.speculation.accepted > 0
    assert stats.decode_rounds < 29


@pytest.mark.slow
def test_speculative_sampling_keeps_the_distribution_over_the_server(client):
    """The second token (the first one speculation touches) follows the model's own distribution.

    The prompt makes the first token nearly certain; the draft is the model's second choice after
    it: accepted sometimes, rejected (and resampled without it) more often."""
    ids = client.tokenizer("The capital of France is")["input_ids"]
    full = load_split(client.folder, 30, 30, parts=("head", "tail"))  # the unsplit model, in-process
    sampling = SamplingParams(temperature=0.8, top_k=8)

    @torch.inference_mode()
    def logits_after(seq):
        return full.tail(full.head(torch.tensor([seq]), None, 0), None, 0)[0, -1]

    likely = int(torch.argmax(logits_after(ids)))
    p = Sampler(sampling).probs(logits_after([*ids, likely]))
    second = int(p.topk(2).indices[1])

    class SecondChoice:
        def propose(self, seq, k):
            return [second][:k]

    counts = torch.zeros(full.config.vocab_size)
    drafted = accepted = 0
    for i in range(100):
        speculator = Speculator(SecondChoice(), DraftLength(max_k=1))
        run = SamplingParams(temperature=sampling.temperature, top_k=sampling.top_k, seed=1000 + i)
        tokens = list(client.generate_ids(ids, max_new_tokens=3, stop_at_eos=False, sampling=run,
                                          speculate=speculator))
        if tokens[0] == likely:
            counts[tokens[1]] += 1
            drafted += speculator.stats.drafted
            accepted += speculator.stats.accepted
    assert counts.sum() >= 65
    assert drafted == counts.sum() and 0 < accepted < drafted  # both paths ran
    assert _chi_square_p(counts, p) > 1e-3, (counts.nonzero().flatten().tolist(), p.topk(5))


# ---- the bridge draft ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_bridge(smol_dir, tokenizer):
    """A bridge fitted on the shipped calibration prose only (seconds, not the full corpus's minute)."""
    from lambdasplit.client.bridge import fit_bridge
    from lambdasplit.models.calibrate import calibration_texts

    sequences = [tokenizer(t)["input_ids"][:128] for t in calibration_texts()[:12]]
    return fit_bridge(smol_dir, 1, 29, sequences=sequences, progress=False, log=lambda m: None)


def test_bridge_round_trips_through_its_file(small_bridge, tmp_path):
    from lambdasplit.client.bridge import Bridge, BridgeError

    path = small_bridge.save(tmp_path / "b.safetensors")
    again = Bridge.load(path)
    assert torch.equal(again.weight, small_bridge.weight) and torch.equal(again.vocab, small_bridge.vocab)
    assert (again.x, again.y, again.fingerprint) == (1, 29, small_bridge.fingerprint)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(BridgeError, match="cannot read the bridge"):
        Bridge.load(tmp_path / "junk.safetensors")


def test_bridge_guesses_the_body_better_than_skipping_it(smol_dir, small_bridge, tokenizer):
    """On held-out text, the tail's choice from the bridged guess agrees with its choice from the true body
    output far more often than its choice from the head's output (the plain early exit) does."""
    from lambdasplit.models.calibrate import shipped_text

    model = load_split(smol_dir, 1, 29, parts=("head", "body", "tail"))
    ids = tokenizer(shipped_text("heldout"))["input_ids"][:200]
    with torch.inference_mode():
        head = model.head(torch.tensor([ids]), None, 0)[0]
        body = model.body(head.unsqueeze(0), None, 0)[0]
        guess = small_bridge.predict(head[1:], body[:-1])
        choice = lambda states: model.tail(states.unsqueeze(0), None, 1, last_only=False)[0].argmax(-1)  # noqa: E731
        truth = choice(body[1:])
        bridged = (choice(guess) == truth).float().mean().item()
        skipped = (choice(head[1:]) == truth).float().mean().item()
    assert bridged > skipped + 0.05, (bridged, skipped)  # 8% against 0% with this small fit


@pytest.mark.slow
def test_bridge_drafts_keep_greedy_output_over_the_server(client, small_bridge):
    from lambdasplit.client.drafts import BridgeDraft

    for prompt in PROMPTS[:2]:
        plain, _ = _generate(client, prompt, 24, speculate="off")
        speculator = Speculator(BridgeDraft(client.model, small_bridge), DraftLength(max_k=3))
        fast, stats = _generate(client, prompt, 24, speculate=speculator)
        assert fast == plain, prompt
        assert stats.speculation.drafted > 0
    with pytest.raises(ValueError, match="spans layers"):
        BridgeDraft(load_split(client.folder, 2, 28, parts=("head", "tail")), small_bridge)


@pytest.mark.slow
def test_bench_speculative_writes_its_table(smol_dir, tmp_path):
    """The bench end to end, small: a real server behind the link proxy, plain and prompt lookup."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "lambdasplit", "bench", "speculative", "--model", str(smol_dir),
                          "--rtts", "2", "--prompts", "list", "--modes", "off,ngram", "--tokens", "12",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "speculative.json").read_text())["rows"]
    assert [(r["rtt_ms"], r["prompt"], r["mode"]) for r in rows] == [(2.0, "list", "off"), (2.0, "list", "ngram")]
    assert all(r["identical"] and r["tokens"] == 12 for r in rows)
    assert rows[0]["tokens_per_round_trip"] == 1.0 and rows[0]["speedup"] == 1.0
    assert (tmp_path / "speculative.md").read_text().startswith("| RTT | prompt |")
    assert (tmp_path / "speculative.png").stat().st_size > 1000
