"""Optional dependencies: the packages only some commands need, installed with an extra of lambdasplit.

`pip install lambdasplit` brings what a text device or a body server needs. Images, charts, the benches'
metrics and Ray Serve come with extras (docs/install.md); a command that needs one missing says which:

    this needs the 'images' extra (diffusers is not installed): pip install 'lambdasplit[images]'
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

# the distribution each optional module comes from, where its name differs
_DISTRIBUTION = {"PIL": "pillow", "sklearn": "scikit-learn", "skimage": "scikit-image"}


class MissingExtra(RuntimeError, ImportError):
    """An optional package is not installed. A RuntimeError, so that the CLI prints it as `error: ...`;
    an ImportError, so that code guarding an optional import catches it too."""

    def __init__(self, module: str, extra: str):
        top = module.partition(".")[0]
        self.module, self.extra = module, extra
        super().__init__(f"this needs the '{extra}' extra ({_DISTRIBUTION.get(top, top)} is not installed): "
                         f"pip install 'lambdasplit[{extra}]'")


def require(module: str, extra: str) -> ModuleType:
    """Import and return `module`, or raise MissingExtra naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        top = module.partition(".")[0]
        if exc.name is not None and exc.name.partition(".")[0] != top:
            raise  # the package is there but broken: its own error says more
        raise MissingExtra(module, extra) from None


def check(module: str, extra: str) -> None:
    """Raise MissingExtra unless top-level `module` is installed, without importing it (a cheap early check
    before a long run that needs it at the end)."""
    if importlib.util.find_spec(module) is None:
        raise MissingExtra(module, extra)
