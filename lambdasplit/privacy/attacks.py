"""Attacks that read tokens back from hidden states: what an observer of the wire can recover.

Every attack maps states (n, D) to its k best token guesses per row, best first:

- `NearestEmbedding`: cosine similarity of the state with every row of the public input embedding
  table. At layer 0 the state *is* an embedding row, so this recovers every token.
- `LogitLens`: the model's own final norm and LM head applied to the state, as if the remaining
  layers were skipped. Near the output it reads the token the model is about to produce.
- `LinearProbe`: a linear classifier (ridge regression onto one-hot targets, closed form) trained on
  (state, token) pairs of public text at that layer.
- `MLPProbe`: a 2-layer MLP classifier trained on the same pairs.

The probes predict only tokens they saw in training; any other token counts as a miss. All four
are lower bounds on what a determined attacker recovers: exact inversion with the public weights
(SipIt, 2025) works at any depth, and bigger probes on more text do better.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..util.atomic import replacing

_CHUNK = 1024  # rows scored at a time: bounds the (rows x vocab) score matrix


class Attack:
    """Maps hidden states (n, D) to the k likeliest tokens of each row, best first."""

    name = "attack"
    needs_training = False

    @torch.inference_mode()
    def topk(self, states: torch.Tensor, k: int = 5) -> torch.Tensor:
        states = states.reshape(-1, states.shape[-1]).float()
        return torch.cat([self._topk(states[i:i + _CHUNK], k) for i in range(0, states.shape[0], _CHUNK)]) \
            if states.shape[0] else torch.empty(0, k, dtype=torch.long)

    def _topk(self, states: torch.Tensor, k: int) -> torch.Tensor:
        raise NotImplementedError


class NearestEmbedding(Attack):
    """The embedding-table row with the largest cosine similarity to the state."""

    name = "nearest-embedding"

    def __init__(self, embed_weight: torch.Tensor):
        self.table = nn.functional.normalize(embed_weight.float(), dim=1)

    def _topk(self, states, k):
        return (nn.functional.normalize(states, dim=1) @ self.table.T).topk(k, dim=1).indices


class LogitLens(Attack):
    """The model's final norm and LM head, applied to a state from the middle of the model."""

    name = "logit-lens"

    def __init__(self, norm: nn.Module, lm_head_weight: torch.Tensor, lm_head_bias: torch.Tensor | None = None):
        self.norm, self.weight = norm, lm_head_weight.float()
        self.bias = None if lm_head_bias is None else lm_head_bias.float()  # Phi-2's LM head has one

    def _topk(self, states, k):
        logits = self.norm(states.unsqueeze(0))[0].float() @ self.weight.T
        return (logits if self.bias is None else logits + self.bias).topk(k, dim=1).indices


class _Probe(Attack):
    """A classifier over the tokens seen in training, on standardised states."""

    needs_training = True

    def __init__(self):
        self.mean = self.std = self.classes = None

    def _standardise_fit(self, states: torch.Tensor) -> torch.Tensor:
        self.mean = states.mean(0)
        self.std = states.std(0).clamp_min(1e-6)
        return (states - self.mean) / self.std

    def _scores(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _topk(self, states, k):
        z = (states - self.mean) / self.std
        scores = self._scores(z)
        top = scores.topk(min(k, scores.shape[1]), dim=1).indices
        ids = self.classes[top]
        if ids.shape[1] < k:  # fewer classes than k: pad with a token id that never matches
            ids = torch.cat([ids, ids.new_full((ids.shape[0], k - ids.shape[1]), -1)], dim=1)
        return ids

    @staticmethod
    def _class_index(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        classes, labels = torch.unique(tokens, return_inverse=True)
        return classes, labels

    # ---- files --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "std": self.std, "classes": self.classes}

    def save(self, path: Path, key: str = "") -> Path:
        """Write the probe as safetensors; `key` records what it was trained on (checked before reuse)."""
        with replacing(path) as tmp:
            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp),
                      metadata={"attack": self.name, "key": key})
        return path

    @classmethod
    def load(cls, path: Path) -> "_Probe":
        tensors = load_file(str(path))
        probe = cls.__new__(cls)
        probe._load(tensors)
        return probe

    def _load(self, tensors: dict[str, torch.Tensor]) -> None:
        self.mean, self.std, self.classes = tensors["mean"], tensors["std"], tensors["classes"]


class LinearProbe(_Probe):
    """Ridge regression of one-hot targets on the standardised state: W = (ZᵀZ + λI)⁻¹ ZᵀY, in closed form."""

    name = "linear-probe"

    def __init__(self, ridge: float = 1e-2):
        super().__init__()
        self.ridge = ridge
        self.weight = self.bias = None

    @torch.no_grad()
    def fit(self, states: torch.Tensor, tokens: torch.Tensor, seed: int = 0) -> "LinearProbe":
        z = self._standardise_fit(states.float())
        self.classes, labels = self._class_index(tokens)
        n, d = z.shape
        z = z.double()
        gram = z.T @ z + self.ridge * n * torch.eye(d, dtype=torch.float64)
        zy = torch.zeros(d, len(self.classes), dtype=torch.float64).index_add_(1, labels, z.T)
        freq = torch.bincount(labels, minlength=len(self.classes)).double() / n
        self.weight = torch.linalg.solve(gram, zy).float()
        self.bias = freq.float()  # the standardised inputs have zero mean, so the intercept is the class share
        return self

    def _scores(self, z):
        return z @ self.weight + self.bias

    def state_dict(self):
        return {**super().state_dict(), "weight": self.weight, "bias": self.bias}

    def _load(self, tensors):
        super()._load(tensors)
        self.weight, self.bias = tensors["weight"], tensors["bias"]


