"""Gradient checkpointing recomputes layers in the backward pass, after the forward context is gone:
the interventions must still hit the same (real-token) positions there."""

from __future__ import annotations

import torch

import adapters
from adapters.testing import tiny_inputs, tiny_model


def _grads(checkpointing: bool) -> dict[str, torch.Tensor]:
    model = tiny_model("qwen3", "causal_lm")
    adapters.init(model)
    model.add_adapter("r", config="loreft[r=2, prefix_positions=2, suffix_positions=2, dropout=0.0]")
    model.train_adapter("r")
    model.lm_head.weight.requires_grad_(False)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inputs = tiny_inputs(model, batch=3, seq=10)
    inputs["attention_mask"][0, :4] = 0  # left padding
    inputs["attention_mask"][1, 7:] = 0  # right padding
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_checkpointed_gradients_equal_plain_ones_with_padding() -> None:
    plain, checkpointed = _grads(False), _grads(True)
    assert plain.keys() == checkpointed.keys() and plain
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_adapter_added_after_a_dtype_move_follows_the_model() -> None:
    model = tiny_model("qwen3")
    adapters.init(model)
    model.add_adapter("first", config="loreft")
    model.to(torch.float64)
    model.add_adapter("second", config="loreft", set_active=True)
    dtypes = {p.dtype for layer in model._adapters_state.layers("second")
              for p in layer.adapters["second"].parameters()}
    assert dtypes == {torch.float64}
    assert model(**tiny_inputs(model)).last_hidden_state.dtype == torch.float64
