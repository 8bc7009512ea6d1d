"""Nothing in the package may unpickle: not the frames, not the weights, not the caches."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lambdasplit"
SOURCES = sorted(PACKAGE.rglob("*.py"))

FORBIDDEN = [
    (r"\bpickle\s*\.\s*loads?\s*\(", "pickle.load / pickle.loads"),
    (r"\bpickle\s*\.\s*Unpickler\b", "pickle.Unpickler"),
    (r"\btorch\s*\.\s*load\s*\(", "torch.load("),
    (r"\bcloudpickle\b", "cloudpickle"),
    (r"\bdill\s*\.\s*loads?\s*\(", "dill.load"),
    (r"\bjoblib\s*\.\s*load\s*\(", "joblib.load"),
    (r"\bmarshal\s*\.\s*loads?\s*\(", "marshal.load"),
    (r"\bshelve\b", "shelve"),
    (r"allow_pickle\s*=\s*True", "allow_pickle=True"),
    (r"\b(?:numpy|np)\s*\.\s*load\s*\([^)]*allow_pickle", "numpy.load with allow_pickle"),
    (r"trust_remote_code\s*=\s*True", "trust_remote_code=True"),
]


def test_sources_found():
    names = {p.relative_to(PACKAGE).as_posix() for p in SOURCES}
    assert {"wire/frame.py", "models/weights.py", "server/app.py", "client/transport.py"} <= names


@pytest.mark.parametrize("pattern, what", FORBIDDEN, ids=[w for _, w in FORBIDDEN])
def test_no_unpickling(pattern, what):
    hits = []
    for path in SOURCES:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(pattern, line):
                hits.append(f"{path.relative_to(PACKAGE)}:{n}: {line.strip()}")
    assert not hits, f"{what} found:\n" + "\n".join(hits)


def test_no_pickle_imports():
    """Belt and braces: no module imports pickle-family modules at all."""
    bad = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "marshal", "shelve"}
    hits = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            hits += [f"{path.relative_to(PACKAGE)}:{node.lineno}: {name}" for name in names if name in bad]
    assert not hits, "\n".join(hits)


def test_weights_are_read_as_safetensors_only():
    text = (PACKAGE / "models" / "weights.py").read_text()
    assert "safe_open" in text
    assert ".bin" not in text and ".pt\"" not in text and ".pth" not in text


def test_frame_header_refuses_binary_blobs():
    """msgpack ext types and bins could smuggle objects; the header decoder must refuse them."""
    text = (PACKAGE / "wire" / "frame.py").read_text()
    assert "max_bin_len=0" in text
    assert "object_hook" not in text and "ext_hook" not in text
