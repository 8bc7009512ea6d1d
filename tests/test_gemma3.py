"""A second real model of another family: Gemma 3 270M, shipped in four PyPI wheels of data (the `gemma3`
extra, which the test extra installs). Its pieces are joined and checked against a pinned digest, and
its split, served by a real body server, must give transformers' own greedy `generate`. Gemma 3 has
everything Llama lacks: √D-scaled embeddings, a sliding window of 512 on five layers of six with their
own rotary base, q/k norms, one KV head, and a residual stream past fp16's range from layer 8 on.
"""

from __future__ import annotations

import hashlib
import sys

import pytest
import torch
from test_cli import cli, failed_clearly

from lambdasplit.models.packaged import GEMMA3, PackagedGGUF, PackagedModelError, assemble

PROMPT = "The capital of France is"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LAMBDASPLIT_CACHE", str(tmp_path / "cache"))


def fake_wheels(root, pieces: list[bytes], digest: str | None = None) -> PackagedGGUF:
    """Packages `fakepiece0..` on sys.path, each holding one piece in data/, as the gemma3 wheels do."""
    for i, data in enumerate(pieces):
        folder = root / f"fakepiece{i}" / "data"
        folder.mkdir(parents=True)
        (folder.parent / "__init__.py").write_text("raise RuntimeError('never imported')\n")
        (folder / f"m.gguf.part{i:02d}").write_bytes(data)
    whole = b"".join(pieces)
    return PackagedGGUF(alias="fake", title="a fake model", filename="m.gguf",
                        sha256=digest or hashlib.sha256(whole).hexdigest(),
                        modules=tuple(f"fakepiece{i}" for i in range(len(pieces))), extra="fake", license="none")


