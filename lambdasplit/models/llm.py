"""How a decoder-only LLM is cut into head, body and tail.

    head = embed_tokens + layers[0, X)        (device)
    body = layers[X, Y)                       (cloud)
    tail = layers[Y, N) + norm + lm_head      (device)

Each part drives the stock transformers decoder-layer modules (no forward code is copied) over
its own `DynamicCache`, and holds only its own weights: the model is built on the meta device
and each part materialises just the tensors it needs from the safetensors files.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, PretrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .compiled import DecodeStep
from .device import resolve_device
from .families import (
    LLAMA,
    REFUSED,
    VERIFIED_TYPES,  # noqa: F401  (re-exported: the types a split is exact for)
    Family,
    UnsupportedFamilyError,
    family_for,
    layout,
)
from .formats import (
    WeightFormat,
    check_format,
    choose_format,
    quantize_head,
    quantize_module,
    weight_bytes,
    weight_tensors,
)
from .kvcache import cached_length, layer_types, new_cache, truncate_cache  # noqa: F401  (re-exported)
from .source import resolve_model
from .weights import WeightIndex

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class UnsupportedModelError(ValueError):
    """The model is not a decoder-only LLM of the Llama family."""


@dataclass(frozen=True)
class Split:
    """Split points 0 <= x <= y <= n: head runs [0, x), body [x, y), tail [y, n)."""

    x: int
    y: int
    n: int

    @classmethod
    def resolve(cls, x: int, y: int, n: int) -> "Split":
        """Negative x or y count from the end, as in the paper's CLI (-1 means n - 1)."""
        rx, ry = (x + n if x < 0 else x), (y + n if y < 0 else y)
        if not 0 <= rx <= ry <= n:
            resolved = f" (that is {rx}:{ry})" if (rx, ry) != (x, y) else ""
            raise ValueError(f"split {x}:{y}{resolved} is out of range: need 0 <= X <= Y <= N = {n} "
                             "(negative values count from the end)")
        return cls(rx, ry, n)

    @classmethod
    def parse(cls, text: str, n: int) -> "Split":
        """Parse and resolve 'X:Y' (for example '1:-1')."""
        return cls.resolve(*parse_split(text), n)

    def __str__(self) -> str:
        return f"{self.x}:{self.y}"


def parse_split(text: str) -> tuple[int, int]:
    """'X:Y' -> (X, Y), still unresolved (negative values count from the end once N is known)."""
    try:
        x, y = (int(v) for v in text.split(":"))
    except ValueError:
        raise ValueError(f"split must look like X:Y (for example 1:-1), got {text!r}") from None
    return x, y


def resolve_split(model: str | Path | None, split: str, storage: str = "float32") -> tuple[Path, PretrainedConfig, Split]:
    """A model spec and 'X:Y' -> the local folder (a GGUF file converted to `storage`), its config, and the
    resolved split."""
    folder = resolve_model(model, storage=storage)
    config = load_config(folder)
    return folder, config, Split.parse(split, config.num_hidden_layers)


def load_config(folder: Path) -> PretrainedConfig:
    config = AutoConfig.from_pretrained(folder)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{config.model_type} is an encoder-decoder model; lambdasplit splits decoder-only LLMs")
    return config


def fingerprint(config: PretrainedConfig, index: WeightIndex, x: int, y: int) -> str:
    """A hash of the architecture and the weights of layers [x, y): what the body must agree on."""
    arch = config.to_dict()
    for volatile in ("transformers_version", "_name_or_path", "_model_name_or_path", "dtype", "torch_dtype",
                     "use_cache", "quantization_config", "architectures"):
        arch.pop(volatile, None)
    family = layout(config)
    prefix = family.prefix(index.entries)
    keys = [k for i in range(x, y) for k in index.keys_with_prefix(family.layer_prefix(prefix, i))]
    h = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode())
    h.update(f"|layers {x}:{y}|".encode())
    h.update(index.digest(keys).encode())
    return h.hexdigest()


