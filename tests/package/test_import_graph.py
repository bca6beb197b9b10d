"""The import graph of sharpguard (and of its framework adapters, ``integrations``) has no cycles: no
module imports, directly or through others, one that imports it back -- counting imports inside
functions, which only defer a cycle to the first call.

The graph is read from the source with ``ast`` (nothing is imported): an edge ``a -> b`` for every
``import``/``from ... import`` in module ``a`` that names a module ``b`` of the package, relative
imports resolved, ``from pkg import name`` counted as an import of ``pkg.name`` when that is a module
and of ``pkg`` otherwise. Imports under ``if TYPE_CHECKING:`` never run and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import integrations
import sharpguard

ROOTS = [Path(package.__file__).resolve().parent for package in (sharpguard, integrations)]

#: cycles that other branches of the same refactor remove (the list only shrinks: an entry whose
#: cycle is gone fails the test below, so it is deleted when that branch lands)
EXPECTED_CYCLES: list[frozenset[str]] = []  # none: keep it so (break a new one with a protocol or a lower module)


def _module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(root, path): path for root in ROOTS for path in sorted(root.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of ``tree`` at any depth (functions, classes, try blocks), except the
    bodies of ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _resolve(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, known: set[str]) -> set[str]:
    """The package modules one import statement of ``module`` loads by name."""
    targets: set[str] = set()
    if isinstance(node, ast.Import):
        for alias in node.names:
            name = alias.name
            while name and name not in known:  # ``import sharpguard.optim.sam``: that module
                name = name.rpartition(".")[0]
            if name:
                targets.add(name)
        return targets
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if source not in known:
        return targets
    for alias in node.names:
        child = f"{source}.{alias.name}"
        targets.add(child if child in known else source)
    return targets


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (no self-edges)."""
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges: set[str] = set()
        for node in _imports(tree):
            edges |= _resolve(name, path.name == "__init__.py", node, known)
        edges.discard(name)
        graph[name] = edges
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[frozenset[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        out.append(frozenset(component))
    return out


def test_the_graph_reader_finds_every_kind_of_import():
    """The reader itself, on edges known to be in the source: a module-level relative import, a
    ``from . import module``, an absolute one, and one inside a function."""
    graph = import_graph()
    assert "sharpguard.optim.functional" in graph["sharpguard.optim.sam"]  # from . import functional as F
    assert "sharpguard.errors" in graph["sharpguard.optim.engine"]  # from ..errors import ConfigurationError
    assert "sharpguard.optim._phase" in graph["sharpguard.optim.engine"]
    assert "sharpguard.optim" in graph  # packages are modules of the graph too
    nested = [
        name for name, path in _modules().items()
        if any(isinstance(node, ast.FunctionDef) and any(isinstance(n, (ast.Import, ast.ImportFrom))
                                                        for n in ast.walk(node))
               for node in ast.walk(ast.parse(path.read_text())))
    ]
    assert nested, "no function-level import anywhere: the reader's nested case is untested"


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}, "f": {"g"}, "g": {"f"}}
    assert sorted(map(sorted, strongly_connected(graph))) == [["a", "b", "c"], ["f", "g"]]


def test_no_module_imports_one_that_imports_it_back():
    """Exactly the cycles of EXPECTED_CYCLES, no other: a new cycle fails, and so does an entry whose
    cycle is gone (delete it: the list only shrinks, and is empty once the refactor has landed)."""
    found = set(strongly_connected(import_graph()))
    new = ["{" + ", ".join(sorted(c)) + "}" for c in found - set(EXPECTED_CYCLES)]
    gone = ["{" + ", ".join(sorted(c)) + "}" for c in set(EXPECTED_CYCLES) - found]
    assert not new, "import cycles (break them with a protocol or a lower module): " + "; ".join(new)
    assert not gone, "these cycles are gone: delete them from EXPECTED_CYCLES: " + "; ".join(gone)
