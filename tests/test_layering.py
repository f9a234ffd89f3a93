"""Imports run one way: from the command line down to settings on the ground floor, with no cycles.

Every module's imports are read with ``ast`` (top-level, function-level and ``TYPE_CHECKING`` ones;
relative imports resolved), so an import deferred into a function counts like any other.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

import pytest

import accel

PACKAGE = Path(accel.__file__).parent
#: Modules that import nothing of accel but each other: every other module may import them.
GROUND = ("accel.errors", "accel.version", "accel.settings", "accel.source", "accel.atomic")
#: Modules below the command line, the benchmarks and the wrapper: they never import those.
LOWER = ("accel.compile", "accel.models", "accel.runtime", "accel.settings", "accel.plan")
UPPER = ("accel.cli", "accel.bench", "accel.wrapper")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str) -> str | None:
    """The accel module ``name`` (a module, or a name inside one) is found in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> list[tuple[str, int]]:
    """``(imported accel module, line)`` for every import statement of ``module``."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            # `from accel.cli import run` imports the module accel.cli.run; `from accel.x import f`, accel.x.
            names = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names
            ]
        else:
            continue
        for name in names:
            target = _resolve(name) if name.split(".")[0] == "accel" else None
            if target is not None and target != module:
                found.append((target, node.lineno))
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def _where(module: str, target: str) -> str:
    line = next(line for t, line in GRAPH[module] if t == target)
    return f"{module} -> {target} ({MODULES[module].relative_to(PACKAGE.parent)}:{line})"


def _chain(path: list[str]) -> str:
    return "; ".join(_where(a, b) for a, b in zip(path, path[1:], strict=False))


def _path(start: str, goal: Callable[[str], bool]) -> list[str] | None:
    """The shortest import chain from ``start`` to a module ``goal(module)`` accepts (breadth first)."""
    previous: dict[str, str | None] = {start: None}
    queue = [start]
    while queue:
        module = queue.pop(0)
        for target, _ in GRAPH[module]:
            if target in previous:
                continue
            previous[target] = module
            if goal(target):
                chain = [target]
                while previous[chain[-1]] is not None:
                    chain.append(previous[chain[-1]])  # type: ignore[arg-type]
                return chain[::-1]
            queue.append(target)
    return None


def _within(module: str, floors: tuple[str, ...]) -> bool:
    return any(module == floor or module.startswith(floor + ".") for floor in floors)


def test_the_reader_sees_every_kind_of_import() -> None:
    # A function-level import (the package top's wrap), and the relative-free form of a submodule import.
    assert "accel.accelerator" in {t for t, _ in GRAPH["accel"]}
    assert {"accel.cli.run", "accel.cli.plan"} <= {t for t, _ in GRAPH["accel.cli.app"]}
    assert len(MODULES) > 50


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_cycle(module: str) -> None:
    cycle = _path(module, lambda target: target == module)
    assert cycle is None, f"import cycle: {_chain(cycle)}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "accel"))
def test_no_module_imports_the_package_top(module: str) -> None:
    # accel/__init__.py exposes the public names lazily; importing it from below would turn it into a hub.
    assert "accel" not in {t for t, _ in GRAPH[module]}, f"imports the package top: {_where(module, 'accel')}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _within(m, LOWER)))
def test_lower_floors_never_reach_the_upper_ones(module: str) -> None:
    chain = _path(module, lambda target: _within(target, UPPER))
    assert chain is None, f"{module} reaches {chain[-1]}: {_chain(chain)}"


@pytest.mark.parametrize("module", GROUND)
def test_ground_floor_imports_only_the_ground_floor(module: str) -> None:
    above = sorted({t for t, _ in GRAPH[module] if t not in GROUND})
    assert not above, f"ground-floor module imports {', '.join(_where(module, t) for t in above)}"
