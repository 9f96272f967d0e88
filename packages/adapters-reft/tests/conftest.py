"""Shared helpers of the adapters-reft tests."""

from __future__ import annotations

import pytest
import torch


def capture_layer_output(model: torch.nn.Module, index: int) -> tuple[list[torch.Tensor], object]:
    """Register a forward hook (after any ReFT hook) recording layer ``index``'s hidden-state output."""
    layer = dict(model.iter_layers())[index]
    seen: list[torch.Tensor] = []

    def hook(module, args, output):
        seen.append((output[0] if isinstance(output, tuple) else output).detach().clone())

    return seen, layer.register_forward_hook(hook)


def reference_rotation(weight: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows of ``weight`` through ``torch.linalg.qr`` (positive diagonal), in float64."""
    q, r = torch.linalg.qr(weight.double().t())
    signs = torch.sign(torch.diagonal(r))
    return (q * signs).t()


@pytest.fixture
def helpers():
    """Access to the helpers above from tests (no cross-module test imports)."""
    return type("H", (), {"capture": staticmethod(capture_layer_output),
                          "rotation": staticmethod(reference_rotation)})
