"""The page's sampler (lambdasplit/browser/static/sampling.js, run by Node.js) against the Python client's: for
temperature, top-k and top-p, the tokens the page draws follow the distribution `Sampler.probs` gives, never
leave its support, and the same seed draws the same tokens."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lambdasplit.client.sampling import Sampler, SamplingParams

NODE = shutil.which("node")
ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "tests" / "js" / "sampling.mjs"
DRAWS = 20000
LOGITS = (torch.randn(16, generator=torch.Generator().manual_seed(3)) * 2).tolist()
CASES = {  # name: (Python's parameters, the page's options)
    "temperature": ((1.0, 0, 1.0), {"temperature": 1.0}),
    "cold, top-k": ((0.7, 5, 1.0), {"temperature": 0.7, "topK": 5}),
    "hot, top-p": ((1.3, 0, 0.8), {"temperature": 1.3, "topP": 0.8}),
    "top-k and top-p": ((1.0, 8, 0.9), {"temperature": 1.0, "topK": 8, "topP": 0.9}),
}

pytestmark = pytest.mark.skipif(NODE is None, reason="Node.js (node) is not installed")


def draw(jobs: list[dict]) -> list[list[int]]:
    proc = subprocess.run([NODE, str(DRIVER)], input=json.dumps({"jobs": jobs}).encode(), capture_output=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout)["results"]


@pytest.fixture(scope="module")
def drawn() -> dict:
    names = list(CASES)
    jobs = [{"logits": LOGITS, "options": {**CASES[n][1], "seed": 7}, "draws": DRAWS} for n in names]
    jobs += [{"logits": LOGITS, "options": {"temperature": 1.0, "seed": s}, "draws": 64} for s in (1, 1, 2)]
    jobs += [{"logits": LOGITS, "options": options, "draws": 50}
             for options in ({"temperature": 0}, {"temperature": 2.0, "topK": 1}, {"temperature": 1.0, "topP": 1e-6})]
    results = draw(jobs)
    return {**dict(zip(names, results)), "seeds": results[len(names):len(names) + 3],
            "greedy": results[len(names) + 3:]}


@pytest.mark.parametrize("name", list(CASES))
def test_the_page_draws_from_the_python_clients_distribution(drawn, name):
    (temperature, top_k, top_p), _ = CASES[name]
    want = Sampler(SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=0)).probs(
        torch.tensor(LOGITS))
    got = torch.bincount(torch.tensor(drawn[name]), minlength=len(LOGITS)).float() / DRAWS
    outside = [i for i in set(drawn[name]) if want[i] == 0]
    assert not outside, f"drew tokens the Python sampler never would: {outside}"
    assert (got - want).abs().max() < 0.015, (got, want)  # 20000 draws: a standard error of at most 0.0035


def test_seeds_and_greedy(drawn):
    same, again, other = drawn["seeds"]
    assert same == again and same != other
    best = max(range(len(LOGITS)), key=LOGITS.__getitem__)
    for tokens in drawn["greedy"]:  # temperature 0, top-k 1 and a tiny top-p: always the argmax
        assert set(tokens) == {best}


def test_top_k_on_a_wide_vocabulary():
    """Both ways the page finds the k-th largest logit (a heap for small k, a sort for large) keep exactly the
    tokens Python's top-k keeps."""
    wide = (torch.randn(3000, generator=torch.Generator().manual_seed(4)) * 3).tolist()
    for k in (40, 1500):
        tokens = draw([{"logits": wide, "options": {"temperature": 5.0, "topK": k, "seed": 3}, "draws": 4000}])[0]
        allowed = Sampler(SamplingParams(temperature=5.0, top_k=k)).probs(torch.tensor(wide)) > 0
        assert int(allowed.sum()) == k and all(allowed[i] for i in tokens)
        assert len(set(tokens)) > min(k, 4000) // 3  # hot: the draws spread over the kept tokens
