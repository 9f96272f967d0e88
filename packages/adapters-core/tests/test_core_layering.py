"""The microkernel rules, checked on the source (so they hold in every session whatever is installed):
core never imports a method package, and core's modules import each other without a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import adapters

CORE_SRC = Path(adapters.__file__).resolve().parent
FORBIDDEN = ("adapters_lora", "adapters_bottleneck", "adapters_reft", "adapters_vera", "adapters_example_scaling")


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_core_source_imports_no_method_package() -> None:
    offenders = {}
    files = sorted(CORE_SRC.rglob("*.py"))
    assert len(files) > 10, "core sources not found"
    for path in files:
        bad = sorted(m for m in _imported_modules(path) if m.split(".")[0] in FORBIDDEN)
        if bad:
            offenders[str(path.relative_to(CORE_SRC))] = bad
    assert offenders == {}, f"core imports method packages: {offenders}"


def test_import_adapters_is_light() -> None:
    import subprocess
    import sys

    code = ("import sys, adapters; "
            "print(sorted(m for m in ('torch', 'transformers', 'adapters_lora') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def _core_import_graph() -> dict[str, set[str]]:
    """Module -> core modules it imports (at run time: ``TYPE_CHECKING`` blocks excluded; imports
    inside functions included)."""
    modules = {}
    for path in CORE_SRC.rglob("*.py"):
        parts = path.relative_to(CORE_SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and getattr(node.test, "id", None) == "TYPE_CHECKING" for b in node.body for n in ast.walk(b)}
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(tree):
            if id(node) in typing_only or not isinstance(node, ast.ImportFrom | ast.Import):
                continue
            if isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name in modules and a.name != name}
                continue
            base = package.split(".")[: len(package.split(".")) - max(node.level - 1, 0)] if node.level else []
            target = ".".join([*base, node.module] if node.module else base) if node.level else node.module or ""
            submodules = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules}
            graph[name] |= {m for m in (submodules or {target}) if m in modules and m != name}
    return graph


def test_core_has_no_import_cycle() -> None:
    graph = _core_import_graph()
    assert len(graph) > 20
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycle = [*path[path.index(target):], target]
                raise AssertionError(f"import cycle in core: {' -> '.join(cycle)}")
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
