"""LoRA adapters in PEFT's format: the files, the tensors, and merging them into the device's layers.

A LoRA adapter adds (alpha / r) * B A x to a linear layer's output, with A (r x in) and B (out x r)
trained and the base weight frozen. The files are PEFT's own: `adapter_config.json` (a LoraConfig)
and `adapter_model.safetensors` with keys such as
`base_model.model.model.layers.29.self_attn.q_proj.lora_A.weight`, so `peft` loads them onto the
unsplit model, and `lambdasplit generate --adapter DIR` merges them into the head and tail.
Training them is `lambdasplit.tune`'s business; this module is what the device needs to use them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # every linear
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(.+)\.lora_([AB])\.weight$")


@dataclass
class LoraSpec:
    r: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS


@dataclass
class Adapter:
    """LoRA tensors keyed as PEFT saves them, and the LoraConfig that goes with them."""

    spec: LoraSpec
    layers: list[int]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    base_model: str = ""

    def config(self) -> dict:
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": self.base_model,
                "r": self.spec.r, "lora_alpha": self.spec.alpha, "lora_dropout": 0.0, "bias": "none",
                "target_modules": list(self.spec.targets), "layers_to_transform": sorted(self.layers),
                "layers_pattern": "layers", "fan_in_fan_out": False, "inference_mode": True,
                "init_lora_weights": True, "use_rslora": False, "modules_to_save": None}

    def save(self, folder: str | Path) -> Path:
        return write_files(folder, CONFIG_FILE, self.config(), WEIGHTS_FILE, self.tensors)

    @classmethod
    def load(cls, folder: str | Path) -> "Adapter":
        config, tensors = read_files(folder, CONFIG_FILE, WEIGHTS_FILE, "a LoRA adapter folder")
        if config.get("peft_type") != "LORA":
            raise ValueError(f"{folder}: only LoRA adapters are supported, this one is {config.get('peft_type')!r}")
        if config.get("use_rslora") or config.get("use_dora"):
            raise ValueError(f"{folder}: rsLoRA and DoRA adapters are not supported")
        layers = set()
        for key in tensors:
            match = _KEY.match(key)
            if match is None:
                raise ValueError(f"{folder}: unexpected tensor {key!r} (expected PEFT LoRA keys of decoder layers)")
            layers.add(int(match.group(1)))
        targets = config.get("target_modules") or DEFAULT_TARGETS
        spec = LoraSpec(int(config["r"]), float(config["lora_alpha"]),
                        tuple([targets] if isinstance(targets, str) else targets))
        return cls(spec, sorted(layers), tensors, config.get("base_model_name_or_path", ""))

    def pairs(self) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        """(layer, module path) -> (A, B)."""
        out: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for key, tensor in self.tensors.items():
            layer, path, which = _KEY.match(key).groups()
            out.setdefault((int(layer), path), {})[which] = tensor
        return {k: (v["A"], v["B"]) for k, v in out.items() if "A" in v and "B" in v}


def write_files(folder: str | Path, config_file: str, config: dict, weights_file: str,
                tensors: dict[str, torch.Tensor]) -> Path:
    """An adapter folder: its JSON config and its tensors (safetensors)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / config_file).write_text(json.dumps(config, indent=2))
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(folder / weights_file),
              metadata={"format": "pt"})
    return folder


def read_files(folder: str | Path, config_file: str, weights_file: str, what: str) -> tuple[dict, dict]:
    folder = Path(folder)
    try:
        return json.loads((folder / config_file).read_text()), load_file(str(folder / weights_file))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{folder} is not {what} ({config_file} and {weights_file}): {exc}") from None


def peft_key(layer: int, path: str, which: str) -> str:
    return f"base_model.model.model.layers.{layer}.{path}.lora_{which}.weight"


@torch.no_grad()
def merge(adapter: Adapter, stacks: list, remote: tuple[int, int] | None = None) -> int:
    """Add scale * B A into the weights of the given LayerStacks (the device's head and tail).

    Refuses an adapter that adapts layers a body server runs (`remote`, [x, y)): those weights are not
    on the device, and the server must never be asked to hold a user's adapter. Returns the number of
    merged modules.
    """
    x, y = remote or (0, 0)
    in_body = sorted(layer for layer in adapter.layers if x <= layer < y)
    if in_body:
        raise ValueError(f"the adapter adapts layers {in_body}, which the body server runs (layers [{x}, {y})); "
                         f"use a split whose head and tail hold them, or an adapter trained on this split")
    by_layer = {stack.start + j: layer for stack in stacks for j, layer in enumerate(stack.layers)}
    merged = 0
    for (index, path), (a, b) in adapter.pairs().items():
        layer = by_layer.get(index)
        if layer is None:
            raise ValueError(f"the adapter adapts layer {index}, which this device does not hold")
        try:
            linear = layer.get_submodule(path)
        except AttributeError:
            raise ValueError(f"the adapter adapts {path} of layer {index}, which this model does not have") from None
        if tuple(a.shape) != (adapter.spec.r, linear.in_features) or tuple(b.shape) != (linear.out_features,
                                                                                         adapter.spec.r):
            raise ValueError(f"the adapter's {path} of layer {index} has shapes {list(a.shape)}, {list(b.shape)}; "
                             f"this model's layer is {linear.out_features} x {linear.in_features}: another model?")
        scale = adapter.spec.alpha / adapter.spec.r
        # a new tensor, not an in-place add: the loaded weight may share memory with the checkpoint
        linear.weight.data = linear.weight + (b.to(linear.weight.dtype) @ a.to(linear.weight.dtype)) * scale
        merged += 1
    return merged
