"""``torch.func`` over adapter models (per-sample gradients, functional training loops): ``torch.func.grad``
of a loss through ``torch.func.functional_call`` with the adapter weights as inputs equals autograd's
gradients, in training mode, for every method, including those that carry per-call state through the layers
(ReFT's token layout, prefix tuning's cache; their layer frames used to read storage addresses, which the
wrapped tensors of ``torch.func`` do not have) and DoRA (its cached ‖W‖², likewise); ``vmap`` of it gives
per-sample gradients. Afterwards the model holds its own parameters again: modules shared between layers
(prefix tuning's pool, Compacter's rules) used to keep the substituted tensors, so later training silently
stopped updating them."""

from __future__ import annotations

import pytest
import torch

import adapters
from adapters.testing import tiny_model

METHODS = ["lora", "dora", "ia3", "vera", "seq_bn", "par_bn", "compacter[reduction_factor=4]", "loreft",
           "prefix_tuning", "prompt_tuning"]


@pytest.mark.parametrize("arch", ["qwen3", "gpt2"])
@pytest.mark.parametrize("method", METHODS)
def test_func_grad_equals_autograd(arch: str, method: str) -> None:
    model = adapters.init(tiny_model(arch, "causal_lm", num_hidden_layers=2))
    model.add_adapter("a", config=method)
    model.train_adapter("a")
    for module in model.modules():  # deterministic: no dropout, so both passes see the same function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    ids = torch.randint(4, model.config.vocab_size, (2, 6), generator=gen)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    want = torch.autograd.grad(model(**inputs).loss, list(params.values()))

    def loss(weights: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(model, weights, args=(), kwargs=inputs).loss

    got = torch.func.grad(loss)({n: p.detach() for n, p in params.items()})
    assert set(got) == set(params)
    for name, g in zip(params, want):
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    assert all(model.get_parameter(n) is p for n, p in params.items()), "torch.func left substituted tensors"
    again = torch.autograd.grad(model(**inputs).loss, list(params.values()))
    for g, w in zip(again, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_vmap_per_sample_gradients(method: str) -> None:
    """``vmap(grad(...))`` over the rows of a batch: each row's gradients equal autograd's on that row alone."""
    model = adapters.init(tiny_model("qwen3", "causal_lm", num_hidden_layers=2))
    model.add_adapter("a", config=method)
    model.train_adapter("a")
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    ids = torch.randint(4, model.config.vocab_size, (3, 5), generator=torch.Generator().manual_seed(1))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def loss(weights: dict[str, torch.Tensor], row: torch.Tensor) -> torch.Tensor:
        row = row.unsqueeze(0)
        return torch.func.functional_call(model, weights, args=(), kwargs={"input_ids": row, "labels": row}).loss

    per_row = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))({n: p.detach() for n, p in params.items()},
                                                                       ids)
    for row in range(ids.shape[0]):
        want = torch.autograd.grad(model(input_ids=ids[row:row + 1], labels=ids[row:row + 1]).loss,
                                   list(params.values()))
        for (name, got), w in zip(per_row.items(), want):
            torch.testing.assert_close(got[row], w, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
