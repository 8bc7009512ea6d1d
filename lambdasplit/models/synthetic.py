"""A Llama checkpoint of any size with seeded random weights: the paper's scale without downloading a model.

    config.json                        a LlamaConfig (Llama-2-7B's by default)
    model-000NN-of-000MM.safetensors   bf16 shards of about 1 GiB, written one at a time
    model.safetensors.index.json       the weight map, as transformers writes it
    tokenizer.json, ...                a byte-level tokenizer (259 ids: <unk> <s> </s> and the 256 bytes)
    lambdasplit.json                   its name, the spec, each tensor's digest (written last)

Weights are N(0, 0.02) (norm weights 1; the tiny preset scales the std with its width), each tensor from its
own generator seeded by the spec's seed and the tensor's name, so the same spec always gives the same bytes.
The activations stay finite through 32 layers; the text the model writes means nothing, but memory, speed
and traffic are those of a real model of the same shape. The folder is written into a staging folder and
renamed once complete, under a lock, so a reader never sees half a checkpoint, and a finished one is reused.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .source import cache_root
from .weights import tensor_digest

FORMAT_VERSION = 1  # bump when the bytes a spec gives change
SHARD_BYTES = 1 << 30
BYTE_VOCAB = 259  # <unk>, <s>, </s>, then one id per byte


@dataclass(frozen=True)
class SyntheticSpec:
    """The shape of a Llama decoder, and the seed of its weights."""

    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    seed: int = 0
    std: float = 0.02  # of every weight but the norms' (Llama-2's initializer_range)
    max_positions: int = 4096

    def __post_init__(self):
        if min(self.layers, self.hidden, self.heads, self.ffn) < 1:
            raise ValueError(f"layers, hidden, heads and ffn must be positive: {self}")
        if self.hidden % self.heads or (self.hidden // self.heads) % 2:
            raise ValueError(f"hidden size {self.hidden} must split into {self.heads} heads of an even width")
        if self.vocab < BYTE_VOCAB:
            raise ValueError(f"the vocabulary must hold the byte-level tokenizer's {BYTE_VOCAB} ids, got {self.vocab}")

    @property
    def name(self) -> str:
        return (f"synthetic-llama-L{self.layers}-D{self.hidden}-H{self.heads}-F{self.ffn}-V{self.vocab}"
                f"-std{self.std:g}-s{self.seed}")

    def with_overrides(self, **fields) -> "SyntheticSpec":
        """This spec with the given fields replaced (None leaves a field as it is)."""
        return replace(self, **{k: v for k, v in fields.items() if v is not None})

    def config(self):
        from transformers import LlamaConfig

        return LlamaConfig(hidden_size=self.hidden, intermediate_size=self.ffn, num_hidden_layers=self.layers,
                           num_attention_heads=self.heads, num_key_value_heads=self.heads, vocab_size=self.vocab,
                           max_position_embeddings=self.max_positions, rms_norm_eps=1e-5, tie_word_embeddings=False,
                           bos_token_id=1, eos_token_id=2, dtype="bfloat16")

    def tensors(self) -> dict[str, tuple[int, ...]]:
        """Checkpoint key -> shape, in the order transformers' Llama holds them (from a meta-device model)."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self.config())
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}

    @property
    def parameters(self) -> int:
        per_layer = 4 * self.hidden ** 2 + 3 * self.hidden * self.ffn + 2 * self.hidden
        return self.layers * per_layer + 2 * self.vocab * self.hidden + self.hidden

    @property
    def checkpoint_bytes(self) -> int:
        """Bytes of the bf16 shards (the JSON files beside them are a few kB)."""
        return 2 * self.parameters


LLAMA2_7B = SyntheticSpec(layers=32, hidden=4096, heads=32, ffn=11008, vocab=32000)
"""Llama-2-7B's exact shape: 6,738,415,616 parameters, 13.5 GB in bf16."""
TINY = SyntheticSpec(layers=4, hidden=128, heads=4, ffn=352, vocab=512, std=0.02 * (4096 / 128) ** 0.5,
                     max_positions=512)
