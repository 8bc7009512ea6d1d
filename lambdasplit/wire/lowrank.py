"""Low-rank wire: a PCA basis of the hidden states at a split point, and the file both sides load.

Hidden states are close to low-rank (the PrivateLoRA observation), so the first R principal
directions of calibration states carry most of their content: the sender sends R coefficients
c = (x - mean) @ V[:, :R], the receiver rebuilds mean + c @ V[:, :R]^T.

A basis file is a safetensors file (never a pickle) holding, per split point p (the hidden state
entering layer p), `mean.p` (D), `components.p` (D, R) with orthonormal columns sorted by variance,
and `variance.p` (R). Its sha256 names it: a session that uses `pca:R` states the hash, and the
server refuses the session unless it loaded the very same file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..util.atomic import replacing

FORMAT = "lambdasplit-pca/1"


class BasisError(ValueError):
    pass


@dataclass(frozen=True)
class Projection:
    """Rank-r projection at one split point: D values <-> r coefficients."""

    mean: torch.Tensor  # (D,)
    components: torch.Tensor  # (D, r)

    @property
    def rank(self) -> int:
        return self.components.shape[1]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) @ self.components

    def decode(self, coeffs: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.mean, coeffs, self.components.T)


@dataclass(frozen=True)
class Basis:
    path: Path
    sha256: str
    model: str
    hidden_size: int
    means: dict[int, torch.Tensor]
    components: dict[int, torch.Tensor]
    variances: dict[int, torch.Tensor]
    meta: dict

    @property
    def points(self) -> list[int]:
        return sorted(self.means)

    @property
    def max_rank(self) -> int:
        return min(c.shape[1] for c in self.components.values())

    def projection(self, point: int, rank: int) -> Projection:
        if point not in self.means:
            raise BasisError(f"basis {self.path.name} has no PCA basis for split point {point}; it covers "
                             f"{', '.join(map(str, self.points))} (fit one with: lambdasplit fit-basis --points ...)")
        comps = self.components[point]
        if not 1 <= rank <= comps.shape[1]:
            raise BasisError(f"rank {rank} asked, basis {self.path.name} holds up to {comps.shape[1]} at point {point}")
        return Projection(self.means[point], comps[:, :rank].contiguous())

    def explained(self, point: int, rank: int) -> float:
        """The fraction of the calibration variance that the first `rank` directions keep."""
        var = self.variances[point]
        total = float(self.meta.get("total_variance", {}).get(str(point), var.sum()))  # json keys are str
        return float(var[:rank].sum()) / total if total > 0 else 1.0

    @classmethod
    def load(cls, path: str | Path) -> "Basis":
        path = Path(path)
        if not path.is_file():
            raise BasisError(f"no basis file at {path} (make one with: lambdasplit fit-basis)")
        sha = file_sha256(path)
        try:
            with safe_open(path, framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("lambdasplit", "{}"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise BasisError(f"{path} is not a readable safetensors basis file: {exc}") from None
        if not isinstance(meta, dict):
            meta = {}
        if meta.get("format") != FORMAT:
            raise BasisError(f"{path} is not a lambdasplit PCA basis (format {meta.get('format')!r}, expected {FORMAT})")
        means, comps, variances = {}, {}, {}
        for key, t in tensors.items():
            kind, _, point = key.partition(".")
            if kind not in ("mean", "components", "variance") or not point.isdigit():
                raise BasisError(f"{path}: unexpected tensor {key!r}")
            {"mean": means, "components": comps, "variance": variances}[kind][int(point)] = t.to(torch.float32)
        dim = int(meta.get("hidden_size", 0))
        for p in means:
            if p not in comps or p not in variances or means[p].shape != (dim,) or comps[p].shape[0] != dim \
                    or variances[p].shape != (comps[p].shape[1],):
                raise BasisError(f"{path}: the tensors of split point {p} do not fit together (hidden size {dim})")
        if not means:
            raise BasisError(f"{path} holds no basis")
        return cls(path, sha, str(meta.get("model", "?")), dim, means, comps, variances, meta)


def fit_pca(rows: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """rows (N, D) -> mean (D,), components (D, rank), variance (rank,), total variance."""
    x = rows.to(torch.float64)
    mean = x.mean(0)
    centered = x - mean
    cov = centered.T @ centered / max(1, x.shape[0] - 1)
    values, vectors = torch.linalg.eigh(cov)  # ascending
    order = torch.argsort(values, descending=True)[:rank]
    return (mean.float(), vectors[:, order].float().contiguous(), values[order].clamp_min(0).float(),
            float(values.clamp_min(0).sum()))


def save_basis(path: str | Path, fits: dict[int, tuple], *, model: str, hidden_size: int, about: str) -> Path:
    """Write `fits` ({point: fit_pca(...)}) atomically as a basis file; returns the path."""
    path = Path(path)
    tensors, totals = {}, {}
    for point, (mean, comps, var, total) in sorted(fits.items()):
        tensors[f"mean.{point}"], tensors[f"components.{point}"], tensors[f"variance.{point}"] = mean, comps, var
        totals[str(point)] = total
    # one metadata entry: safetensors writes several in random order, and the file's hash must be
    # the same every time the same basis is saved
    meta = {"lambdasplit": json.dumps({"format": FORMAT, "model": model, "hidden_size": hidden_size,
                                       "about": about, "total_variance": totals}, sort_keys=True)}
    with replacing(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
