"""The layout is the data flow (DESIGN §2): the engine imports nothing from the package above it, and
no two modules import each other. Read from the source (ast), so a function-level import counts too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lowvram_studio"

# The engine's imports from above still to remove (issue #18): none left since the engine takes its own
# EngineConfig (lowvram_studio/settings_adapter.py maps RunSettings to it). An import not listed fails.
KNOWN_UPWARD: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every lowvram_studio module ``path`` imports, relative imports resolved, at any depth of the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # "from . import media"
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return {target for target in found if target in modules and target != name}


def _runtime_nodes(node: ast.AST):
    """Every node below ``node`` except those under ``if TYPE_CHECKING:`` (type-only imports never run)."""
    for child in ast.iter_child_nodes(node):
        type_only = isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING"
        for kept in child.orelse if type_only else [child]:
            yield kept
            yield from _runtime_nodes(kept)


def graph() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path) for path in PACKAGE.rglob("*.py")}


def test_the_engine_imports_nothing_from_the_package_above_it():
    upward = {
        (module, target)
        for module, targets in graph().items() if module.startswith("lowvram_studio.engine.")
        for target in targets if not target.startswith("lowvram_studio.engine")
    }
    assert upward - KNOWN_UPWARD == set(), "the engine must not import the app; pass values in instead"
    assert KNOWN_UPWARD - upward == set(), "an import listed as still to remove is gone: drop it from the list"


def test_no_two_modules_import_each_other_through_any_chain():
    edges = graph()
    cycles = []

    def visit(module: str, path: list[str], on_path: set[str], done: set[str]) -> None:
        for target in sorted(edges.get(module, ())):
            if target in on_path:
                cycles.append(path[path.index(target):] + [target])
            elif target not in done:
                visit(target, path + [target], on_path | {target}, done)
        done.add(module)

    done: set[str] = set()
    for module in sorted(edges):
        if module not in done:
            visit(module, [module], {module}, done)
    assert cycles == []
