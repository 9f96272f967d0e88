"""The microkernel rule: core never imports a method package (checked on the source, so it holds in
every session whatever is installed)."""

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
