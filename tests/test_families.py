"""Model families beyond the Llama layout (models/families/): each verified type, on a tiny random model of it
with its own features switched on (scaled embeddings, soft-capping, sliding windows shorter than the text,
learned positions, parallel blocks, partial rotary, experts), must give exactly the unsplit model's greedy
`generate` over 64 tokens through head -> body -> tail: with the KV cache, with speculative rollbacks and
with cross-session batching. End to end, a real body server serves three of them to real clients.
"""

from __future__ import annotations

import re
import shutil
import threading

import pytest
import torch
from helpers import metric
from transformers import AutoConfig, AutoModelForCausalLM

from lambdasplit.models.batch import batched_forward, can_batch
from lambdasplit.models.families import VERIFIED_TYPES
from lambdasplit.models.kvcache import ROLLBACK_SLACK, SlidingLayer, kv_cache_bytes, truncate_cache
from lambdasplit.models.llm import UnsupportedModelError, load_split

VOCAB, PROMPT, NEW, WINDOW = 128, 12, 64, 8
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
FAMILIES = {  # each family's features on, windows shorter than prompt + answer
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16, sliding_window=WINDOW, final_logit_softcapping=3.0, attn_logit_softcapping=5.0),
    "gemma3_text": dict(head_dim=16, sliding_window=WINDOW, sliding_window_pattern=2, final_logit_softcapping=3.0),
    "phi": dict(partial_rotary_factor=0.5),
    "gpt_neox": dict(rotary_pct=0.5, use_parallel_residual=True),
    "falcon": dict(new_decoder_architecture=True, num_kv_heads=2, parallel_attn=True),
    "falcon-alibi": dict(alibi=True, parallel_attn=True),
    "bloom": dict(n_head=4),
    "gpt2": dict(),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
}
SPLIT = (1, 3)


def test_every_family_named_is_verified():
    assert {name.split("-")[0] for name in FAMILIES} <= set(VERIFIED_TYPES)


def build(folder, name: str, seed: int = 0, **extra):
    """A tiny random model of the family `name` ('type' or 'type-variant'), saved to `folder`."""
    config = AutoConfig.for_model(name.split("-")[0], **{**SMALL, **FAMILIES.get(name, {}), **extra})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0: perturb them so a missing one shows
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny(request, tmp_path_factory):
    """(type, folder, unsplit model, prompt ids, the unsplit greedy answer of NEW tokens)."""
    folder = tmp_path_factory.mktemp(request.param)
    model = build(folder, request.param)
    ids = torch.randint(3, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        answer = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)[0, PROMPT:].tolist()
    assert len(answer) == NEW
    return request.param, folder, model, ids, answer


@pytest.fixture(scope="module")
def parts(tiny):
    return load_split(tiny[1], *SPLIT, parts=("head", "body", "tail"))


def step(sm, caches, rows: torch.Tensor, pos: int) -> torch.Tensor:
    """Rows of token ids (1, L) at pos -> logits (L, V), through head -> body -> tail with their caches."""
    hidden = sm.head(rows, caches[0], pos)
    hidden = sm.body(hidden, caches[1], pos)
    return sm.tail(hidden, caches[2], pos, last_only=False)[0]


@torch.inference_mode()
def test_split_greedy_equals_generate(tiny, parts):
    _, _, _, ids, answer = tiny
    caches = [p.layers.new_cache() for p in (parts.head, parts.body, parts.tail)]
    got, rows, pos = [], ids, 0
    for _ in range(NEW):
        token = int(step(parts, caches, rows, pos)[-1].argmax())
        pos += rows.shape[1]
        got.append(token)
        rows = torch.tensor([[token]])
    assert got == answer


@pytest.mark.slow
@torch.inference_mode()
def test_speculative_rollbacks_keep_the_greedy_answer(tiny, parts):
    """Rounds of k drafts (k from 1 to 6), every third draft wrong: each round rolls back the rejected
    positions in all three caches, across the sliding windows, and the answer stays the greedy one."""
    _, _, _, ids, answer = tiny
    caches = [p.layers.new_cache() for p in (parts.head, parts.body, parts.tail)]
    seq = ids[0].tolist()
    logits = step(parts, caches, ids, 0)
    seq.append(int(logits[-1].argmax()))
    rollbacks, k = 0, 1
    while len(seq) - PROMPT < NEW:
        done = len(seq) - PROMPT
        drafts = [t if (done + i) % 3 else (t + 1) % VOCAB for i, t in enumerate(answer[done:done + k])]
        pos = len(seq) - 1
        logits = step(parts, caches, torch.tensor([[seq[-1], *drafts]]), pos)
        accepted = 0
        while accepted < len(drafts) and int(logits[accepted].argmax()) == drafts[accepted]:
            accepted += 1
        seq += drafts[:accepted] + [int(logits[accepted].argmax())]
        if accepted < len(drafts):
            rollbacks += 1
            for cache in caches:
                truncate_cache(cache, pos + 1 + accepted)
        k = k % 6 + 1
    assert seq[PROMPT:PROMPT + NEW] == answer
    assert rollbacks > 5


