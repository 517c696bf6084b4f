"""The import graph of ``src/attnlab``: no circle anywhere, and imports flow down the layers.

Every import statement counts, at any depth (module level, inside functions, under
``if TYPE_CHECKING:``), ``from . import x`` and ``from .mod import y`` included. A
submodule importing its own parent package is not an edge (Python has already started
importing the parent when a submodule loads).

The layers, bottom to top (DESIGN.md, "Where the structure is going"); a module may
import its own layer and the ones below, never one above:

0. foundation — files and paths, devices, processes (``io``, ``layout``, ``devices``,
   ``distributed``);
1. maths and recording — ``capture``, ``explain``, ``aggregate``, ``evaluate``, the
   attention ``store`` (and what it keeps: ``selection``), MLflow ``tracking`` (the track stage's adapter, as ``store`` is
   extract's), and the figure and HTML primitives every report draws with;
2. items and the method registry — ``items``, ``methods``, ``attribution``;
3. experiments — the params schema (``config`` over the kinds' schemas, built from the
   shared sections of ``schema``), the kinds, their data, models, training and report sections;
4. pipeline — the runner, the stage bodies, the timing records;
5. command line and cross-experiment reports — ``cli``, ``external`` (``attnlab explain``),
   the index page, the command line's report.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: (layer, module prefixes). A module belongs to the layer of its longest matching prefix.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("attnlab.io", "attnlab.layout", "attnlab.devices", "attnlab.distributed")),
    ("maths and recording", ("attnlab.capture", "attnlab.explain", "attnlab.aggregate", "attnlab.aggregate_views",
                             "attnlab.evaluate", "attnlab.store", "attnlab.selection", "attnlab.tracking",
                             "attnlab.report.figures",
                             "attnlab.report.html")),
    ("items and methods", ("attnlab.items", "attnlab.methods", "attnlab.attribution", "attnlab.builtin_methods")),
    ("experiments", ("attnlab.config", "attnlab.schema", "attnlab.experiments", "attnlab.data", "attnlab.models",
                     "attnlab.training", "attnlab.report")),
    ("pipeline", ("attnlab.pipeline", "attnlab.workflow")),
    ("command line and reports", ("attnlab.cli", "attnlab.dvcrun", "attnlab.external", "attnlab.report.index",
                                  "attnlab.report.external")),
]
#: The package root: its lazy re-exports of the public API (PEP 562) name lower modules only.
ROOT = "attnlab"


def modules(src: Path = SRC) -> dict[str, Path]:
    """Every module under ``src/attnlab``: dotted name -> file (a package is its ``__init__``)."""
    out = {}
    for path in sorted((src / "attnlab").rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``name`` (file ``path``) imports, by any statement anywhere."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:                     # relative: from . import x, from ..m import y
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            while target and target not in known:   # a name imported from a module -> the module
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def graph(src: Path = SRC) -> dict[str, set[str]]:
    mods = modules(src)
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def layer(module: str) -> int:
    """The index in :data:`LAYERS` of ``module`` (its longest matching prefix)."""
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    if best is None:
        raise KeyError(module)
    return best


def upward(edges: dict[str, set[str]]) -> list[str]:
    """``importer -> imported`` for every import of a higher layer than the importer's."""
    out = []
    for importer, targets in sorted(edges.items()):
        if importer == ROOT:
            continue
        for target in sorted(targets):
            if layer(target) > layer(importer):
                out.append(f"{importer} ({LAYERS[layer(importer)][0]}) imports {target} "
                           f"({LAYERS[layer(target)][0]})")
    return out


# --------------------------------------------------------------------------- the tests
def test_every_module_has_a_layer():
    missing = [m for m in modules() if m != ROOT and _layer_or_none(m) is None]
    assert missing == [], f"add these modules to a layer of LAYERS: {missing}"


def _layer_or_none(module: str) -> int | None:
    try:
        return layer(module)
    except KeyError:
        return None


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_imports_flow_down_the_layers():
    assert upward(graph()) == []


def test_the_root_package_imports_only_the_maths():
    """``import attnlab`` stays cheap: its public names come from the maths layer, lazily."""
    assert {layer(m) for m in graph()[ROOT]} <= {0, 1}
    root = (SRC / "attnlab" / "__init__.py").read_text()
    tree = ast.parse(root)
    module_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert all(not (n.module or "").startswith("attnlab") for n in module_level if isinstance(n, ast.ImportFrom))


# --------------------------------------------------------------------------- the checker checks
def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "attnlab" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checker_finds_a_cycle_through_a_function_level_relative_import(tmp_path):
    src = _write(tmp_path, {
        "__init__.py": "",
        "io.py": "def f():\n    from .pipeline import run\n",          # io -> pipeline, inside a function
        "pipeline/__init__.py": "from attnlab.pipeline.runner import run\n",
        "pipeline/runner.py": "from attnlab import io\nrun = None\n",    # pipeline.runner -> io
    })
    edges = graph(src)
    assert edges["attnlab.io"] == {"attnlab.pipeline"}
    assert edges["attnlab.pipeline.runner"] == {"attnlab.io"}
    assert cycles(edges) == [["attnlab.io", "attnlab.pipeline", "attnlab.pipeline.runner"]]
    assert upward(edges) == ["attnlab.io (foundation) imports attnlab.pipeline (pipeline)"]


def test_the_checker_sees_imports_under_type_checking_and_from_dot_import(tmp_path):
    src = _write(tmp_path, {
        "__init__.py": "",
        "explain/__init__.py": "from . import flow\n",
        "explain/flow.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from attnlab.config import X\n",
        "config.py": "import attnlab.explain.flow as flow\n",
    })
    edges = graph(src)
    assert edges["attnlab.explain"] == {"attnlab.explain.flow"}
    assert edges["attnlab.explain.flow"] == {"attnlab.config"}
    assert cycles(edges) == [["attnlab.config", "attnlab.explain.flow"]]
    assert upward(edges) == ["attnlab.explain.flow (maths and recording) imports attnlab.config (experiments)"]


@pytest.mark.parametrize("module", ["attnlab.pipeline.stages", "attnlab.report.index", "attnlab.report.classifier",
                                    "attnlab.methods.builtin", "attnlab.experiments.external"])
def test_layers_of_some_modules(module):
    expected = {"attnlab.pipeline.stages": "pipeline", "attnlab.report.index": "command line and reports",
                "attnlab.report.classifier": "experiments", "attnlab.methods.builtin": "items and methods",
                "attnlab.experiments.external": "experiments"}[module]
    assert LAYERS[layer(module)][0] == expected


def test_code_inside_functions_imports_modules_by_their_full_name():
    """``from attnlab import io`` inside a function would call the package's lazy
    ``__getattr__`` (``src/attnlab/__init__.py``) while a stage runs, which the stage
    tracer counts as running that file; ``import attnlab.io as io`` does not."""
    offenders = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and inner.module == "attnlab" and not inner.level:
                        offenders.append(f"{name}: from attnlab import {', '.join(a.name for a in inner.names)}")
    assert offenders == []
