"""Head / body / tail in one process, on tiny random models of several Llama-family architectures.

Every split must give the unsplit transformers model's logits and greedy tokens; each part must
read only its own tensors; the body's fingerprint must track exactly the body's weights.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

from lambdasplit.models.llm import VERIFIED_TYPES, Split, UnsupportedModelError, load_split

N_LAYERS = 4
VOCAB = 128
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)

ARCHS = {
    "llama": (LlamaConfig, {}),
    "llama-tied": (LlamaConfig, {"tie_word_embeddings": True}),
    "mistral": (MistralConfig, {"sliding_window": None}),
    "mistral-sliding": (MistralConfig, {"sliding_window": 6}),  # the prompt (12) is longer than the window
    "qwen2": (Qwen2Config, {"attention_dropout": 0.0}),
    # layers 0-1 full attention, 2-3 sliding: parts see mixed attention kinds
    "qwen2-mixed-sliding": (Qwen2Config, {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 2}),
}
SPLITS = [(0, 0), (0, N_LAYERS), (N_LAYERS, N_LAYERS), (1, -1), (2, 3), (0, 2), (3, 4)]
PROMPT_LEN, DECODE_STEPS = 12, 6


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Fingerprint digests of throwaway models go to a throwaway cache, not the user's."""
    monkeypatch.setenv("LAMBDASPLIT_CACHE", str(tmp_path_factory.getbasetemp() / "lambdasplit-cache"))


