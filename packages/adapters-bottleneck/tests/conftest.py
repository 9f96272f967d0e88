"""Shared helpers of the adapters-bottleneck tests (imported by pytest, not by test modules)."""

from __future__ import annotations

import pytest
import torch

import adapters
from adapters.testing import tiny_inputs, tiny_model

# Tiny models on a shared 2-core machine: intra-op threads only add contention.
torch.set_num_threads(1)


def randomize(model: torch.nn.Module, name: str, seed: int = 0, std: float = 0.2) -> None:
    """Give every parameter of adapter ``name`` seeded random values (so zero-initialised ups matter)."""
    gen = torch.Generator().manual_seed(seed)
    for p in model._adapters_state.adapter_parameters(name):
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=gen).to(p.dtype) * std + (1.0 if p.dim() == 1 and
                                                                               p.numel() == 1 else 0.0))


def output(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The first output tensor of a forward pass."""
    with torch.no_grad():
        return model(**inputs)[0]


@pytest.fixture
def make():
    """``make(model_type, task="base")`` -> (initialised tiny model, inputs)."""

    def build(model_type: str, task: str = "base", **overrides):
        model = tiny_model(model_type, task, **overrides)
        adapters.init(model)
        return model, tiny_inputs(model, batch=2, seq=6)

    return build


@pytest.fixture
def helpers():
    """The module-level helpers as a namespace."""

    class H:
        pass

    H.randomize = staticmethod(randomize)
    H.output = staticmethod(output)
    return H
