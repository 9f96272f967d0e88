"""Operations an adapter adds per Transformer layer and per forward call, counted (no timing)."""

from __future__ import annotations

import torch

import adapters

from . import count_step_ops, tiny_model

__all__ = ["ops_per_layer_and_call"]


def ops_per_layer_and_call(config: str, model_type: str = "qwen3") -> tuple[tuple[int, int], tuple[int, int]]:
    """``((forward, training step) per layer, (forward, training step) per call)``: the ATen operations
    (:func:`~adapters.testing.count_step_ops`) adapter ``config`` adds to a 2- and a 4-layer
    :func:`~adapters.testing.tiny_model` with ``train_adapter``, against the same model frozen; the
    difference between the two depths is what each layer adds, the rest what each call adds once."""
    added = {}
    for layers in (2, 4):
        base = tiny_model(model_type, num_hidden_layers=layers)
        for p in base.parameters():
            p.requires_grad_(False)
        embeds = torch.randn(2, 8, base.config.hidden_size, generator=torch.Generator().manual_seed(0))
        model = adapters.init(tiny_model(model_type, num_hidden_layers=layers))
        model.add_adapter("a", config=config)
        model.train_adapter("a")
        added[layers] = tuple(count_step_ops(model, embeds, train) - count_step_ops(base, embeds, train)
                              for train in (False, True))
    per_layer = tuple((b - a) // 2 for a, b in zip(added[2], added[4]))
    per_call = tuple(a - 2 * p for a, p in zip(added[2], per_layer))
    return per_layer, per_call  # type: ignore[return-value]
