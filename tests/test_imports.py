"""The import graph of d2dpm and d2dpm_app, read from the source (nothing is imported): no circle, and
the layering of docs/design.md (the core never imports the workshop, the apps or a UI library)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("d2dpm", "d2dpm_app")
UI_LIBRARIES = ("gradio", "streamlit")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, bool]]:
    """(imported module, at import time?) for every import in `path`: an import inside a function runs only
    when the function does. `from package import module` counts as importing the module; importing a
    module imports its packages too (their __init__), except the packages `name` itself sits in."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def targets(node) -> list[str]:
        if isinstance(node, ast.Import):
            return [alias.name for alias in node.names]
        if node.level:
            base = package.split(".")
            base = base[: len(base) - node.level + 1]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module
        return [module] + [f"{module}.{alias.name}" for alias in node.names if f"{module}.{alias.name}" in modules]

    def visit(node, at_import_time: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend((target, at_import_time) for target in targets(child))
            deferred = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, at_import_time and not deferred)

    visit(tree, True)
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    edges = []
    for target, at_import_time in found:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):  # the target and the packages it sits in
            module = ".".join(parts[:i])
            if module in modules and module != name and module not in ancestors:
                edges.append((module, at_import_time))
    return edges


def import_graph(at_import_time_only: bool) -> dict[str, set[str]]:
    modules = _modules()
    return {name: {target for target, now in _imports(name, path, modules) if now or not at_import_time_only}
            for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each a circle of imports."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return components


def test_the_graph_is_read():
    graph = import_graph(at_import_time_only=True)
    assert {"d2dpm.cli", "d2dpm.config", "d2dpm.tools.evaluate", "d2dpm.quant.fake", "d2dpm_app.common"} <= set(graph)
    assert "d2dpm.config" in graph["d2dpm.quant.fake"] and "d2dpm.quant" in graph["d2dpm.calibration"]
    assert "d2dpm.tools.distances" in import_graph(at_import_time_only=False)["d2dpm.tools.evaluate"]  # `from . import distances`


def test_no_import_circle_when_modules_load():
    assert _cycles(import_graph(at_import_time_only=True)) == []


def test_no_import_circle_even_through_imports_inside_functions():
    # Deferred imports cannot deadlock a load, but a circle through them is still two modules that need each other.
    assert _cycles(import_graph(at_import_time_only=False)) == []


def test_the_core_imports_neither_the_workshop_nor_the_apps_nor_a_ui_library():
    modules = _modules()
    for name, path in modules.items():
        if not name.startswith("d2dpm.") or name.startswith("d2dpm.tools"):
            continue
        imported = {target for target, _ in _imports(name, path, modules)}
        tree = ast.parse(path.read_text())
        libraries = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        libraries |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module and not node.level}
        assert not libraries & set(UI_LIBRARIES), name
        assert not any(target.startswith("d2dpm_app") for target in imported), name
        workshop = {target for target in imported if target.startswith("d2dpm.tools")}
        if name == "d2dpm.cli":  # the front door: the commands' arguments, and each command's module when it runs
            assert workshop == {"d2dpm.tools", "d2dpm.tools.arguments", "d2dpm.tools.train", "d2dpm.tools.evaluate", "d2dpm.tools.bench"}
        else:
            assert not workshop, (name, workshop)
