"""The layering rules of docs/ARCHITECTURE.md, checked on the source tree (AST, no imports).

Dependencies point down: ``marl.core`` (the contracts) imports nothing above it; ``scenarios`` and
``comms`` import only ``marl.core`` from ``marl``; ``marl.results`` reads and writes data and never
runs experiments; algorithms know nothing of MPI. There is no import cycle among the project's
modules (imports inside functions count: they still make two modules depend on each other), and no
function in ``marl/`` is longer than a screenful or two.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("marl", "scenarios", "comms")
#: Longest function allowed in marl/ (lines, decorators and docstring included).
MAX_FUNCTION_LINES = 150


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    return {
        _module_name(p): p
        for pkg in PACKAGES
        for p in sorted((ROOT / pkg).rglob("*.py"))
        if "__pycache__" not in p.parts
    }


SOURCES = _sources()


def _imports(module: str, path: Path) -> set[str]:
    """Project modules that ``module`` imports anywhere in its file (resolved to real modules)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def add(name: str) -> None:
        # "from a.b import c" may name module a.b.c or attribute c of a.b: take the longest module.
        while name and name not in SOURCES:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                add(f"{base}.{alias.name}" if base else alias.name)
    return found


GRAPH = nx.DiGraph()
for _mod, _path in SOURCES.items():
    GRAPH.add_node(_mod)
    for _dep in _imports(_mod, _path):
        GRAPH.add_edge(_mod, _dep)


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _violations(importers: str, forbidden: tuple[str, ...]) -> list[str]:
    """Edges from ``importers`` (a package) into any of the ``forbidden`` packages."""
    return sorted(
        f"{a} imports {b}" for a, b in GRAPH.edges if _within(a, importers) and any(_within(b, f) for f in forbidden)
    )


def test_the_graph_sees_real_imports() -> None:
    # Guard against a parser that finds nothing (the other tests would then pass vacuously).
    assert ("marl.core.registry", "marl.core.config") in GRAPH.edges
    assert ("scenarios.traffic.env", "marl.core.errors") in GRAPH.edges
    assert GRAPH.number_of_edges() > 100


def test_no_import_cycles() -> None:
    cycles = [sorted(c) for c in nx.strongly_connected_components(GRAPH) if len(c) > 1]
    assert cycles == [], f"import cycles: {cycles}"


@pytest.mark.parametrize("layer", ["scenarios", "comms"])
def test_domain_layers_import_only_the_core_of_marl(layer: str) -> None:
    bad = [v for v in _violations(layer, ("marl",)) if not v.split(" imports ")[1].startswith("marl.core")]
    assert bad == []


def test_core_imports_nothing_above_it() -> None:
    above = (
        "scenarios",
        "comms",
        *(m for m in SOURCES if m.count(".") == 1 and m.startswith("marl.") and m != "marl.core"),
    )
    assert _violations("marl.core", above) == []


def test_results_do_not_run_experiments() -> None:
    assert (
        _violations(
            "marl.results", ("marl.runner", "marl.training", "marl.compare", "marl.commands", "marl.bench", "marl.cli")
        )
        == []
    )


def test_algorithms_know_nothing_of_mpi() -> None:
    assert _violations("marl.algos", ("marl.distributed", "marl.training", "marl.runner")) == []


def test_no_function_in_marl_is_too_long() -> None:
    long = []
    for module, path in SOURCES.items():
        if not module.startswith("marl"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                lines = (node.end_lineno or node.lineno) - first + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {lines} lines")
    assert long == []


def test_no_file_points_to_documents_outside_the_repository() -> None:
    # The architecture lives in docs/ARCHITECTURE.md; older code cited notes nobody can open.
    outside = ("DESIGN" + ".md", "TRAIN_DIST" + "_CONTRACT", "notes" + "/", "MPI " + "engineer", "shared" + " notes")
    hits = []
    for path in [
        *SOURCES.values(),
        *ROOT.glob("*.md"),
        *(ROOT / "docs").glob("*.md"),
        *(ROOT / "tests").rglob("*.py"),
        ROOT / "Makefile",
        ROOT / "pyproject.toml",
    ]:
        if path == Path(__file__).resolve():
            continue
        text = path.read_text(encoding="utf-8")
        hits += [f"{path.relative_to(ROOT)}: {o}" for o in outside if o in text]
    assert hits == []
    assert (ROOT / "docs" / "ARCHITECTURE.md").is_file()