"""The same code path in a few MB (every width a multiple of 32, so int4 groups divide it). Its std keeps
each projection's gain (std x sqrt(D)) at the 7B's, so its layers move the residual stream as much, and
its greedy ids vary (with 0.02 at D = 128 they repeat one token)."""
PRESETS = {"llama2-7b": LLAMA2_7B, "tiny": TINY}


def checkpoint_folder(spec: SyntheticSpec, root: Path | None = None) -> Path:
    return Path(root or cache_root()) / "models" / spec.name


def is_complete(folder: Path, spec: SyntheticSpec) -> bool:
    """A finished checkpoint of exactly this spec: its manifest matches and every shard has its size."""
    try:
        manifest = json.loads((folder / "lambdasplit.json").read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("synthetic") != {**asdict(spec), "version": FORMAT_VERSION}:
        return False
    shards = manifest.get("shards") or {}
    return bool(shards) and all((folder / name).is_file() and (folder / name).stat().st_size == size
                                for name, size in shards.items())


def ensure_checkpoint(spec: SyntheticSpec, root: Path | None = None, progress: bool = True) -> tuple[Path, bool]:
    """The folder of `spec`'s checkpoint, written now if it is not there yet; and whether it was written now."""
    folder = checkpoint_folder(spec, root)
    if is_complete(folder, spec):
        return folder, False
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{spec.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process writing the same spec: wait, then reuse its folder
        if is_complete(folder, spec):
            return folder, False
        staging = folder.parent / f".{spec.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)  # left by a run that was killed (we hold the lock)
        shutil.rmtree(folder, ignore_errors=True)  # an incomplete or outdated one: its disk is needed
        staging.mkdir()
        try:
            _write(spec, staging, progress)
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder, True


def _write(spec: SyntheticSpec, staging: Path, progress: bool) -> None:
    from safetensors.torch import save_file
    from tqdm import tqdm

    shapes = spec.tensors()
    groups = _shards(shapes)
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map, digests, sizes = {}, {}, {}
    with tqdm(total=spec.checkpoint_bytes, unit="B", unit_scale=True, desc=f"writing {spec.name}",
              disable=not progress) as bar:
        for name, keys in zip(names, groups):
            shard = {}
            for key in keys:  # one shard in memory at a time (about 1 GiB)
                shard[key] = random_tensor(key, shapes[key], spec.seed, spec.std)
                digests[key] = tensor_digest(shard[key])
                weight_map[key] = name
            save_file(shard, str(staging / name), metadata={"format": "pt"})
            sizes[name] = (staging / name).stat().st_size
            bar.update(sum(t.numel() * t.element_size() for t in shard.values()))
            del shard
    spec.config().save_pretrained(staging)
    _byte_tokenizer().save_pretrained(staging)
    index = {"metadata": {"total_size": spec.checkpoint_bytes}, "weight_map": weight_map}
    (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    manifest = {"name": f"{spec.name} (random weights)", "synthetic": {**asdict(spec), "version": FORMAT_VERSION},
                "shards": sizes, "digests": digests}
    (staging / "lambdasplit.json").write_text(json.dumps(manifest))  # last: its presence marks a full folder


def _shards(shapes: dict[str, tuple[int, ...]]) -> list[list[str]]:
    """Keys packed in order into shards of at most SHARD_BYTES (a larger tensor gets a shard of its own)."""
    groups, size = [[]], 0
    for key, shape in shapes.items():
        nbytes = 2 * _numel(shape)
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    return groups


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def random_tensor(key: str, shape: tuple[int, ...], seed: int, std: float = 0.02) -> torch.Tensor:
    """One checkpoint tensor in bf16: ones for a norm's weight, else N(0, std) from a generator seeded by
    (seed, key), so each tensor is the same whatever else the checkpoint holds."""
    if key.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{key}".encode()))  # the CPU generator keeps 32 bits
    return torch.empty(shape).normal_(0.0, std, generator=generator).to(torch.bfloat16)


def _byte_tokenizer():
    """A tokenizer that any text fits: one id per UTF-8 byte (GPT-2's byte alphabet), no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{ch: i + 3 for i, ch in enumerate(alphabet)}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