@torch.inference_mode()
def test_batched_body_equals_one_session_at_a_time(tiny, parts):
    """Three sessions of different lengths (one far past the window), batched through the body for a prefill,
    decode steps and a speculative round, against each session run alone."""
    stack = parts.body.layers
    assert can_batch(stack, stack.start, stack.stop)
    lengths = (5, 12, 3 * WINDOW + 1)
    alone = [stack.new_cache() for _ in lengths]
    together = [stack.new_cache() for _ in lengths]
    gen = torch.Generator().manual_seed(2)
    pos = [0] * len(lengths)
    for rows in (lengths, (1, 1, 1), (4, 1, 2), (1, 1, 1)):
        hidden = [torch.randn(r, stack.config.hidden_size, generator=gen) for r in rows]
        want = [stack(h.unsqueeze(0), c, p)[0] for h, c, p in zip(hidden, alone, pos)]
        got = batched_forward(stack, list(zip(hidden, together, pos)))
        for w, g in zip(want, got):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
        pos = [p + r for p, r in zip(pos, rows)]
    for a, b in zip(alone, together):
        assert [layer.get_seq_length() for layer in a.layers] == [layer.get_seq_length() for layer in b.layers]


def test_sliding_layers_hold_their_window_and_the_rollback_slack(tmp_path):
    model = build(tmp_path, "gemma3_text")
    sm = load_split(tmp_path, 0, 4, parts=("body",))
    cache = sm.body.layers.new_cache()
    sliding = [layer for layer in cache.layers if isinstance(layer, SlidingLayer)]
    assert sliding and len(sliding) < len(cache.layers)  # the pattern alternates
    with torch.inference_mode():
        sm.body(torch.randn(1, 60, 64), cache, 0)
    held = WINDOW - 1 + ROLLBACK_SLACK
    assert {layer.held() for layer in sliding} == {held}
    assert {layer.get_seq_length() for layer in cache.layers} == {60}
    truncate_cache(cache, 60 - ROLLBACK_SLACK)  # as deep as the slack allows
    with pytest.raises(NotImplementedError, match="keeps only 16 positions beyond its window"):
        truncate_cache(cache, 20)
    # the server's budget counts what the layers hold: the sliding ones at most their window and slack
    full_layers = len(cache.layers) - len(sliding)
    per_position = 2 * model.config.num_key_value_heads * model.config.head_dim * 4
    assert kv_cache_bytes(model.config, 4, 0, 4, 1000) == per_position * (full_layers * 1000 + len(sliding) * held)


@pytest.mark.parametrize("model_type, overrides, reason", [
    ("granite", dict(), "multiplies embeddings"),
    ("cohere", dict(), "scales the logits"),
])
def test_unverified_families_are_refused_with_their_reason(tmp_path, model_type, overrides, reason):
    build(tmp_path, model_type, **overrides)
    with pytest.raises(UnsupportedModelError, match=reason) as info:
        load_split(tmp_path, 1, 3, parts=("body",))
    assert model_type in str(info.value) and "docs/families.md" in str(info.value)


# ---- end to end: a real body server and real clients ----------------------------------------------------------

def with_tokenizer(folder, smol_dir):
    """The tiny model's folder with the embedded model's tokenizer (its ids 0..127 are all the tiny model sees)."""
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smol_dir / name).exists():
            shutil.copy(smol_dir / name, folder / name)
    return folder


