"""The privacy assessment: attacks, scores, the assessment file, the CLI, and the noise defence.

The attacks are checked against facts that must hold (the state at layer 0 *is* an embedding row; the
logit lens at the last layer *is* the model's own prediction), the probes against a problem they
must solve, and the CLI end to end on the embedded model with a small corpus.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lambdasplit.privacy.assess import score
from lambdasplit.privacy.attacks import LinearProbe, MLPProbe, load_attack, public_weights
from lambdasplit.privacy.results import Assessment, AttackScore
from lambdasplit.wire.noise import add_noise


@pytest.fixture(scope="module")
def weights(smol_dir):
    return public_weights(smol_dir)


def test_nearest_embedding_reads_layer_zero_exactly(weights):
    ids = torch.tensor([100, 504, 3458, 4000, 12345, 40000])  # (some special tokens share one embedding row)
    top = weights.attack("nearest-embedding").topk(weights.embed[ids], 5)
    assert top[:, 0].tolist() == ids.tolist()


def test_logit_lens_at_the_last_layer_is_the_models_prediction(smol_dir, hf_model, weights):
    from lambdasplit.models.llm import load_split

    model = load_split(smol_dir, 0, 30, parts=("head", "body"))
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1345, 282, 5645, 47]])
    with torch.inference_mode():
        state = model.body(model.head(ids, None, 0), None, 0)[0]
        expected = hf_model(input_ids=ids).logits[0].argmax(-1)
    top = weights.attack("logit-lens").topk(state, 1)[:, 0]
    assert top.tolist() == expected.tolist()


def _separable(n: int, classes: int, dim: int = 64, seed: int = 0):
    """States that are a class's code plus noise: a probe must learn to read the class back."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randn(classes, dim, generator=g) * 3
    labels = torch.randint(0, classes, (n,), generator=g)
    return codes[labels] + torch.randn(n, dim, generator=g), labels * 7 + 11  # token ids need not be 0..C-1


@pytest.mark.parametrize("probe", [LinearProbe(), MLPProbe(hidden=64, epochs=8)], ids=["linear", "mlp"])
def test_probes_learn_a_separable_code_and_survive_a_file_round_trip(probe, tmp_path):
    x, y = _separable(4000, 40)
    probe.fit(x[:3000], y[:3000])
    top = probe.topk(x[3000:], 5)
    assert (top[:, 0] == y[3000:]).float().mean() > 0.95
    again = type(probe).load(probe.save(tmp_path / "probe.safetensors", "key"))
    assert torch.equal(again.topk(x[3000:], 5), top)


def test_a_probe_cannot_name_a_token_it_never_saw():
    x, y = _separable(1000, 10)
    probe = LinearProbe().fit(x, y)
    assert set(probe.topk(x, 5).flatten().tolist()) <= set(y.tolist()) | {-1}


def test_score_counts_top1_top5_and_whole_sequences():
    top = torch.tensor([[1, 9, 9, 9, 9], [9, 2, 9, 9, 9], [3, 9, 9, 9, 9], [9, 9, 9, 9, 9]])
    truth = torch.tensor([1, 2, 3, 4])
    seqs = torch.tensor([0, 0, 1, 2])
    s = score(top, truth, seqs, 3, "linear-probe", "input")
    assert (s.top1, s.top5, s.exact, s.tokens, s.sequences) == (0.5, 0.75, round(1 / 3, 4), 4, 3)


def _assessment(values: dict[tuple[int, str, str], float]) -> Assessment:
    scores = [AttackScore(L, a, t, v, min(1.0, v + 0.1), 0.0, 100, 5) for (L, a, t), v in values.items()]
    return Assessment("m", 4, 8, scores)


def test_assessment_picks_the_strongest_attack_per_attacker_and_split(tmp_path):
    a = _assessment({(1, "nearest-embedding", "input"): 0.9, (1, "linear-probe", "input"): 0.3,
                     (1, "mlp-probe", "next"): 0.4, (3, "logit-lens", "next"): 0.7, (3, "linear-probe", "input"): 0.2})
    assert a.recovery(1) == 0.9 and a.best(1).attack == "nearest-embedding"
    assert a.recovery(1, "without-weights") == 0.4 and a.best(1, "without-weights").target == "next"
    assert a.split_recovery(1, 3) == 0.9 and a.split_recovery(1, 3, "without-weights") == 0.4
    assert a.recovery(2) is None and a.split_recovery(1, 2) is None
    assert a.recovery(1, metric="top5") == 1.0
    with pytest.raises(ValueError, match="unknown attacker"):
        a.recovery(1, "the-cloud")
    loaded = Assessment.load(a.save(tmp_path / "a.json"))
    assert loaded.scores == a.scores
    newer = _assessment({(3, "logit-lens", "next"): 0.5})
    newer.meta = a.meta = {"corpus": "c"}
    merged = a.merged(newer)
    assert merged.score(3, "logit-lens", "next").top1 == 0.5 and merged.recovery(1) == 0.9