class _Skeleton:
    """The model built on the meta device: module shapes and classes, no memory."""

    def __init__(self, config: PretrainedConfig):
        if config.model_type in REFUSED:  # known, and known not to split exactly: say why before building
            self._verify(config)
        try:
            with torch.device("meta"):
                self.model = AutoModelForCausalLM.from_config(config)
        except ValueError as exc:  # no causal-LM class, or no SDPA attention for this model type
            raise UnsupportedModelError(f"transformers cannot build a causal LM of type {config.model_type!r} "
                                        f"with {config._attn_implementation} attention: {exc}") from exc
        family = layout(config)
        required = [f"{family.base}.{name}" for name in (family.embed, family.layers, family.norm, family.rotary)
                    if name] + ["lm_head"]
        missing = [path for path in required if _get(self.model, path) is None]
        if missing:
            raise UnsupportedModelError(
                f"{type(self.model).__name__} is not a decoder lambdasplit can split: it lacks {', '.join(missing)} "
                f"(a {family.name}-layout model needs {', '.join(required)})"
            )
        self.family = self._verify(config)
        self.decoder = self.family.decoder(self.model)

    @staticmethod
    def _verify(config: PretrainedConfig) -> Family:
        try:
            return family_for(config)
        except UnsupportedFamilyError as exc:
            raise UnsupportedModelError(str(exc)) from None


def _get(obj, path: str):
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


class LayerStack(nn.Module):
    """Stock decoder layers [start, stop) run over a per-session cache; the core of every part."""

    def __init__(self, config: PretrainedConfig, skeleton: _Skeleton, index: WeightIndex,
                 start: int, stop: int, fmt: WeightFormat, device: torch.device):
        super().__init__()
        self.config, self.start, self.stop, self.family = config, start, stop, skeleton.family
        self.dtype = fmt.dtype
        self.decode_step: DecodeStep | None = None  # compile(): one compiled graph for single-position steps
        self.types = layer_types(config)[start:stop]
        layers = [getattr(skeleton.decoder, self.family.layers)[i] for i in range(start, stop)]
        self.layers = nn.ModuleList(layers)
        self.kv_name = cache_keyword(type(layers[0]).forward) if layers else "cache"
        prefix = self.family.prefix(index.entries)
        for i, layer in zip(range(start, stop), layers):  # one layer at a time: a quantized format never holds
            _materialise(layer, index, {self.family.layer_prefix(prefix, i): ""}, fmt.dtype, device,  # more than
                         self.family)  # one in float
            quantize_module(layer, fmt, skip=tuple(m for name, m in layer.named_modules()
                                                    if name in self.family.keep_float))
        # no weights: the rotary tables come from the config
        self.rotary = self.family.make_rotary(skeleton.decoder, config, device)

    def new_cache(self) -> DynamicCache:
        return new_cache(self.config)

    def compile(self) -> float:
        """Run single-position steps of a cached session through one compiled graph (models/compiled.py),
        compiled now; the seconds compiling took (0 for a stack without layers)."""
        if not len(self.layers):
            return 0.0
        self.decode_step = DecodeStep(self)
        return self.decode_step.warm_up()

    def layer_inputs(self, hidden: torch.Tensor, positions: torch.Tensor,
                     masks: dict[str, torch.Tensor | None]) -> dict[str, dict]:
        """What each attention kind's layers take besides the hidden state, positions and cache: its mask,
        and what the family adds (rotary tables, ALiBi biases)."""
        extra = self.family.layer_inputs(self.config, self.rotary, hidden, positions, masks)
        return {kind: {"attention_mask": mask, **extra[kind]} for kind, mask in masks.items()}

    def run_layer(self, j: int, hidden: torch.Tensor, positions: torch.Tensor, inputs: dict, cache) -> torch.Tensor:
        """Layer `self.start + j` (stock) on `hidden`; its output hidden state."""
        out = self.layers[j](hidden, position_ids=positions, use_cache=cache is not None, **inputs,
                             **{self.kv_name: cache})
        return out[0] if isinstance(out, tuple) else out

    def forward(self, hidden: torch.Tensor, cache: DynamicCache | None, pos: int,
                start: int | None = None, stop: int | None = None, positions: torch.Tensor | None = None,
                compiled: bool = True) -> torch.Tensor:
        """Run layers [start, stop) (default: all of this stack) on hidden (1, L, D) at positions pos..pos+L
        (`positions`, if the caller has them already: (1, L)). A compiled stack takes its compiled step where it
        applies, unless `compiled` is False (a step with adapters active)."""
        start = self.start if start is None else start
        stop = self.stop if stop is None else stop
        if start == stop:
            return hidden
        if compiled and self.decode_step is not None and self.decode_step.applies(hidden, cache, start, stop):
            return self.decode_step(hidden, cache, pos, start, stop)
        if positions is None:
            positions = torch.arange(pos, pos + hidden.shape[1], device=hidden.device).unsqueeze(0)
        inputs = self.layer_inputs(hidden, positions, self._masks(hidden, cache, positions, start, stop))
        for i in range(start, stop):
            j = i - self.start
            hidden = self.run_layer(j, hidden, positions, inputs[self.types[j]], cache)
        return hidden

    def _masks(self, hidden, cache, positions, start, stop) -> dict[str, torch.Tensor | None]:
        masks = {}
        for kind in dict.fromkeys(self.types[start - self.start:stop - self.start]):
            first = start + self.types[start - self.start:].index(kind)
            make = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
            skip = {"allow_is_causal_skip": False} if self.family.full_masks else {}
            masks[kind] = make(config=self.config, inputs_embeds=hidden, attention_mask=None,
                               position_ids=positions, layer_idx=first, **skip, **{_MASK_KV[make]: cache})
        return masks


