"""The assessment's results: token recovery per layer, attack and target, saved as JSON.

A *layer* L names the hidden state entering layer L (after L layers; 0 is the embeddings, N the
last layer's output before the final norm). The uplink of split (X, Y) carries the state at L = X,
the downlink the state at L = Y. Each state is scored against two targets:

- ``input``: the token at that position (the prompt, then every generated token as it is fed back);
- ``next``: the token the model produces next (what the tail will sample).

Both are the user's text, so a split point's leakage is the larger of the two. Every figure is a
lower bound: stronger attacks exist (exact inversion with the public weights works at any depth).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..util.jsonfile import read_json, write_json

ATTACKS = ("nearest-embedding", "logit-lens", "linear-probe", "mlp-probe")
TARGETS = ("input", "next")
METRICS = ("top1", "top5", "exact")

ATTACKERS = {
    # has the public weights (anyone, for an open model; and the cloud): every attack applies
    "with-weights": ATTACKS,
    # has no weights, only (state, token) pairs to train probes on: known plaintext such as the chat
    # template every session sends, or leaked transcripts; modelled by probes trained on public text
    "without-weights": ("linear-probe", "mlp-probe"),
}
ATTACKER_HELP = {
    "with-weights": "an eavesdropper (or the cloud) holding the public model weights: every attack",
    "without-weights": "an eavesdropper without the weights, who trains probes on (state, token) pairs it "
                       "obtained elsewhere: the learned probes only",
}


@dataclass(frozen=True)
class AttackScore:
    """One attack on the states at one layer, scored against one target on the held-out part."""

    layer: int
    attack: str
    target: str
    top1: float  # share of scored tokens whose best guess is right
    top5: float  # share whose right token is among the 5 best guesses
    exact: float  # share of held-out sequences recovered whole at top-1
    tokens: int
    sequences: int


@dataclass
class Assessment:
    """Scores for every layer 0..num_layers, attack and target, with what they were measured on."""

    model: str
    num_layers: int
    hidden_size: int
    scores: list[AttackScore] = field(default_factory=list)
    noise: float = 0.0  # Gaussian noise on the states, relative to each row's RMS (0: none)
    meta: dict = field(default_factory=dict)  # corpus, tokens, date, machine, seconds

    def score(self, layer: int, attack: str, target: str) -> AttackScore | None:
        for s in self.scores:
            if (s.layer, s.attack, s.target) == (layer, attack, target):
                return s
        return None

    @property
    def layers(self) -> list[int]:
        return sorted({s.layer for s in self.scores})

    def best(self, layer: int, attacker: str = "with-weights", metric: str = "top1",
             targets: tuple[str, ...] = TARGETS) -> AttackScore | None:
        """The strongest measured attack of this attacker at this layer (over the given targets)."""
        if attacker not in ATTACKERS:
            raise ValueError(f"unknown attacker {attacker!r}; choose one of {', '.join(ATTACKERS)}")
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
        found = [s for s in self.scores
                 if s.layer == layer and s.attack in ATTACKERS[attacker] and s.target in targets]
        return max(found, key=lambda s: getattr(s, metric), default=None)

    def recovery(self, layer: int, attacker: str = "with-weights", metric: str = "top1",
                 targets: tuple[str, ...] = TARGETS) -> float | None:
        """The largest recovery rate measured at this layer for this attacker (None: not assessed)."""
        best = self.best(layer, attacker, metric, targets)
        return None if best is None else getattr(best, metric)

    def split_recovery(self, x: int, y: int, attacker: str = "with-weights", metric: str = "top1") -> float | None:
        """What the split (X, Y) leaks: the worse of its uplink (state at X) and downlink (state at Y).

        None when either point was not assessed. A split with X == Y sends nothing through a body;
        it is still scored by its states, which would cross the wire unchanged.
        """
        up, down = self.recovery(x, attacker, metric), self.recovery(y, attacker, metric)
        return None if up is None or down is None else max(up, down)

    def merged(self, newer: "Assessment") -> "Assessment":
        """These scores updated by a newer run's (same model and noise): a run over some layers adds to the rest."""
        if (self.model, self.num_layers, self.noise) != (newer.model, newer.num_layers, newer.noise):
            raise ValueError(f"it is of {self.model} (noise {self.noise:g}), the new run of {newer.model} "
                             f"(noise {newer.noise:g})")
        if self.meta.get("corpus") != newer.meta.get("corpus"):
            return newer  # measured on other text: do not mix
        fresh = {(s.layer, s.attack, s.target) for s in newer.scores}
        kept = [s for s in self.scores if (s.layer, s.attack, s.target) not in fresh]
        scores = sorted(kept + newer.scores, key=lambda s: (s.layer, ATTACKS.index(s.attack), s.target))
        return Assessment(self.model, self.num_layers, self.hidden_size, scores, self.noise, newer.meta)

    # ---- files --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"model": self.model, "num_layers": self.num_layers, "hidden_size": self.hidden_size,
                "noise": self.noise, "meta": self.meta, "scores": [asdict(s) for s in self.scores]}

    @classmethod
    def from_dict(cls, data: dict) -> "Assessment":
        try:
            scores = [AttackScore(**s) for s in data["scores"]]
            return cls(str(data["model"]), int(data["num_layers"]), int(data["hidden_size"]), scores,
                       float(data.get("noise", 0.0)), dict(data.get("meta", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a lambdasplit assessment: {exc}") from None

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Assessment":
        return cls.from_dict(read_json(path, "assessment"))


def default_assessment_path(folder: str | Path) -> Path:
    """Where `lambdasplit assess` keeps the assessment of a model (and where plan and web look)."""
    from ..models.source import cache_root, model_name

    return cache_root() / "privacy" / model_name(Path(folder)).replace("/", "_") / "assessment.json"
