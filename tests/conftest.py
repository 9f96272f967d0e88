"""Fixtures shared by the fused-kernel tests (``test_fused_kernels.py``, ``test_fused_models.py``; a module
opts in with ``pytestmark = pytest.mark.usefixtures("fused_forced")``): Triton's CPU interpreter and the
forced fused mode while its tests run, the comparison with the plain path (``close``) and a launch
counter (``launch_counter``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from types import ModuleType

import pytest
import torch


@pytest.fixture(scope="module")
def triton_interpreter() -> Iterator[None]:
    """Triton's CPU interpreter for the module (set before the kernels are first imported, restored after)."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    if previous is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = previous


@pytest.fixture
def fused_forced(triton_interpreter: None) -> Iterator[None]:
    """``ADAPTERS_FUSED=force`` (one mode for every package) for each test, the previous mode after."""
    from adapters.plugin import set_fused_mode

    previous = set_fused_mode("force")
    yield
    set_fused_mode(previous)


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    scale = float(want.abs().max()) or 1.0
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)
    else:
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * scale)


@pytest.fixture
def close() -> Callable[[torch.Tensor, torch.Tensor, torch.dtype], None]:
    """``close(got, want, dtype)``: equal to float32 rounding, or to bfloat16 / float16 tolerance relative
    to the largest value."""
    return _close


@pytest.fixture
def launch_counter(monkeypatch: pytest.MonkeyPatch) -> Callable[[ModuleType], list[int]]:
    """``launch_counter(module)``: replace ``module.launch_*`` by a counter (outputs keep their values: counts
    only) and mark the kernels checked, so :func:`adapters.testing.count_kernel_ops` sees the ATen
    operations around them; returns the one-element list of calls."""

    def install(module: ModuleType) -> list[int]:
        calls = [0]
        for name in [n for n in vars(module) if n.startswith("launch_")]:
            monkeypatch.setattr(module, name, lambda *a, **k: calls.__setitem__(0, calls[0] + 1))
        for name in ("_kernels_ok", "_dora_ok", "_decode_ok"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, lambda t: True)
        return calls

    return install
