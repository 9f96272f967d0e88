"""Shared helpers of the adapters-lora tests (fixtures and plain functions exposed as fixtures)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import adapters
from adapters.testing import tiny_inputs, tiny_model


def output_of(out: Any) -> torch.Tensor:
    """The main tensor of a model output (logits or last hidden state)."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    return out[0]


def forward(model: nn.Module, inputs: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
    """Run ``model`` without gradients and return its main output tensor."""
    with torch.no_grad():
        return output_of(model(**inputs, **kwargs))


def randomize_biases(model: nn.Module, seed: int = 1) -> None:
    """Give every bias of the model non-zero values (HF initialises them to zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def randomize_adapter(model: nn.Module, name: str, seed: int = 2, std: float = 0.2) -> None:
    """Fill every ``lora_B`` (and MTL up projections) of adapter ``name`` with random values."""
    gen = torch.Generator().manual_seed(seed)
    state = model._adapters_state
    with torch.no_grad():
        for layer in state.layers(name):
            for pname, p in layer.adapters[name].named_parameters():
                if pname.endswith("lora_B"):
                    p.copy_(torch.randn(p.shape, generator=gen) * std)


def build(model_type: str, task: str = "base", biases: bool = True, **overrides: Any) -> nn.Module:
    """A tiny model with random biases, prepared with ``adapters.init``."""
    model = tiny_model(model_type, task, **overrides)
    if biases:
        randomize_biases(model)
    return adapters.init(model)


@pytest.fixture
def helpers():
    """The helper functions of this module, for tests (``helpers.forward(...)``)."""

    class _H:
        pass

    h = _H()
    for fn in (output_of, forward, randomize_biases, randomize_adapter, build, tiny_inputs, tiny_model):
        setattr(h, fn.__name__, staticmethod(fn))
    return h