@pytest.mark.parametrize("text", ["", "[]", '{"model": "m"}', '{"model": "m", "num_layers": 2, "hidden_size": 8, '
                                  '"scores": [{"layer": 1}]}', "not json"])
def test_a_damaged_assessment_file_is_refused_clearly(tmp_path, text):
    path = tmp_path / "a.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="assessment|JSON"):
        Assessment.load(path)


def test_noise_has_the_stated_size_and_is_not_repeatable_by_the_receiver():
    from lambdasplit.wire.codecs import make_codec

    x = torch.randn(200, 576) * 3
    x[:, :4] *= 100  # massive channels, as in real states: the noise follows each row's RMS
    rel = ((add_noise(x, 0.2) - x).norm(dim=1) / x.norm(dim=1)).mean()
    assert 0.18 < float(rel) < 0.22
    a, b = (make_codec("noise:0.2+fp32", seed=7) for _ in range(2))  # the same session seed on both sides
    ya, yb = (c.decode(c.encode(x), tuple(x.shape)) for c in (a, b))
    assert not torch.allclose(ya, yb), "two codecs with one session seed drew the same noise"


@pytest.mark.parametrize("name, canonical", [("noise:0.1+int8", "noise:0.1+int8"), ("int8+out:4+noise:0.50",
                                              "noise:0.5+int8+out:4"), ("fp16+noise:2", "noise:2+fp16")])
def test_noise_codec_names(name, canonical):
    from lambdasplit.wire.spec import parse_codec

    assert parse_codec(name).name == canonical and not parse_codec(name).lossless


@pytest.mark.parametrize("name", ["noise:0", "noise:-1", "noise:1e-3", "noise:.5", "noise:11", "noise:x",
                                  "noise:0.1+noise:0.2", "noise:\u0661"])
def test_bad_noise_codec_names_are_refused(name):
    from lambdasplit.wire.spec import SpecError, parse_codec

    with pytest.raises(SpecError):
        parse_codec(name)


def test_noise_on_the_downlink_is_added_by_the_real_server(smol_dir, full_server):
    """The server applies the session's downlink noise: replies differ from a clean session by about S."""
    from lambdasplit.client.transport import BodyConnection
    from lambdasplit.models.llm import load_split
    from lambdasplit.wire.frame import Frame, encode_frame
    from lambdasplit.wire.protocol import SessionRequest, WireFormat

    model = load_split(smol_dir, 1, 29, parts=("head",))
    hidden = model.head(torch.tensor([[1, 504, 3458, 314, 260]]), None, 0)[0]
    replies = []
    for down in ("fp32", "noise:0.3+fp32"):
        with BodyConnection(full_server.url) as conn:
            conn.open_session(SessionRequest(model_fingerprint=model.body_fingerprint(), x=1, y=29, dtype="float32",
                                             wire=WireFormat(up="fp32", down=down), cache=True, max_positions=64))
            replies.append(conn.step(encode_frame(Frame("hidden", step=0, pos=0, tensor=hidden, codec="fp32"))).tensor)
    rel = ((replies[1] - replies[0]).norm(dim=1) / replies[0].norm(dim=1)).mean()
    assert 0.2 < float(rel) < 0.4


