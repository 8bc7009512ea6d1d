"""The hidden states an observer would see at each split point, with the tokens they stand for.

`collect_states` runs every sequence of the corpus through the model's own layers (the same
modules the head and body run) and keeps, at each requested layer L, the state entering layer L
for every position that is scored for some target:

- ``input`` at position i: the token at i (what the device sent in);
- ``next`` at position i: the token at i + 1 (what the model then produces).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..models.corpus import TextSequence
from ..models.llm import load_split
from ..wire.noise import add_noise

IGNORE = -1


@dataclass
class States:
    layers: list[int]
    states: dict[int, torch.Tensor]  # layer -> (n, D) float32
    targets: dict[str, torch.Tensor]  # "input" / "next" -> (n,) token ids, IGNORE where not scored
    sequence: torch.Tensor  # (n,) index of the sequence each row comes from
    test: torch.Tensor  # (n,) bool: the row belongs to a held-out sequence

    def rows(self, target: str, test: bool) -> torch.Tensor:
        """Indices of the rows scored for `target` in the train (test=False) or test part."""
        return torch.nonzero((self.targets[target] != IGNORE) & (self.test == test)).squeeze(1)

    def with_noise(self, scale: float, seed: int = 0) -> "States":
        """The same states with Gaussian noise of std scale x each row's RMS (the noise defence)."""
        g = torch.Generator().manual_seed(seed)
        return States(self.layers, {L: add_noise(s, scale, g) for L, s in self.states.items()}, self.targets,
                      self.sequence, self.test)


def collect_states(folder: Path, seqs: list[TextSequence], layers: list[int], *,
                   progress: bool = True) -> States:
    layers = sorted(set(layers))
    model = load_split(folder, 0, max(layers), parts=("head", "body"))
    keep_rows: dict[int, list[torch.Tensor]] = {L: [] for L in layers}
    inputs, nexts, sequence, test = [], [], [], []
    with torch.inference_mode():
        for n, seq in enumerate(tqdm(seqs, desc="hidden states at every layer", unit="text", disable=not progress,
                                     leave=False)):
            ids, scored = seq.ids, seq.scored
            nxt = [ids[i + 1] if i + 1 < len(ids) and scored[i + 1] else IGNORE for i in range(len(ids))]
            inp = [t if s else IGNORE for t, s in zip(ids, scored)]
            keep = torch.tensor([a != IGNORE or b != IGNORE for a, b in zip(inp, nxt)])
            if not bool(keep.any()):
                continue
            hidden = model.head(torch.tensor([ids]), None, 0)
            at = 0
            for L in layers:
                hidden = model.body(hidden, None, 0, at, L) if L > at else hidden
                at = L
                keep_rows[L].append(hidden[0][keep].float().clone())
            inputs.append(torch.tensor(inp)[keep])
            nexts.append(torch.tensor(nxt)[keep])
            sequence.append(torch.full((int(keep.sum()),), n))
            test.append(torch.full((int(keep.sum()),), seq.part == "test"))
    return States(layers, {L: torch.cat(r) for L, r in keep_rows.items()},
                  {"input": torch.cat(inputs), "next": torch.cat(nexts)}, torch.cat(sequence), torch.cat(test))
