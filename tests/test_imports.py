"""No import cycle in custom_components: every import counts, those inside functions too, and importing a module
runs its packages' ``__init__`` first (as Python does)."""

from __future__ import annotations

import ast
from pathlib import Path

from custom_components.paths import REPO_ROOT


def _modules(package: Path) -> dict[str, Path]:
    """Every module of the package folder ``package`` by its dotted name (a package by its ``__init__.py``)."""
    modules = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that importing ``name`` runs: each one it imports anywhere in its code, with the
    packages above it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for imported in names:
            parts = imported.split(".")
            found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & set(modules)
    return found - {name}


def import_cycles(package: Path) -> list[list[str]]:
    """The import cycles of the package folder ``package``, each as the modules on it (Tarjan's strongly connected
    components)."""
    modules = _modules(package)
    graph = {name: _imported(name, path, modules) for name, path in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_the_package_has_no_import_cycle() -> None:
    assert import_cycles(REPO_ROOT / "custom_components") == []


def test_cycles_inside_functions_and_through_packages_are_found(tmp_path: Path) -> None:
    """The check itself: modules that import each other inside functions, and a module whose package's
    ``__init__`` imports it back."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from pkg.b import g\n")
    (package / "b.py").write_text("def g():\n    from . import a\n")
    (package / "sub" / "__init__.py").write_text("from pkg.sub.c import h\n")
    (package / "sub" / "c.py").write_text("import pkg.sub.d\n\ndef h():\n    pass\n")
    (package / "sub" / "d.py").write_text("from pkg.sub import e\n")
    (package / "sub" / "e.py").write_text("")
    assert import_cycles(package) == [["pkg.a", "pkg.b"], ["pkg.sub", "pkg.sub.c", "pkg.sub.d"]]