@pytest.fixture(scope="module")
def quick_assess(tmp_path_factory, smol_dir):
    """`lambdasplit assess` on a small corpus (12 prompts, 12-token answers) in a fresh cache."""
    cache, out = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("assess")
    (cache / "models").symlink_to(smol_dir.parent)  # the converted model, not converted again
    env = {**os.environ, "LAMBDASPLIT_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "lambdasplit", "assess", "--layers", "0,1,30", "--prompts", "12",
           "--answer-tokens", "12", "--mlp-hidden", "64", "--mlp-epochs", "2", "--threshold", "0.5", "--out", str(out)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return cache, out, run, cmd, env


@pytest.mark.slow
def test_assess_cli_writes_the_report_and_a_plain_summary(quick_assess):
    cache, out, run, *_ = quick_assess
    for name in ("assess.md", "assess.csv", "assess.json", "assess.png", "assessment.json"):
        assert (out / name).stat().st_size > 0, name
    a = Assessment.load(out / "assessment.json")
    assert a.layers == [0, 1, 30]
    assert a.score(0, "nearest-embedding", "input").top1 == 1.0  # layer 0 is the embedding table itself
    assert a.recovery(30, "with-weights") > 0.3  # the logit lens reads the last state's next token
    assert "LOWER BOUND" in (out / "assess.md").read_text()
    assert "holding the public model weights" in run.stdout and "without the weights" in run.stdout
    assert "NO split point meets it" in run.stdout or "safe layers" in run.stdout
    cached = list((cache / "privacy").glob("*/assessment.json"))
    assert len(cached) == 1 and Assessment.load(cached[0]).layers == [0, 1, 30]
    assert len(list((cache / "privacy").glob("*/probes/*.safetensors"))) == 3 * 2 * 2  # layers x targets x probes


@pytest.mark.slow
def test_assess_reuses_cached_probes_and_load_attack_finds_them(quick_assess, smol_dir):
    cache, out, _, cmd, env = quick_assess
    a = Assessment.load(out / "assessment.json")
    probes = sorted((cache / "privacy").glob("*/probes/L01-*.safetensors"))
    before = {p: p.stat().st_mtime_ns for p in probes}
    again = cmd[:cmd.index("--layers")] + ["--layers", "1", "--attacks", "linear-probe,mlp-probe"] + \
        cmd[cmd.index("--layers") + 2:]
    again[again.index("--out") + 1] = str(out / "again")
    run = subprocess.run(again, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(probes) == 4 and {p: p.stat().st_mtime_ns for p in probes} == before, "the probes were trained again"
    redo = Assessment.load(out / "again" / "assessment.json")
    assert redo.score(1, "mlp-probe", "input") == a.score(1, "mlp-probe", "input")  # the same probe, the same score
    cached = Assessment.load(next((cache / "privacy").glob("*/assessment.json")))
    assert cached.layers == [0, 1, 30] and cached.score(0, "logit-lens", "next") is not None  # merged, not replaced
    saved = os.environ.get("LAMBDASPLIT_CACHE")
    os.environ["LAMBDASPLIT_CACHE"] = str(cache)
    try:
        attack = load_attack(smol_dir, 1, "input")
        assert attack.name == a.best(1, targets=("input",)).attack
        assert load_attack(smol_dir, 1, "input", "without-weights").name in ("linear-probe", "mlp-probe")
    finally:
        if saved is None:
            del os.environ["LAMBDASPLIT_CACHE"]
        else:
            os.environ["LAMBDASPLIT_CACHE"] = saved


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [(["--layers", "0,31"], "outside 0..30"), (["--layers", "3-1"], "ranges"),
                                           (["--attacks", "sipit"], "unknown attack"), (["--threshold", "2"], "fraction"),
                                           (["--prompts", "2"], "at least 4")])
def test_assess_refuses_bad_options(args, message):
    run = subprocess.run([sys.executable, "-m", "lambdasplit", "assess", *args], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2 and message in run.stderr, run.stderr


@pytest.mark.slow
def test_bench_noise_reports_the_trade_off(quick_assess, tmp_path):
    cache, _, _, _, env = quick_assess
    cmd = [sys.executable, "-m", "lambdasplit", "bench", "noise", "--split", "1:30", "--scales", "0,1", "--tokens", "12",
           "--ppl-tokens", "128", "--prompts", "12", "--answer-tokens", "12", "--mlp-hidden", "64",
           "--mlp-epochs", "2", "--out", str(tmp_path)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {(r["noise"], r["direction"]): r for r in json.loads((tmp_path / "noise.json").read_text())["rows"]}
    clean, noisy = rows[(0.0, "both")], rows[(1.0, "both")]
    assert clean["agree_forced"] == 1.0 and clean["ppl"] == pytest.approx(clean["ppl_clean"])
    assert noisy["ppl"] > clean["ppl"] and noisy["agree_forced"] < 1.0  # noise costs quality...
    assert noisy["recovery_with_weights"] < clean["recovery_with_weights"]  # ...and buys privacy
    assert (tmp_path / "noise.png").stat().st_size > 0
