"""The assessment: every attack on the states at every split point, scored on held-out text.

    corpus (public text) -> states at layers 0..N -> attacks (fit probes on train) -> scores on test

The probes are cached beside the assessment, keyed by the corpus and their settings, so a second
run (or `eavesdrop`, which loads them) does not train them again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..models.corpus import corpus_key, load_corpus
from .attacks import PROBES, Attack, LinearProbe, MLPProbe, probe_path, public_weights
from .results import ATTACKS, TARGETS, Assessment, AttackScore, default_assessment_path
from .states import States, collect_states


@dataclass(frozen=True)
class ProbeSettings:
    mlp_hidden: int = 512
    mlp_epochs: int = 6
    ridge: float = 1e-2

    def make(self, attack: str):
        if attack == "linear-probe":
            return LinearProbe(self.ridge)
        return MLPProbe(hidden=self.mlp_hidden, epochs=self.mlp_epochs)

    def key(self, attack: str) -> str:
        return f"ridge={self.ridge}" if attack == "linear-probe" else f"h={self.mlp_hidden},e={self.mlp_epochs}"


def score(top: torch.Tensor, truth: torch.Tensor, sequence: torch.Tensor, layer: int, attack: str,
          target: str) -> AttackScore:
    """Top-1 and top-5 recovery, and the share of sequences recovered whole at top-1."""
    hit1 = top[:, 0] == truth
    hit5 = (top == truth[:, None]).any(1)
    seqs, index = torch.unique(sequence, return_inverse=True)
    misses = torch.zeros(len(seqs), dtype=torch.long).index_add_(0, index, (~hit1).long())
    return AttackScore(layer, attack, target, top1=round(hit1.float().mean().item(), 4),
                       top5=round(hit5.float().mean().item(), 4), exact=round((misses == 0).float().mean().item(), 4),
                       tokens=int(truth.numel()), sequences=len(seqs))


def _probe(folder: Path, states: States, layer: int, target: str, attack: str, settings: ProbeSettings,
           key: str, noise: float, retrain: bool) -> Attack:
    """A trained probe for (layer, target): from the cache when its corpus and settings match."""
    path = probe_path(folder, layer, target, attack, noise)
    meta = f"{key}|{settings.key(attack)}|noise={noise:g}"
    if path.is_file() and not retrain:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("key") == meta:
                return PROBES[attack].load(path)
    rows = states.rows(target, test=False)
    probe = settings.make(attack).fit(states.states[layer][rows], states.targets[target][rows], seed=layer)
    probe.save(path, meta)
    return probe


def run_assessment(folder: Path, layers: list[int] | None = None, *, attacks: tuple[str, ...] = ATTACKS,
                   noise: float = 0.0, settings: ProbeSettings = ProbeSettings(), answer_tokens: int = 80,
                   prompts: int | None = None, retrain: bool = False, progress: bool = True, log: Callable[[str], None] = print,
                   states: States | None = None) -> Assessment:
    """Score every attack at every layer (default 0..N) for both targets; return the assessment.

    `states` (from `prepare_states`) lets several runs, e.g. at several noise scales, share one pass
    of the model over the corpus."""
    from ..models.llm import load_config
    from ..models.source import model_name

    t0 = time.perf_counter()
    config = load_config(folder)
    n = config.num_hidden_layers
    layers = sorted(set(range(n + 1) if layers is None else layers))
    if bad := [L for L in layers if not 0 <= L <= n]:
        raise ValueError(f"layers {bad} are outside 0..{n} (the split points of a {n}-layer model)")
    if unknown := [a for a in attacks if a not in ATTACKS]:
        raise ValueError(f"unknown attacks {unknown}; choose from {', '.join(ATTACKS)}")
    if states is None:
        states = prepare_states(folder, layers, answer_tokens=answer_tokens, prompts=prompts, progress=progress,
                                log=log)
    elif missing := sorted(set(layers) - set(states.layers)):
        raise ValueError(f"the given states lack layers {missing}")
    key = corpus_key(folder, answer_tokens, prompts)
    if noise:
        states = states.with_noise(noise)
    public = public_weights(folder) if any(a not in PROBES for a in attacks) else None
    scores: list[AttackScore] = []
    bar = tqdm(total=len(layers) * len(attacks), desc="attacks", unit="attack", disable=not progress)
    for layer in layers:
        for attack in attacks:
            bar.set_postfix_str(f"layer {layer}, {attack}")
            if attack in PROBES:  # one probe per target
                for target in TARGETS:
                    probe = _probe(folder, states, layer, target, attack, settings, key, noise, retrain)
                    scores.append(_evaluate(probe, states, layer, target))
            else:  # one ranking serves both targets
                scores += _evaluate_both(public.attack(attack), states, layer)
            bar.update()
    bar.close()
    train, test = (int((states.targets["input"][states.test == t] != -1).sum()) for t in (False, True))
    seen = set(states.targets["input"][~states.test].tolist())
    truth = states.targets["input"][states.test]
    truth = truth[truth != -1]
    coverage = sum(t in seen for t in truth.tolist()) / max(1, truth.numel())
    meta = {"corpus": f"corpus-{key}", "train_tokens": train, "test_tokens": test, "coverage": round(coverage, 4),
            "test_sequences": len({int(s) for s in states.sequence[states.test]}),
            "probes": {a: settings.key(a) for a in PROBES}, "seconds": round(time.perf_counter() - t0, 1)}
    from ..util.report import machine_meta

    meta.update(machine_meta())
    return Assessment(model_name(folder), n, config.hidden_size, scores, noise, meta)


def prepare_states(folder: Path, layers: list[int], *, answer_tokens: int = 80, prompts: int | None = None,
                   progress: bool = True, log: Callable[[str], None] = print) -> States:
    """The corpus (built once, cached) run through the model, with the states at `layers` kept."""
    seqs = load_corpus(folder, default_assessment_path(folder).parent, answer_tokens=answer_tokens,
                       prompts=prompts, progress=progress, log=log)
    return collect_states(folder, seqs, layers, progress=progress)


def _evaluate(attack: Attack, states: States, layer: int, target: str) -> AttackScore:
    rows = states.rows(target, test=True)
    top = attack.topk(states.states[layer][rows], 5)
    return score(top, states.targets[target][rows], states.sequence[rows], layer, attack.name, target)


def _evaluate_both(attack: Attack, states: States, layer: int) -> list[AttackScore]:
    rows = torch.nonzero(states.test).squeeze(1)
    top = attack.topk(states.states[layer][rows], 5)
    out = []
    for target in TARGETS:
        keep = states.targets[target][rows] != -1
        out.append(score(top[keep], states.targets[target][rows][keep], states.sequence[rows][keep], layer,
                         attack.name, target))
    return out