def cache_keyword(fn) -> str:
    """The name a transformers function takes its KV cache by: `cache` since transformers 5.24,
    `past_key_values` before (5.24 still takes the old name, with a warning, until 5.40), `layer_past`
    in the GPT-NeoX, Falcon and Bloom layers."""
    params = inspect.signature(fn).parameters
    return next((name for name in ("cache", "layer_past") if name in params), "past_key_values")


_MASK_KV = {make: cache_keyword(make) for make in (create_causal_mask, create_sliding_window_causal_mask)}


def _materialise(module: nn.Module, index: WeightIndex, renames: dict[str, str], dtype: torch.dtype,
                 device: torch.device, family: Family = LLAMA) -> None:
    """Load `module`'s tensors from the checkpoint (keys renamed by prefix, converted to the module's
    layout by its family) and assign them in place."""
    wanted = set(module.state_dict().keys())
    keys, local = [], {}
    for prefix, new in renames.items():
        for key in index.keys_with_prefix(prefix):
            name = new + key[len(prefix):]
            if name in wanted or family.fused_checkpoint:
                keys.append(key)
                local[key] = name
    tensors = index.load(keys, dtype, device)
    state = family.convert({local[k]: v for k, v in tensors.items()}, wanted)
    state = {name: tensor for name, tensor in state.items() if name in wanted}
    missing = wanted - state.keys()
    if missing:
        raise UnsupportedModelError(f"checkpoint lacks tensors {sorted(missing)[:5]} (prefixes {list(renames)})")
    module.load_state_dict(state, strict=True, assign=True)
    family.fill_buffers(module, device)


class Head(nn.Module):
    """Device side, first part: token ids -> embeddings -> layers [0, X)."""

    def __init__(self, config, skeleton, index, x: int, fmt: WeightFormat, device: torch.device):
        super().__init__()
        family, prefix = skeleton.family, skeleton.family.prefix(index.entries)
        self.family = family
        # a lookup, never quantized: a quantized format keeps it in fp16 and widens the rows it looks up
        self.embed = getattr(skeleton.decoder, family.embed)
        lookup = fmt.table
        _materialise(self.embed, index, {f"{prefix}{family.embed}.": ""}, lookup, device, family)
        self.extras = nn.ModuleDict({name: getattr(skeleton.decoder, name) for name in family.head_modules})
        for name, module in self.extras.items():
            _materialise(module, index, {f"{prefix}{name}.": ""}, lookup, device, family)
        self.dtype = fmt.dtype
        self.layers = LayerStack(config, skeleton, index, 0, x, fmt, device)

    def forward(self, ids: torch.Tensor, cache: DynamicCache | None, pos: int) -> torch.Tensor:
        positions = torch.arange(pos, pos + ids.shape[-1], device=ids.device).unsqueeze(0)
        return self.layers(self.family.embed_ids(self, ids, positions).to(self.dtype), cache, pos, positions=positions)


class Body(nn.Module):
    """Cloud side: layers [X, Y). Never holds the embeddings, the final norm or the LM head."""

    def __init__(self, config, skeleton, index, x: int, y: int, fmt: WeightFormat, device: torch.device):
        super().__init__()
        self.layers = LayerStack(config, skeleton, index, x, y, fmt, device)

    def forward(self, hidden, cache, pos, start=None, stop=None, compiled: bool = True) -> torch.Tensor:
        return self.layers(hidden, cache, pos, start, stop, compiled=compiled)


