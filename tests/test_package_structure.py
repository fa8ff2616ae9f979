"""The package's shape, checked from its source: no import circle (imports inside functions count),
no module over 600 lines but the exercise specifications, and no core module that imports the command line.

``python tests/test_package_structure.py`` prints the import graph, one line per module.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vitcourse"
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``{module: the vitcourse modules it imports}``, every import statement counted, wherever it stands."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                targets = [stem] + [f"{stem}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # vitcourse.data.load_data -> vitcourse.data
                    target = target.rpartition(".")[0]
                if target and target != name:
                    found.add(target)
        graph[name] = found
    # importing a submodule runs its package's __init__ first: that edge is the package's own business
    return {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in graph.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_even_through_imports_inside_functions():
    assert _cycles(import_graph()) == []


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "vitcourse.pretrained" in graph["vitcourse.train"]  # train imports it inside build_data only
    assert "vitcourse.models" in graph["vitcourse.checkpoint"]  # inside _check_weights_fit only
    assert graph["vitcourse.paths"] == set()  # the environment's settings import nothing of the course


def test_only_the_command_line_imports_the_command_line():
    graph = import_graph()
    users = sorted(m for m, targets in graph.items() if any(t == "vitcourse.cli" or t.startswith("vitcourse.cli.")
                                                             for t in targets) and not m.startswith("vitcourse.cli"))
    assert users == ["vitcourse.__main__"]


def test_no_module_is_longer_than_a_sitting():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES and "exercises" not in p.parts}
    assert long == {}


if __name__ == "__main__":
    for module, targets in sorted(import_graph().items()):
        short = sorted(t.removeprefix("vitcourse.") for t in targets)
        print(f"{module.removeprefix('vitcourse.') or 'vitcourse'}: {', '.join(short) or '-'}")
