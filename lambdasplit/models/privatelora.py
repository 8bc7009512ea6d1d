"""The device's half of PrivateLoRA: the r x r matrices M, which answer the server's questions mid-step.

For each adapted projection of each body layer, the server sends a = A x (one row of r values per
position) and the device answers M a; in training, the server sends the gradient g at M a, and the
device keeps g aᵀ as M's gradient and answers Mᵀ g. A and B stay on the server, M on the device.

Saved as `private_lora.json` (rank, targets, seed, split) and `private_lora.safetensors` (one M per
adapted projection): not a PEFT format, since PEFT has no split adapters of this kind.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..wire.frame import Frame
from ..wire.protocol import PrivateLoraRequest
from .lora import read_files, write_files

CONFIG_FILE, WEIGHTS_FILE = "private_lora.json", "private_lora.safetensors"


@dataclass
class PrivateLoraSpec:
    rank: int = 8
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    seed: int = 0

    def request(self) -> PrivateLoraRequest:
        return PrivateLoraRequest(rank=self.rank, targets=list(self.targets), seed=self.seed)


@dataclass
class PrivateAdapter:
    """M for every adapted projection of layers [x, y); answers the server's exchanges."""

    spec: PrivateLoraSpec
    x: int
    y: int
    base_model: str = ""
    m: dict[tuple[int, str], torch.nn.Parameter] = field(default_factory=dict)
    exchanges: int = 0  # questions answered
    _seen: dict = field(default_factory=dict, repr=False)  # (layer, module) -> the latest forward a

    def __post_init__(self):
        for layer in range(self.x, self.y):
            for module in self.spec.targets:
                self.m.setdefault((layer, module), torch.nn.Parameter(torch.zeros(self.spec.rank, self.spec.rank)))

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.m.values())

    def answer(self, question: Frame) -> torch.Tensor:
        """M a for a forward question; for a backward one, keep g aᵀ in M's gradient and return Mᵀ g."""
        extra = question.extra
        key = (extra.get("layer"), extra.get("module"))
        m = self.m.get(key)
        rows = question.tensor
        if m is None or rows.ndim != 2 or rows.shape[1] != self.spec.rank:
            raise ValueError(f"the server asked about {key} with {list(rows.shape)} values; this adapter has rank "
                             f"{self.spec.rank} on layers [{self.x}, {self.y}) for {', '.join(self.spec.targets)}")
        self.exchanges += 1
        with torch.no_grad():
            if extra.get("dir") == "bwd":
                a = self._seen.pop(key, None)
                if a is None or a.shape != rows.shape:
                    raise ValueError(f"a gradient for {key} without its forward step")
                grad = rows.T @ a  # dL/dM = sum over rows of g aᵀ
                m.grad = grad if m.grad is None else m.grad + grad
                return rows @ m
            self._seen[key] = rows.clone()
            return rows @ m.T

    def forget(self) -> None:
        self._seen.clear()

    def save(self, folder: str | Path) -> Path:
        config = {"type": "private_lora", **asdict(self.spec), "x": self.x, "y": self.y, "base_model": self.base_model}
        return write_files(folder, CONFIG_FILE, config, WEIGHTS_FILE,
                           {f"layers.{layer}.{module}.M": t for (layer, module), t in self.m.items()})

    @classmethod
    def load(cls, folder: str | Path) -> "PrivateAdapter":
        config, tensors = read_files(folder, CONFIG_FILE, WEIGHTS_FILE, "a PrivateLoRA adapter")
        try:
            spec = PrivateLoraSpec(int(config["rank"]), tuple(config["targets"]), int(config["seed"]))
            adapter = cls(spec, int(config["x"]), int(config["y"]), config.get("base_model", ""))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{folder} is not a PrivateLoRA adapter ({CONFIG_FILE}): {exc}") from None
        for (layer, module), m in adapter.m.items():
            tensor = tensors.get(f"layers.{layer}.{module}.M")
            if tensor is None or tuple(tensor.shape) != (spec.rank, spec.rank):
                raise ValueError(f"{folder}: no {spec.rank} x {spec.rank} M for {module} of layer {layer}")
            m.data = tensor.float()
        return adapter


def is_private_adapter(folder: str | Path) -> bool:
    return (Path(folder) / CONFIG_FILE).is_file()
