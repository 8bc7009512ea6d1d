"""The package's shape: imports run down the layers, no circles, nothing imports the CLI, small modules.

The layers, top to bottom (a module may import its own layer and the ones below it):

    cli                          the `lambdasplit` command; nothing imports it
    bench                        measures the applications below
    web, tune, plan, digits      applications
    privacy                      the leakage assessment (plan and web read its results)
    client, server               the device side and the body server (a server forwarding to the next
                                 hop, or running the cloud-only baseline, is itself a client)
    models, net                  cutting models into parts; links, capture and the observer's parsers
    wire                         frames and codecs
    util, data                   files, reports, shipped texts and models
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lambdasplit"
LAYERS = [("cli", "__main__"), ("bench",), ("web", "tune", "plan", "digits", "browser"), ("privacy",), ("client", "server"),
          ("models", "net"), ("wire",), ("util", "data")]
LAYER = {group: depth for depth, groups in enumerate(LAYERS) for group in groups}
# imports against the layers, each with its reason (at most three)
EXCEPTIONS = {
    ("lambdasplit", "lambdasplit.client.generate"): "the package's front door: `from lambdasplit import SplitClient`",
    ("lambdasplit", "lambdasplit.client.sampling"): "the package's front door: `from lambdasplit import SamplingParams`",
    ("lambdasplit", "lambdasplit.client.options"): "the package's front door: `from lambdasplit import ConnectionOptions`",
}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """module -> the lambdasplit modules it imports, at module level or inside functions."""
    known = modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                candidates = [f"{target}.{alias.name}" for alias in node.names] + [target]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            for candidate in candidates:
                while candidate and candidate not in known:
                    candidate = candidate.rpartition(".")[0]
                if candidate.startswith("lambdasplit") and candidate != name:
                    graph[name].add(candidate)
                    break
    return graph


def group(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in list(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_every_package_has_a_layer():
    groups = {group(m) for m in modules()} - {""}
    assert groups <= set(LAYER), f"packages without a layer in this test: {sorted(groups - set(LAYER))}"


def test_no_import_circles_between_modules():
    assert cycles(import_graph()) == []


def test_no_import_circles_between_packages():
    packages: dict[str, set[str]] = defaultdict(set)
    for source, targets in import_graph().items():
        for target in targets:
            if group(source) and group(target) and group(source) != group(target):
                packages[group(source)].add(group(target))
    assert cycles(packages) == []


def test_imports_run_down_the_layers():
    against = []
    for source, targets in import_graph().items():
        for target in targets:
            if (source, target) in EXCEPTIONS or not group(target) or group(source) == group(target):
                continue
            if not group(source) or LAYER[group(target)] < LAYER[group(source)]:
                against.append(f"{source} -> {target}")
    assert sorted(against) == [], "imports against the layers (see this module's docstring)"
    assert len(EXCEPTIONS) <= 3


def test_nothing_in_the_library_imports_the_cli():
    users = sorted(s for s, targets in import_graph().items() for t in targets
                   if group(t) == "cli" and group(s) not in ("cli", "__main__"))
    assert users == []


def test_importing_the_library_loads_no_cli_module():
    code = ("import sys, lambdasplit.server, lambdasplit.client, lambdasplit.privacy, lambdasplit.bench, "
            "lambdasplit.server.app, lambdasplit.client.generate, lambdasplit.web.app, lambdasplit.plan.scenario, "
            "lambdasplit.tune.train, lambdasplit.privacy.eavesdrop, lambdasplit.bench.table1; "
            "print(sorted(m for m in sys.modules if m == 'lambdasplit.cli' or m.startswith('lambdasplit.cli.')))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_the_cli_imports_no_torch():
    """`lambdasplit --help` stays quick: the parsers import no heavy module."""
    code = "import sys, lambdasplit.cli as c; c.build_parser(); print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "False", run.stderr


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_and_functions_stay_small(path):
    source = path.read_text(encoding="utf-8")
    assert source.count("\n") < MAX_MODULE_LINES, f"{path.name} has {source.count(chr(10))} lines"
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []
