"""The package's shape: no import circles (at module level or inside functions), and a small training engine."""

from __future__ import annotations

import ast
from pathlib import Path

import crosssite

ROOT = Path(crosssite.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.AST) -> list[ast.ImportFrom]:
    """Every `from crosssite... import` that runs (``if TYPE_CHECKING:`` blocks left out)."""
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for n in ast.walk(node)}
    return [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and id(n) not in skipped
            and n.module and n.module.startswith("crosssite")]


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in _runtime_imports(ast.parse(path.read_text())):
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
            graph[name] |= subs
            if node.module in modules and len(subs) < len(node.names):
                graph[name].add(node.module)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles() -> None:
    graph = import_graph()
    assert "crosssite.rundir" in graph["crosssite.training.engine"]  # the graph sees real edges
    assert _cycles(graph) == []


def test_lower_layers_never_import_higher_ones() -> None:
    graph = import_graph()
    higher = ("crosssite.training", "crosssite.reporting", "crosssite.inference", "crosssite.cli", "crosssite.serve",
              "crosssite.federated", "crosssite.experiment")
    for low in ("crosssite.data", "crosssite.models", "crosssite.losses", "crosssite.ioutil", "crosssite.errors",
                "crosssite.rundir"):
        for module, targets in graph.items():
            if module == low or module.startswith(low + "."):
                assert not [t for t in targets if t.startswith(higher)], module


def test_the_engine_stays_small() -> None:
    assert len((ROOT / "training" / "engine.py").read_text().splitlines()) <= 350


def test_no_function_is_longer_than_a_screen() -> None:
    long = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert long == []


def test_no_merge_conflict_markers_in_sources_or_docs() -> None:
    repo = ROOT.parents[1]
    files = [*repo.glob("*.md"), *(repo / "docs").glob("*.md"), *ROOT.rglob("*.py"), *(repo / "tests").glob("*.py"),
             *(repo / "scripts").glob("*.py")]
    marked = [f"{path.relative_to(repo)}:{i}" for path in files
              for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
              if line.startswith(("<<<<<<< ", ">>>>>>> ")) or line == "======="]
    assert marked == []
