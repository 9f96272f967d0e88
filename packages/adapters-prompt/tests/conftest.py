"""Shared helpers of the adapters-prompt tests."""

from __future__ import annotations

import pytest
import torch

import adapters
from adapters.testing import tiny_model
from adapters.testing.conformance import perturb


def prepared(arch: str, task: str, config: str, name: str = "p", std: float = 0.5, **kwargs):
    """A tiny ``arch`` model with adapter ``name`` of ``config`` added, active and perturbed (seeded)."""
    model = adapters.init(tiny_model(arch, task, **kwargs))
    model.add_adapter(name, config=config, set_active=True)
    perturb(model, name, std=std)
    return model


def padded(ids: torch.Tensor, lengths: list[int], pad: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``ids`` cut to ``lengths`` real tokens and padded on ``side``: ``(ids, mask)``."""
    out = torch.full_like(ids, pad)
    mask = torch.zeros_like(ids)
    width = ids.shape[1]
    for row, n in enumerate(lengths):
        cols = slice(width - n, width) if side == "left" else slice(0, n)
        out[row, cols] = ids[row, :n]
        mask[row, cols] = 1
    return out, mask


def generate_logits(model, ids: torch.Tensor, mask: torch.Tensor, use_cache: bool, steps: int = 4) -> torch.Tensor:
    """Greedy ``generate`` with or without a cache: the logits of every step (``steps × B × V``)."""
    out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         use_cache=use_cache, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=model.config.pad_token_id or 0)
    return torch.stack(out.logits)


@pytest.fixture
def helpers():
    """The helpers above, for tests (no cross-module test imports)."""
    return type("H", (), {"prepared": staticmethod(prepared), "padded": staticmethod(padded),
                          "generate_logits": staticmethod(generate_logits)})
