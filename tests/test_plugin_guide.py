"""Every Python example of docs/writing-a-plugin.md runs as written (in order, each in a fresh namespace)."""

from __future__ import annotations

import os
import re
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUIDE = os.path.join(ROOT, "docs", "writing-a-plugin.md")


def _blocks() -> list[tuple[int, str]]:
    text = open(GUIDE, encoding="utf-8").read()
    return [(text.count("\n", 0, m.start()) + 1, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M)]


BLOCKS = _blocks()


def test_the_guide_has_its_examples() -> None:
    assert len(BLOCKS) == 3


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"writing-a-plugin.md:{line}" for line, _ in BLOCKS])
def test_guide_example_runs(line: int, code: str, monkeypatch) -> None:
    module = types.ModuleType(f"writing_a_plugin_{line}")  # a real module: dataclasses look their module up
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(code, f"writing-a-plugin.md:{line}", "exec"), module.__dict__)
