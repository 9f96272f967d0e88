"""Shared helpers of the adapters-vera tests (fixtures, since test modules are imported in isolation)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

MODELS = ("qwen3", "llama", "gpt2", "bert", "phi3")


def _hidden(model: torch.nn.Module, inputs: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **kwargs).last_hidden_state


def _fresh(model_type: str, task: str = "base"):
    import adapters
    from adapters.testing import tiny_model

    model = tiny_model(model_type, task)
    adapters.init(model)
    return model


@pytest.fixture
def hidden() -> Callable[..., torch.Tensor]:
    """``hidden(model, inputs, **kw)``: the last hidden state without gradients."""
    return _hidden


@pytest.fixture
def fresh() -> Callable[..., torch.nn.Module]:
    """``fresh(model_type, task="base")``: a tiny model prepared with ``adapters.init``."""
    return _fresh


@pytest.fixture
def randomize() -> Callable[[torch.nn.Module, str, int], None]:
    """``randomize(model, name, seed)``: fill adapter ``name``'s λ vectors with seeded random values."""

    def fill(model: torch.nn.Module, name: str, seed: int = 1) -> None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model._adapters_state.adapter_parameters(name):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)

    return fill
