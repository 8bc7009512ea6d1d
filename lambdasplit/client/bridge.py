"""A learned bridge over the body, for drafting: the body's output guessed from what the device has.

The early-exit draft feeds the head's output straight into the tail, and skipping 28 of 30 layers
leaves nothing useful (its drafts are almost never right). The device knows more than that: the
body's true output for the previous position came down with the last step. The bridge is a linear
map, fitted by ridge regression, from [head output at position m ; body output at m - 1] to the body
output at m (in the spirit of EAGLE, which predicts the next features from the current ones):

    b̂_m = [h_X(t_m), b_(m-1), 1] · W        W: (2D + 1) x D

Drafts chain it: b̂ feeds the tail (with the real tail cache, so the context is exact) for a draft
token, and stands in for b_(m-1) at the next one. To keep drafting cheap, the draft's LM head covers
only the tokens the fitting text used (the verification always uses the full vocabulary).

Fitting needs the body's outputs, so it runs the whole model once, on the device that holds the
checkpoint, over the model's own answers to the shipped prompts (the privacy corpus: training part
only) and the shipped calibration prose. The bridge is cached per model and split; it leaves the
device no more than the model files do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..models.corpus import load_corpus
from ..models.llm import load_split
from ..models.source import cache_root, model_name
from ..util.atomic import replacing

VERSION = 1


class BridgeError(ValueError):
    pass


@dataclass
class Bridge:
    weight: torch.Tensor  # (2D + 1, D)
    vocab: torch.Tensor  # (V',) token ids the draft may propose
    x: int
    y: int
    fingerprint: str  # the body's (layers [x, y)), so a bridge is never used with other weights

    def predict(self, head_out: torch.Tensor, body_prev: torch.Tensor) -> torch.Tensor:
        """(rows, D) head outputs and the previous body outputs -> (rows, D) guessed body outputs."""
        ones = head_out.new_ones(head_out.shape[0], 1)
        return torch.cat([head_out, body_prev, ones], 1) @ self.weight

    def save(self, path: Path) -> Path:
        meta = {"version": str(VERSION), "x": str(self.x), "y": str(self.y), "fingerprint": self.fingerprint}
        with replacing(path) as tmp:
            save_file({"weight": self.weight.contiguous(), "vocab": self.vocab.contiguous()}, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: Path) -> "Bridge":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
            if meta.get("version") != str(VERSION):
                raise BridgeError(f"{path} is a bridge of version {meta.get('version')}, this is {VERSION}")
            return cls(tensors["weight"], tensors["vocab"], int(meta["x"]), int(meta["y"]), meta["fingerprint"])
        except (OSError, KeyError, ValueError, SafetensorError) as exc:
            raise BridgeError(f"cannot read the bridge {path}: {exc}") from None


def bridge_path(folder: Path, x: int, y: int) -> Path:
    return cache_root() / "bridges" / f"{model_name(folder).replace('/', '_')}-{x}-{y}.safetensors"


def fit_bridge(folder: Path, x: int, y: int, *, sequences: list[list[int]] | None = None, ridge: float = 1e-2,
               progress: bool = True, log=print) -> Bridge:
    """Fit the bridge over layers [x, y) on token sequences (default: the training part of the privacy
    corpus, the model's own answers and the shipped prose; built once and cached by `assess` too)."""
    if sequences is None:
        corpus = load_corpus(folder, cache_root() / "privacy" / model_name(folder).replace("/", "_"),
                             progress=progress, log=log)
        sequences = [s.ids for s in corpus if s.part == "train"]
    if sum(len(ids) - 1 for ids in sequences) < 2:
        raise BridgeError("fitting a bridge needs at least two positions of text")
    model = load_split(folder, x, y, parts=("head", "body"))
    inputs, targets, seen = [], [], set()
    with torch.inference_mode():
        for ids in tqdm(sequences, desc="bridge: body outputs", unit="text", disable=not progress, leave=False):
            head = model.head(torch.tensor([ids]), None, 0)[0]
            body = model.body(head.unsqueeze(0), None, 0)[0]
            inputs.append(torch.cat([head[1:], body[:-1]], 1))
            targets.append(body[1:])
            seen.update(ids)
    a = torch.cat(inputs).double()
    a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
    b = torch.cat(targets).double()
    gram = a.T @ a
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    weight = torch.linalg.solve(gram, a.T @ b).float()
    log(f"bridge over layers [{x}, {y}) fitted on {a.shape[0]} positions; drafts cover {len(seen)} tokens")
    return Bridge(weight, torch.tensor(sorted(seen)), x, y, model.body_fingerprint())


def load_or_fit(folder: Path, x: int, y: int, fingerprint: str, *, log=print) -> Bridge:
    """The cached bridge for this model and split, fitted (about a minute here) and cached if missing."""
    path = bridge_path(folder, x, y)
    if path.is_file():
        try:
            bridge = Bridge.load(path)
            if bridge.fingerprint == fingerprint and (bridge.x, bridge.y) == (x, y):
                return bridge
            log(f"the cached bridge {path} is for other weights; fitting a new one")
        except BridgeError as exc:
            log(f"{exc}; fitting a new one")
    log(f"fitting the draft bridge over layers [{x}, {y}) (once; cached in {path})")
    bridge = fit_bridge(folder, x, y, log=log)
    bridge.save(path)
    return bridge