def check_reservation(url, folder, config):
    """A session reserves what its layers will hold at its longest: sliding layers only their window."""
    from lambdasplit.client.transport import BodyConnection
    from lambdasplit.wire.protocol import SessionRequest

    fingerprint = load_split(folder, *SPLIT, parts=()).body_fingerprint()
    with BodyConnection(url, transport="http") as conn:
        conn.open_session(SessionRequest(model_fingerprint=fingerprint, x=SPLIT[0], y=SPLIT[1], max_positions=200))
        assert conn.info().kv_reserved_bytes == kv_cache_bytes(config, 4, *SPLIT, 200)
    if getattr(config, "sliding_window", None):
        assert kv_cache_bytes(config, 4, *SPLIT, 200) < 200 * conn.info().kv_bytes_per_position


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["gemma3_text", "gpt2", "mixtral"])
def test_a_body_server_serves_the_family_exactly(tmp_path, smol_dir, model_type):
    """Three clients at once through one body server with batching on: plain greedy, and greedy with n-gram
    speculation, each equal to the unsplit model's `generate`."""
    from lambdasplit.client.generate import SplitClient
    from lambdasplit.server.process import ServerProcess

    model = build(tmp_path, model_type)
    with_tokenizer(tmp_path, smol_dir)
    prompts = [torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 12, 20)]
    with torch.inference_mode():
        want = [model.generate(torch.tensor([p]), max_new_tokens=40, min_new_tokens=40, do_sample=False)[0, len(p):]
                .tolist() for p in prompts]
    with ServerProcess(str(tmp_path), "0:4", "--max-batch", "8") as server:
        check_reservation(server.url, tmp_path, model.config)
        got, errors = {}, []

        def run(k: int, speculate: str) -> None:
            try:
                client = SplitClient(tmp_path, server=server.url, split=SPLIT, wire="fp32", speculate=speculate)
                got[k, speculate] = list(client.generate_ids(prompts[k], max_new_tokens=40, stop_at_eos=False))
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        for speculate in ("off", "ngram"):
            threads = [threading.Thread(target=run, args=(k, speculate)) for k in range(len(prompts))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
        assert server.proc.poll() is None
        rows, passes = metric(server.url, "lambdasplit_batch_size_sum"), metric(server.url, "lambdasplit_batch_size_count")
    assert not errors, errors
    assert passes < rows  # sessions shared forward passes (sliding-window layers too)
    for k in range(len(prompts)):
        assert got[k, "off"] == want[k]
        assert got[k, "ngram"] == want[k]


@torch.inference_mode()
def test_weight_attacks_read_every_family(tiny, parts):
    """The privacy tools' weight-based attacks run on every family: at layer 0 (the state a 0:Y split sends)
    the nearest-embedding match reads the input back, and the logit lens reads the tail's own answer from the
    state entering the final norm."""
    from lambdasplit.privacy.attacks import PublicWeights

    folder = tiny[1]
    weights = PublicWeights(folder)
    ids = torch.randint(3, VOCAB, (1, 200), generator=torch.Generator().manual_seed(3))
    state0 = parts.head.family.embed_ids(parts.head, ids, torch.arange(200)[None]).float()[0]
    assert (weights.attack("nearest-embedding").topk(state0, 1)[:, 0] == ids[0]).float().mean() >= 0.9
    last = parts.tail.layers(parts.body(parts.head(ids, None, 0), None, 0), None, 0)[0]
    logits = parts.tail(parts.body(parts.head(ids, None, 0), None, 0), None, 0, last_only=False)[0]
    assert torch.equal(weights.attack("logit-lens").topk(last, 1)[:, 0], logits.argmax(-1))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_profile_plan_and_assess_run_on_every_family(name, tmp_path, smol_dir, monkeypatch, capsys):
    """The planning and privacy tools on each family: a tiny model with the embedded model's tokenizer (its
    vocabulary, so the probe texts are in range), profiled, planned and assessed at two split points, through
    the command line's own entry point (in this process: no interpreter start per command)."""
    from lambdasplit.cli import main

    monkeypatch.setenv("LAMBDASPLIT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    build(folder, name, vocab_size=49152, eos_token_id=2)
    with_tokenizer(folder, smol_dir)
    main(["profile", "--model", str(folder), "-o", str(tmp_path / "p.json"), "--repeats", "1", "--context", "8",
          "--prefill-tokens", "8"])
    main(["plan", "--model", str(folder), "--device", str(tmp_path / "p.json"), "--top", "2"])
    assert "recommended: --split" in capsys.readouterr().out
    main(["assess", "--model", str(folder), "--layers", "0,2", "--prompts", "4", "--answer-tokens", "4",
          "--mlp-hidden", "32", "--mlp-epochs", "1", "-o", str(tmp_path / "assess")])
    found = re.search(r"^\| 0 \| ([0-9.]+) \|", (tmp_path / "assess" / "assess.md").read_text(), re.M)
    assert found and float(found[1]) >= 90  # layer 0 is the embeddings (BLOOM: after its LayerNorm): read back


def test_each_family_gets_its_default_wire(tmp_path, smol_dir):
    """No --wire: a Gemma session uses bf16 (its residual stream passes fp16's range, which the default wire's
    outliers are kept in); the other families the project's default; an explicit wire always wins."""
    from lambdasplit.client.generate import SplitClient
    from lambdasplit.wire.spec import DEFAULT_WIRE, parse_wire

    for name, want in (("gemma3_text", ("bf16", "bf16")), ("gpt2", parse_wire(DEFAULT_WIRE))):
        folder = tmp_path / name
        build(folder, name)
        with_tokenizer(folder, smol_dir)
        client = SplitClient(folder, server=None, split=SPLIT)
        assert (client.wire.up, client.wire.down) == want
        assert (SplitClient(folder, server=None, split=SPLIT, wire="fp32").wire.down) == "fp32"
