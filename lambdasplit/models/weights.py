"""Read only the tensors a side needs from safetensors files, and fingerprint them.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range, then the raw data. Reading the header lets each side load exactly
its own layers, and lets the device fingerprint the cloud's layers without loading them.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..util.atomic import write_text
from ..util.cache import cache_root


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


_LAYER = re.compile(r"^(.*?\b(?:layers|h)\.\d+)\.")  # a decoder layer's keys: model.layers.3.*, transformer.h.3.*


class WeightIndex:
    """Every tensor of a model folder: where it lives, its dtype and shape."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.entries: dict[str, TensorEntry] = {}
        self.loaded: set[str] = set()  # checkpoint keys this process has read: what it holds
        for file in sorted(self.folder.glob("*.safetensors")):
            self.entries.update(_read_header(file))
        if not self.entries:
            raise FileNotFoundError(f"no safetensors tensors in {self.folder}")

    def keys_with_prefix(self, prefix: str) -> list[str]:
        return sorted(k for k in self.entries if k.startswith(prefix))

    def load(self, keys: list[str], dtype: torch.dtype, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Load the named tensors (and only those), cast to `dtype`, onto `device`."""
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.entries[key].file, []).append(key)
        out = {}
        for file, names in by_file.items():
            with safe_open(str(file), framework="pt") as f:
                for name in names:
                    # a copy, not a view of the mapped file: the weights are resident from the start, so the
                    # first request pays no page faults and the reported memory is what the process holds
                    out[name] = f.get_tensor(name).to(device=device, dtype=dtype, copy=True)
        self.loaded.update(keys)
        return out

    def loaded_groups(self) -> list[str]:
        """What was loaded, by module: 'model.layers.3', 'model.embed_tokens', 'transformer.h.3' (GPT-2), ..."""
        groups = {m[1] if (m := _LAYER.match(k)) else k.rsplit(".", 1)[0] for k in self.loaded}
        return sorted(groups, key=lambda g: (g.count("."), [int(t) if t.isdigit() else t for t in g.split(".")]))

    def digest(self, keys: list[str]) -> str:
        """sha256 over names, dtypes, shapes and raw bytes of `keys`, cached per file version. A folder
        converted from GGUF carries each tensor's digest as float32 (lambdasplit.json): those count, so every
        storage dtype of one source fingerprints alike."""
        cache = _DigestCache(self.folder)
        recorded = _recorded_digests(self.folder)
        h = hashlib.sha256()
        for key in sorted(keys):
            h.update(key.encode())
            h.update((recorded.get(key) or cache.get(key, self.entries[key])).encode())
        cache.save()
        return h.hexdigest()


def tensor_digest(tensor: torch.Tensor) -> str:
    """The digest `WeightIndex.digest` takes of a float32 tensor: sha256 of its dtype, shape and bytes."""
    t = tensor.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(f"F32{tuple(t.shape)}".encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


def _recorded_digests(folder: Path) -> dict[str, str]:
    try:
        return dict(json.loads((folder / "lambdasplit.json").read_text()).get("digests") or {})
    except (OSError, ValueError, AttributeError):
        return {}


def _read_header(file: Path) -> dict[str, TensorEntry]:
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    base = 8 + n
    entries = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        entries[name] = TensorEntry(file, meta["dtype"], tuple(meta["shape"]), base + begin, base + end)
    return entries


class _DigestCache:
    """Per-tensor sha256 of raw bytes, remembered in the user cache keyed by file path, size and mtime."""

    def __init__(self, folder: Path):
        key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
        self.path = cache_root() / "digests" / f"{key}.json"
        try:
            self.data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.data = {}
        self.dirty = False

    def get(self, name: str, entry: TensorEntry) -> str:
        st = entry.file.stat()
        slot = f"{entry.file.name}|{st.st_size}|{st.st_mtime_ns}|{name}"
        if slot not in self.data:
            h = hashlib.sha256(f"{entry.dtype}{entry.shape}".encode())
            with open(entry.file, "rb") as f:
                f.seek(entry.start)
                remaining = entry.end - entry.start
                while remaining:
                    chunk = f.read(min(remaining, 1 << 24))
                    h.update(chunk)
                    remaining -= len(chunk)
            self.data[slot] = h.hexdigest()
            self.dirty = True
        return self.data[slot]

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            write_text(self.path, json.dumps(self.data))
        except OSError:
            pass  # a read-only cache only costs a re-hash next time