def test_pieces_are_joined_once_and_checked(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    model = fake_wheels(tmp_path, [b"GGUF" + b"a" * 5000, b"b" * 3000, b"c"])
    path = assemble(model, quiet=True)
    assert path.read_bytes() == b"GGUF" + b"a" * 5000 + b"b" * 3000 + b"c"
    stamp = path.stat().st_mtime_ns
    assert assemble(model, quiet=True) == path and path.stat().st_mtime_ns == stamp  # not joined again
    assert "fakepiece0" not in sys.modules  # found, never imported


def test_pieces_that_do_not_make_the_pinned_file_are_refused(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    model = fake_wheels(tmp_path, [b"one", b"two"], digest="0" * 64)
    with pytest.raises(PackagedModelError, match="not the pinned 0000") as info:
        assemble(model, quiet=True)
    assert "reinstall the 'fake' extra" in str(info.value)
    assert not list((tmp_path / "cache" / "gguf").iterdir())  # nothing half-written is left


def test_a_missing_wheel_says_what_to_install(tmp_path):
    model = PackagedGGUF(alias="fake", title="a fake model", filename="m.gguf", sha256="0" * 64,
                         modules=("no_such_piece_1", "no_such_piece_2"), extra="fake", license="the fake terms")
    with pytest.raises(PackagedModelError) as info:
        assemble(model, quiet=True)
    message = str(info.value)
    for words in ("no_such_piece_1, no_such_piece_2 missing", "pip install 'lambdasplit[fake]'", "the fake terms"):
        assert words in message


# ---- the real model ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gemma3_dir():
    """The real Gemma 3 270M, joined and converted once into the user's cache (about 100 s the first time)."""
    from lambdasplit.models.source import resolve_model

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("LAMBDASPLIT_CACHE", raising=False)  # the real cache: convert once per machine, not per run
        gguf = assemble(GEMMA3)
        with gguf.open("rb") as f:
            assert f.read(4) == b"GGUF"
        return resolve_model("gemma3")


@pytest.mark.slow
def test_gemma3_split_equals_transformers_generate(gemma3_dir, monkeypatch):
    """`lambdasplit generate --model gemma3` through a real body server of layers [2, 16) with the fp32 wire:
    64 greedy tokens, the same text as transformers' `generate` on the unsplit model. The fp16 wire is refused
    clearly (the state entering layer 16 holds values past fp16's range); with no --wire, Gemma's default works."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lambdasplit.server.process import ServerProcess

    monkeypatch.delenv("LAMBDASPLIT_CACHE", raising=False)
    tokenizer = AutoTokenizer.from_pretrained(gemma3_dir)
    model = AutoModelForCausalLM.from_pretrained(gemma3_dir, dtype=torch.float32).eval()
    assert model.config.model_type == "gemma3_text" and model.config.sliding_window == 512
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False)[0, ids.shape[1]:]
    want = tokenizer.decode(out, skip_special_tokens=True)
    with ServerProcess("gemma3", "2:16") as server:
        r = cli("generate", "--model", "gemma3", "--server", server.url, "--split", "2:16", "--wire", "fp32",
                "--max-new-tokens", "64", "--ignore-eos", "--no-chat", PROMPT, timeout=600)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == want.strip()
        r = cli("generate", "--model", "gemma3", "--server", server.url, "--split", "2:16", "--wire", "fp16",
                "--max-new-tokens", "4", "--no-chat", PROMPT, timeout=600)
        failed_clearly(r, "fp16 range")
        # no --wire: Gemma's own default (bf16), which carries these states; the project's default would be refused
        r = cli("generate", "--model", "gemma3", "--server", server.url, "--split", "2:16", "--max-new-tokens", "8",
                "--no-chat", PROMPT, timeout=600)
        assert r.returncode == 0 and r.stdout.strip(), r.stderr
        assert server.proc.poll() is None


@pytest.mark.slow
def test_profile_plan_and_assess_run_on_gemma3(gemma3_dir, tmp_path):
    """The planning and privacy tools on the real Gemma 3 (a short assessment: four split points, few prompts)."""
    folder = str(gemma3_dir)  # already converted: the private cache of this test needs no second conversion
    r = cli("profile", "--model", folder, "-o", str(tmp_path / "profile.json"), "--repeats", "1", "--context", "16",
            "--prefill-tokens", "16")
    assert r.returncode == 0, r.stderr
    assert "gemma-3-270m" in r.stdout and "ms per token" in r.stdout
    r = cli("assess", "--model", folder, "--layers", "0,2,9", "--prompts", "4", "--answer-tokens", "8",
            "--mlp-epochs", "1", "-o", str(tmp_path / "assess"))
    assert r.returncode == 0, r.stderr
    table = (tmp_path / "assess" / "assess.md").read_text()
    assert "| 0 | 100.0 |" in table  # layer 0 is the (scaled) embedding: the nearest-embedding match reads it all
    r = cli("plan", "--model", folder, "--device", str(tmp_path / "profile.json"), "--top", "3")
    assert r.returncode == 0, r.stderr
    assert "recommended: --split" in r.stdout and "wire: bf16 up" in r.stdout  # Gemma's own default wire


@pytest.mark.slow
def test_bench_codecs_reports_the_codec_gemma3_overflows(gemma3_dir, tmp_path):
    """fp16 carries the state entering layer 2 but not the one leaving layer 15 (past 65504): the bench
    reports that row as refused, with the codec's reason, and measures the rest."""
    import csv

    out = tmp_path / "codecs"
    r = cli("bench", "codecs", "--model", str(gemma3_dir), "--split", "2:16", "--codecs", "fp32,fp16,bf16",
            "--pairs", "", "--tokens", "4", "--prompts", "1", "--ppl-tokens", "64", "-o", str(out), timeout=600)
    assert r.returncode == 0, r.stderr
    rows = {(row["codec"], row["direction"]): row for row in csv.DictReader(open(out / "codecs.csv"))}
    assert "fp16 range" in rows[("fp16", "down")]["refused"]
    assert not rows[("fp16", "up")]["refused"] and float(rows[("fp16", "up")]["agree_forced"]) > 0.9
    assert not rows[("bf16", "down")]["refused"] and float(rows[("fp32", "down")]["rel_error"]) == 0.0
    assert "| `fp16` | down | refused: fp16: a value exceeds the fp16 range" in (out / "codecs.md").read_text()