def make_model(folder, config_cls, seed=0, **overrides):
    config = config_cls(**{**SMALL, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random init leaves norms at 1; perturb them so a missing norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module", params=list(ARCHS))
def tiny(request, tmp_path_factory):
    config_cls, overrides = ARCHS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    model = make_model(folder, config_cls, **overrides)
    return request.param, folder, model


def prompt_ids(seed=1, n=PROMPT_LEN):
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def run_split(sm, ids, steps, use_cache=True):
    """Prefill + greedy decode through head -> body -> tail; returns (per-step last logits, tokens)."""
    caches = [p.layers.new_cache() if use_cache else None for p in (sm.head, sm.body, sm.tail)]
    seq = ids[0].tolist()
    logits_seen, tokens = [], []
    new, pos = seq, 0
    for _ in range(steps + 1):
        if use_cache:
            x = torch.tensor([new])
        else:
            x, pos = torch.tensor([seq]), 0
        h = sm.head(x, caches[0], pos)
        assert h.shape == (1, x.shape[1], sm.hidden_size)
        h = sm.body(h, caches[1], pos)
        logits = sm.tail(h, caches[2], pos)
        assert logits.shape == (1, 1, VOCAB)
        logits_seen.append(logits[0, -1])
        token = int(torch.argmax(logits[0, -1]))
        tokens.append(token)
        pos += x.shape[1]
        seq.append(token)
        new = [token]
    return logits_seen, tokens[:steps]


@torch.inference_mode()
def reference(model, ids, steps):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=steps,
                         eos_token_id=None, pad_token_id=0)
    tokens = out[0, ids.shape[1]:].tolist()
    full = model(out).logits[0]  # logits at every position of prompt + generated, no cache
    return full, tokens


@pytest.mark.parametrize("x, y", SPLITS)
def test_split_matches_unsplit_model(tiny, x, y):
    name, folder, model = tiny
    ids = prompt_ids()
    full, ref_tokens = reference(model, ids, DECODE_STEPS)
    assert len(ref_tokens) == DECODE_STEPS
    sm = load_split(folder, x, y, parts=("head", "body", "tail"))
    assert sm.split == Split.resolve(x, y, N_LAYERS)
    logits, tokens = run_split(sm, ids, DECODE_STEPS)
    for i, step_logits in enumerate(logits[:DECODE_STEPS]):
        torch.testing.assert_close(step_logits, full[PROMPT_LEN - 1 + i], atol=1e-4, rtol=1e-4,
                                   msg=lambda m: f"{name} split {x}:{y} step {i}: {m}")
    assert tokens == ref_tokens, f"{name} split {x}:{y}"


def test_split_without_cache_matches(tiny):
    name, folder, model = tiny
    ids = prompt_ids(seed=5)
    full, ref_tokens = reference(model, ids, 4)
    sm = load_split(folder, 1, 3, parts=("head", "body", "tail"))
    logits, tokens = run_split(sm, ids, 4, use_cache=False)
    assert tokens == ref_tokens
    for i, step_logits in enumerate(logits[:4]):
        torch.testing.assert_close(step_logits, full[PROMPT_LEN - 1 + i], atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_body_sub_range_matches_a_narrower_split(tiny):
    """A server holding [0, N) runs a session's [x, y) through the start/stop arguments."""
    name, folder, model = tiny
    ids = prompt_ids(seed=7)
    narrow = load_split(folder, 1, 3, parts=("head", "body", "tail"))
    wide = load_split(folder, 0, N_LAYERS, parts=("body",))
    a_cache, b_cache = narrow.body.layers.new_cache(), wide.body.layers.new_cache()
    h = narrow.head(ids, narrow.head.layers.new_cache(), 0)
    a = narrow.body(h, a_cache, 0)
    b = wide.body(h, b_cache, 0, 1, 3)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    step = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(narrow.body(step, a_cache, PROMPT_LEN), wide.body(step, b_cache, PROMPT_LEN, 1, 3),
                               atol=1e-5, rtol=1e-5)


def test_tail_all_positions_matches_full_forward(tiny):
    name, folder, model = tiny
    ids = prompt_ids(seed=3)
    sm = load_split(folder, 2, 2, parts=("head", "body", "tail"))
    with torch.inference_mode():
        logits = sm.tail(sm.body(sm.head(ids, None, 0), None, 0), None, 0, last_only=False)[0]
        ref = model(ids).logits[0]
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)


# ---- tied and untied LM heads ---------------------------------------------------------------

def test_tied_and_untied_lm_head(tmp_path):
    tied_dir, untied_dir = tmp_path / "tied", tmp_path / "untied"
    make_model(tied_dir, LlamaConfig, tie_word_embeddings=True)
    make_model(untied_dir, LlamaConfig, tie_word_embeddings=False)
    tied_keys = set(load_file(tied_dir / "model.safetensors"))
    untied_keys = set(load_file(untied_dir / "model.safetensors"))
    assert "lm_head.weight" not in tied_keys and "lm_head.weight" in untied_keys

    tied = load_split(tied_dir, 2, 2, parts=("tail",))
    assert torch.equal(tied.tail.lm_head.weight, load_file(tied_dir / "model.safetensors")["model.embed_tokens.weight"])
    assert "model.embed_tokens" in tied.index.loaded_groups()  # the tail reads the embedding as its head

    device = load_split(tied_dir, 1, 3, parts=("head", "tail"))
    assert device.tail.lm_head.weight.data_ptr() == device.head.embed.weight.data_ptr()  # one tensor, not two
    report = device.parameter_report()
    assert report["total"]["params"] == report["head"]["params"] + report["tail"]["params"] - 64 * VOCAB

    untied = load_split(untied_dir, 2, 2, parts=("tail",))
    assert torch.equal(untied.tail.lm_head.weight, load_file(untied_dir / "model.safetensors")["lm_head.weight"])
    assert "model.embed_tokens" not in untied.index.loaded_groups()
    assert "lm_head" in untied.index.loaded_groups()


# ---- split points ---------------------------------------------------------------------------

@pytest.mark.parametrize("x, y, expected", [(1, -1, (1, 29)), (-3, -1, (27, 29)), (0, -30, (0, 0)),
                                            (-30, 30, (0, 30)), (5, 5, (5, 5)), (0, 30, (0, 30))])
def test_split_resolution(x, y, expected):
    s = Split.resolve(x, y, 30)
    assert (s.x, s.y, s.n) == (*expected, 30)


@pytest.mark.parametrize("x, y", [(0, 31), (-31, 2), (5, 4), (31, 31), (-1, 3), (0, -31)])
def test_split_out_of_range(x, y):
    with pytest.raises(ValueError, match="need 0 <= X <= Y <= N = 30"):
        Split.resolve(x, y, 30)


@pytest.mark.parametrize("text", ["3", "a:b", "1:2:3", "", "1.5:2"])
def test_split_parse_errors(text):
    with pytest.raises(ValueError, match="X:Y"):
        Split.parse(text, 30)


def test_split_parse():
    assert Split.parse("1:-1", 30) == Split(1, 29, 30)
    assert str(Split.parse("4:26", 30)) == "4:26"


def test_load_split_rejects_out_of_range(tmp_path):
    make_model(tmp_path, LlamaConfig)
    with pytest.raises(ValueError):
        load_split(tmp_path, 0, N_LAYERS + 1)
    with pytest.raises(ValueError):
        load_split(tmp_path, 3, 2)
    assert load_split(tmp_path, -1, -1, parts=("body",)).split == Split(3, 3, 4)


# ---- unsupported models ---------------------------------------------------------------------

def test_unsupported_architecture(tmp_path):
    """OPT keeps its decoder under model.decoder: no family declares that layout, so it is refused by name."""
    config = OPTConfig(hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4, vocab_size=VOCAB,
                       max_position_embeddings=64, word_embed_proj_dim=64, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError) as info:
        load_split(tmp_path, 1, 1, parts=("body",))
    message = str(info.value)
    assert "OPT" in message
    for missing in ("model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb"):
        assert missing in message
    assert isinstance(info.value, ValueError)


LOOKALIKES = {
    # these have embed_tokens, layers, norm, rotary_emb and lm_head like Llama, but their model classes
    # do more than the stock layers: scaled embeddings (Gemma, Granite), scaled logits (Granite, Cohere)
    "granite": ("GraniteConfig", dict(embedding_multiplier=3.0, logits_scaling=2.0, residual_multiplier=0.5,
                                      attention_multiplier=0.2)),
    "cohere": ("CohereConfig", dict(logit_scale=0.5)),
    "gemma": ("GemmaConfig", dict(head_dim=16)),
}


@pytest.mark.parametrize("arch", list(LOOKALIKES))
def test_lookalike_architectures_are_exact_or_refused(tmp_path, arch):
    """A model that passes the structural check must split exactly; otherwise it must be refused.

    Silently wrong logits are the one outcome that is never acceptable.
    """
    import transformers

    name, overrides = LOOKALIKES[arch]
    model = make_model(tmp_path, getattr(transformers, name), **overrides)
    ids = prompt_ids()
    with torch.inference_mode():
        ref = model(ids).logits[0]
    try:
        sm = load_split(tmp_path, 1, 3, parts=("head", "body", "tail"))
    except UnsupportedModelError as exc:
        assert model.config.model_type in str(exc) or type(model).__name__ in str(exc)
        return
    with torch.inference_mode():
        logits = sm.tail(sm.body(sm.head(ids, None, 0), None, 0), None, 0, last_only=False)[0]
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4,
                               msg=lambda m: f"{name} loaded without complaint but splits wrongly: {m}")