class Tail(nn.Module):
    """Device side, last part: layers [Y, N) -> final norm -> LM head -> logits."""

    def __init__(self, config, skeleton, index, y: int, fmt: WeightFormat, device: torch.device):
        super().__init__()
        family, prefix = skeleton.family, skeleton.family.prefix(index.entries)
        self.config, self.family = config, family
        self.layers = LayerStack(config, skeleton, index, y, config.num_hidden_layers, fmt, device)
        self.norm = getattr(skeleton.decoder, family.norm)
        _materialise(self.norm, index, {f"{prefix}{family.norm}.": ""}, fmt.dtype, device, family)
        self.lm_head = skeleton.model.lm_head
        head_key = next((k for k in family.lm_head_keys if f"{k}weight" in index.entries), None)
        self.tied = head_key is None and bool(getattr(config, "tie_word_embeddings", False))
        source = f"{prefix}{family.embed}." if self.tied else (head_key or family.lm_head_keys[0])
        _materialise(self.lm_head, index, {source: ""}, fmt.dtype, device, family)
        # the LM head is the largest matrix a token reads: quantized like the layers, its top logits rescored
        self.lm_head = quantize_head(self.lm_head, fmt)

    def forward(self, hidden, cache, pos, last_only: bool = True) -> torch.Tensor:
        """Logits for the last position (or for all positions when last_only is False)."""
        hidden = self.layers(hidden, cache, pos)
        if last_only:
            hidden = hidden[:, -1:]
        return self.family.logits(self.config, self.lm_head(self.norm(hidden)))


@dataclass
class SplitModel:
    """The parts one side holds, with the facts both sides must agree on."""

    folder: Path
    config: PretrainedConfig
    split: Split
    weights: WeightFormat
    device: torch.device
    index: WeightIndex
    head: Head | None = None
    body: Body | None = None
    tail: Tail | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the hidden states each part takes and gives)."""
        return self.weights.dtype

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def max_positions(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 2048))

    def body_fingerprint(self, x: int | None = None, y: int | None = None) -> str:
        return fingerprint(self.config, self.index, self.split.x if x is None else x, self.split.y if y is None else y)

    def compile(self) -> float:
        """Compile each loaded part's single-position step now (models/compiled.py); the seconds it took."""
        return sum(part.layers.compile() for part in self.parts().values())

    def parts(self) -> dict[str, nn.Module]:
        return {name: part for name in ("head", "body", "tail") if (part := getattr(self, name)) is not None}

    def parameter_report(self) -> dict[str, dict[str, int]]:
        """Parameters and bytes held by each loaded part, and in all (a tensor shared by parts counts once);
        quantized weights count at their packed size."""
        report, seen = {}, {}
        for name, part in self.parts().items():
            tensors = weight_tensors(part)
            report[name] = {"params": sum(n for n, _ in tensors.values()), "bytes": sum(b for _, b in tensors.values())}
            seen.update(tensors)
        report["total"] = {"params": sum(n for n, _ in seen.values()), "bytes": sum(b for _, b in seen.values())}
        return report

    def weight_bytes_per_token(self) -> int:
        """Weight bytes one decode step reads through the held layers, norm and LM head (the embedding is a
        lookup of one row, so it does not count)."""
        parts = [m for part in self.parts().values() for m in (part.layers, getattr(part, "norm", None),
                                                               getattr(part, "lm_head", None)) if m is not None]
        return sum(weight_bytes(m) for m in parts)


def load_split(folder: Path, x: int, y: int, parts: tuple[str, ...] = ("head", "tail"),
               dtype: str | torch.dtype = "float32", *, weights: str | WeightFormat | None = None,
               device: str | torch.device = "cpu") -> SplitModel:
    """Load the named parts of a split model from a local folder; only their weights are read.

    `weights` is the format the parts are held in (models/formats.py; `dtype` is its older name: a float
    format), `device` where they compute. Both are checked before any weight loads.
    """
    folder = Path(folder)
    device = resolve_device(device)
    fmt = choose_format(weights or dtype, device)
    config = load_config(folder)
    config._attn_implementation = layout(config).attention(config)
    split = Split.resolve(x, y, config.num_hidden_layers)
    skeleton = _Skeleton(config)
    check_format(fmt, device, sorted({m.in_features for m in skeleton.model.modules() if isinstance(m, nn.Linear)}))
    index = WeightIndex(folder)
    model = SplitModel(folder, config, split, fmt, device, index)
    if "head" in parts:
        model.head = Head(config, skeleton, index, split.x, fmt, device).eval()
    if "body" in parts:
        model.body = Body(config, skeleton, index, split.x, split.y, fmt, device).eval()
    if "tail" in parts:
        model.tail = Tail(config, skeleton, index, split.y, fmt, device).eval()
        if model.head is not None and model.tail.tied:  # one table on the device, not two
            if fmt.quantized:
                model.tail.lm_head.rows = model.head.embed.weight
            else:
                model.tail.lm_head.weight = model.head.embed.weight
    for name, part in model.parts().items():
        part.requires_grad_(False)
        left = [n for n, t in [*part.named_parameters(), *part.named_buffers()] if t is not None and t.is_meta]
        if left:
            raise UnsupportedModelError(f"the {name} of {config.model_type} has tensors the checkpoint does not "
                                        f"provide: {', '.join(left[:5])}")
    return model