class MLPProbe(_Probe):
    """Two layers: Linear(D, H) -> GELU -> Linear(H, classes), trained with cross-entropy and AdamW."""

    name = "mlp-probe"

    def __init__(self, hidden: int = 512, epochs: int = 6, batch: int = 256, lr: float = 2e-3,
                 weight_decay: float = 1e-4):
        super().__init__()
        self.hidden, self.epochs, self.batch, self.lr, self.weight_decay = hidden, epochs, batch, lr, weight_decay
        self.net: nn.Sequential | None = None

    def fit(self, states: torch.Tensor, tokens: torch.Tensor, seed: int = 0) -> "MLPProbe":
        z = self._standardise_fit(states.float())
        self.classes, labels = self._class_index(tokens)
        g = torch.Generator().manual_seed(seed)
        self.net = _mlp(z.shape[1], self.hidden, len(self.classes), g)
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        steps = self.epochs * math.ceil(z.shape[0] / self.batch)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=steps, pct_start=0.1)
        self.net.train()
        for _ in range(self.epochs):
            order = torch.randperm(z.shape[0], generator=g)
            for i in range(0, z.shape[0], self.batch):
                idx = order[i:i + self.batch]
                loss = nn.functional.cross_entropy(self.net(z[idx]), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        self.net.eval().requires_grad_(False)
        return self

    def _scores(self, z):
        return self.net(z)

    def state_dict(self):
        return {**super().state_dict(), **{f"net.{k}": v for k, v in self.net.state_dict().items()}}

    def _load(self, tensors):
        super()._load(tensors)
        d, h = tensors["net.0.weight"].shape[1], tensors["net.0.weight"].shape[0]
        self.net = _mlp(d, h, len(self.classes), None)
        self.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        self.net.eval().requires_grad_(False)


def _mlp(d: int, h: int, c: int, generator: torch.Generator | None) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, c))
    if generator is not None:  # reproducible initialisation without touching the global RNG
        for layer in (net[0], net[2]):
            bound = 1 / math.sqrt(layer.in_features)
            with torch.no_grad():
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.uniform_(-bound, bound, generator=generator)
    return net


PROBES: dict[str, type[_Probe]] = {"linear-probe": LinearProbe, "mlp-probe": MLPProbe}


# ---- the public weights an attacker with the model holds ---------------------------------------
class PublicWeights:
    """The embedding table, final norm and LM head of a model: what weight-based attacks need."""

    def __init__(self, folder: Path):
        from ..models.llm import load_config, load_split

        n = load_config(folder).num_hidden_layers
        parts = load_split(folder, 0, n, parts=("head", "tail"), weights="fp32")  # no layers: embeddings, norm, LM head
        self.embed = parts.head.embed.weight.detach()
        self.norm = parts.tail.norm
        self.lm_head = parts.tail.lm_head.weight.detach()
        bias = getattr(parts.tail.lm_head, "bias", None)
        self.lm_head_bias = None if bias is None else bias.detach()

    def attack(self, name: str) -> Attack:
        if name == "nearest-embedding":
            return NearestEmbedding(self.embed)
        if name == "logit-lens":
            return LogitLens(self.norm, self.lm_head, self.lm_head_bias)
        raise ValueError(f"{name!r} is not a weight-based attack")


@functools.lru_cache(maxsize=2)
def public_weights(folder: Path) -> PublicWeights:
    return PublicWeights(Path(folder))


def probe_path(folder: Path, layer: int, target: str, attack: str, noise: float = 0.0) -> Path:
    """Where the assessment caches a trained probe."""
    from .results import default_assessment_path

    sub = "probes" if not noise else f"probes-noise{noise:g}"
    return default_assessment_path(folder).parent / sub / f"L{layer:02d}-{target}-{attack}.safetensors"


def load_attack(folder: str | Path, layer: int, target: str = "input", attacker: str = "with-weights") -> Attack:
    """The strongest attack the assessment measured at this layer and target, ready to run.

    Without an assessment (or without its cached probes) it falls back on what needs only the public
    weights: the nearest-embedding match for the input token, the logit lens for the next token.
    """
    from .results import TARGETS, Assessment, default_assessment_path

    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    folder = Path(folder)
    path = default_assessment_path(folder)
    if path.is_file():
        best = Assessment.load(path).best(layer, attacker, "top1", targets=(target,))
        if best is not None and best.attack in PROBES:
            file = probe_path(folder, layer, target, best.attack)
            if file.is_file():
                return PROBES[best.attack].load(file)
        elif best is not None:
            return public_weights(folder).attack(best.attack)
    if attacker == "without-weights":
        raise ValueError(f"no probe for layer {layer} ({target}) is cached; run `lambdasplit assess` first")
    return public_weights(folder).attack("nearest-embedding" if target == "input" else "logit-lens")