@pytest.mark.parametrize("model_type", VERIFIED_TYPES)
def test_every_verified_type_splits_exactly(tmp_path, model_type):
    """Each model type lambdasplit accepts is checked here: prefill and cached decode match the unsplit model."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, **SMALL)
    # move every multiplier / scaling knob off its default, so a forward that applies one outside the layers
    # (as Granite's and Cohere's do) cannot pass by being the identity; and turn on layer-level options
    for key, value in config.to_dict().items():
        if re.search("mult|scal", key) and isinstance(value, float) and not key.startswith("rope"):
            setattr(config, key, value * 1.7 + 0.3)
    for key, value in {"clip_qkv": 0.5, "use_parallel_residual": True}.items():
        if hasattr(config, key):
            setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path)
    ids = prompt_ids()
    full, ref_tokens = reference(model, ids, DECODE_STEPS)
    sm = load_split(tmp_path, 1, 3, parts=("head", "body", "tail"))
    logits, tokens = run_split(sm, ids, DECODE_STEPS)
    assert tokens == ref_tokens
    for step, got in enumerate(logits):
        torch.testing.assert_close(got, full[PROMPT_LEN - 1 + step], atol=1e-4, rtol=1e-4)


def test_checkpoint_missing_a_layer_tensor(tmp_path):
    make_model(tmp_path, LlamaConfig)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    load_split(tmp_path, 0, 2, parts=("body",))  # layers 0-1 are whole
    with pytest.raises(UnsupportedModelError, match="up_proj"):
        load_split(tmp_path, 1, 3, parts=("body",))


# ---- what each part reads -------------------------------------------------------------------

def layer_param_count(folder, layers) -> int:
    total = 0
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            if any(key.startswith(f"model.layers.{i}.") for i in layers):
                n = 1
                for s in f.get_slice(key).get_shape():
                    n *= s
                total += n
    return total


@pytest.mark.parametrize("x, y", [(1, 3), (0, 4), (2, 2)])
def test_body_only_reads_its_layers(tmp_path, x, y):
    make_model(tmp_path, LlamaConfig, tie_word_embeddings=False)
    sm = load_split(tmp_path, x, y, parts=("body",))
    assert sm.head is None and sm.tail is None
    groups = sm.index.loaded_groups()
    assert groups == [f"model.layers.{i}" for i in range(x, y)]
    for never in ("model.embed_tokens", "model.norm", "lm_head"):
        assert never not in groups
        assert not any(k.startswith(never) for k in sm.index.loaded)
    report = sm.parameter_report()
    assert set(report) == {"body", "total"}
    assert report["total"] == report["body"]
    assert report["body"]["params"] == layer_param_count(tmp_path, range(x, y))
    assert report["body"]["bytes"] == 4 * report["body"]["params"]
    # nothing of the body lives on the meta device
    assert all(p.device.type == "cpu" for p in sm.body.parameters())


def test_head_and_tail_read_only_their_parts(tmp_path):
    make_model(tmp_path, LlamaConfig, tie_word_embeddings=False)
    sm = load_split(tmp_path, 1, 3, parts=("head", "tail"))
    assert sm.body is None
    assert set(sm.index.loaded_groups()) == {"lm_head", "model.norm", "model.embed_tokens", "model.layers.0",
                                             "model.layers.3"}
    assert not any(k.startswith(("model.layers.1.", "model.layers.2.")) for k in sm.index.loaded)
    report = sm.parameter_report()
    assert report["head"]["params"] == 64 * VOCAB + layer_param_count(tmp_path, [0])
    assert report["tail"]["params"] == layer_param_count(tmp_path, [3]) + 64 + 64 * VOCAB
    assert report["total"]["params"] == report["head"]["params"] + report["tail"]["params"]  # nothing shared


def test_half_precision_parts(tmp_path):
    model = make_model(tmp_path, LlamaConfig)
    ids = prompt_ids()
    sm = load_split(tmp_path, 1, 3, parts=("head", "body", "tail"), dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for part in sm.parts().values() for p in part.parameters())
    with torch.inference_mode():
        logits = sm.tail(sm.body(sm.head(ids, None, 0), None, 0), None, 0)[0, -1].float()
        ref = model(ids).logits[0, -1]
    assert torch.allclose(logits, ref, atol=0.1)


# ---- fingerprints ---------------------------------------------------------------------------

def test_fingerprint_tracks_the_body_weights(tmp_path):
    a, copy, changed = tmp_path / "a", tmp_path / "copy", tmp_path / "changed"
    make_model(a, LlamaConfig)
    shutil.copytree(a, copy)
    tensors = load_file(a / "model.safetensors")
    tensors["model.layers.2.self_attn.q_proj.weight"][0, 0] += 1e-3
    changed.mkdir()
    shutil.copy(a / "config.json", changed / "config.json")
    save_file(tensors, changed / "model.safetensors", metadata={"format": "pt"})

    fp = load_split(a, 1, 3, parts=("body",)).body_fingerprint()
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert load_split(a, 1, 3, parts=("head", "tail")).body_fingerprint() == fp  # the device agrees without the body
    assert load_split(copy, 1, 3, parts=("body",)).body_fingerprint() == fp  # same weights elsewhere
    assert load_split(changed, 1, 3, parts=("body",)).body_fingerprint() != fp  # layer 2 changed
    # a change outside the range does not matter; a different range does
    assert load_split(changed, 0, 2, parts=("body",)).body_fingerprint() == \
        load_split(a, 0, 2, parts=("body",)).body_fingerprint()
    sm = load_split(a, 1, 3, parts=("body",))
    assert sm.body_fingerprint(1, 2) != fp and sm.body_fingerprint(2, 3) != fp
    assert sm.body_fingerprint(0, 0) != sm.body_fingerprint(4, 4)  # two empty ranges are still different splits
    assert sm.body_fingerprint(1, 3) == fp


def test_fingerprint_sees_weights_rewritten_in_place(tmp_path):
    """Re-saving changed weights into the same folder must change the fingerprint (no stale digest)."""
    make_model(tmp_path, LlamaConfig)
    before = load_split(tmp_path, 0, 4, parts=("body",)).body_fingerprint()
    make_model(tmp_path, LlamaConfig, seed=1)
    after = load_split(tmp_path, 0, 4, parts=("body",)).body_fingerprint()
    assert before != after


def test_fingerprint_tracks_the_architecture(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_model(a, LlamaConfig)
    shutil.copytree(a, b)
    config = json.loads((b / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (b / "config.json").write_text(json.dumps(config))
    assert load_split(a, 1, 3, parts=("body",)).body_fingerprint() != \
        load_split(b, 1, 3, parts=("body",)).body_fingerprint()
