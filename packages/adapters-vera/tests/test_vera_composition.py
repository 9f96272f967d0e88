"""VeRA under composition blocks: Stack, BatchSplit, Average, MultiTask, Parallel."""

from __future__ import annotations

import pytest
import torch

import adapters.composition as ac
from adapters.testing import tiny_inputs
from adapters_vera import VeraConfig
from adapters_vera.layer import VeraLinear

CFG = dict(r=16, intermediate_lora=True)


@pytest.fixture(params=["qwen3", "gpt2"])
def setup(request, fresh, randomize):
    model = fresh(request.param)
    model.add_adapter("a", VeraConfig(**CFG, projection_prng_key=1))
    model.add_adapter("b", VeraConfig(**CFG, projection_prng_key=2))
    randomize(model, "a", 1)
    randomize(model, "b", 2)
    return model, tiny_inputs(model, batch=2)


def _with(model, setup, hidden, inputs, **kw):
    model.set_active_adapters(setup)
    return hidden(model, inputs, **kw)


def test_stack_adds_deltas_at_each_layer(setup):
    model, _ = setup
    model.set_active_adapters(ac.Stack("a", "b"))
    layer = next(m for m in model.modules() if isinstance(m, VeraLinear) and m.adapters["a"].__class__.__name__
                 == "VeraVectors")
    x = torch.randn(2, 3, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stacked = layer(x)
        base = layer.base_forward(x)
        expected = base + layer.adapters["a"].delta(x) + layer.adapters["b"].delta(x)
    torch.testing.assert_close(stacked, expected, rtol=1e-5, atol=1e-6)


def test_blocks_route_rows(setup, hidden):
    model, inputs = setup
    out_a = _with(model, "a", hidden, inputs)
    out_b = _with(model, "b", hidden, inputs)
    assert (out_a - out_b).abs().max() > 1e-3
    split = _with(model, ac.BatchSplit("a", "b", batch_sizes=[1, 1]), hidden, inputs)
    torch.testing.assert_close(split, torch.cat([out_a[:1], out_b[1:]]), rtol=1e-5, atol=1e-6)
    avg = _with(model, ac.Average("a", "a"), hidden, inputs)
    torch.testing.assert_close(avg, out_a, rtol=1e-5, atol=1e-6)
    mt = _with(model, ac.MultiTask("a", "b"), hidden, inputs, task_ids=torch.tensor([1, 0]))
    torch.testing.assert_close(mt, torch.cat([out_b[:1], out_a[1:]]), rtol=1e-5, atol=1e-6)
    par = _with(model, ac.Parallel("a", "b"), hidden, inputs)
    assert par.shape[0] == 2 * out_a.shape[0]
    torch.testing.assert_close(par, torch.cat([out_a, out_b]), rtol=1e-5, atol=1e-6)


def test_average_with_weights_mixes_deltas(fresh, hidden, randomize):
    # Average(a, b, weights) = y + w_a Δa + w_b Δb on a single adapted projection (one layer, q only)
    model = fresh("llama")
    model.add_adapter("a", VeraConfig(r=16, attn_matrices=["q"], leave_out=[1], projection_prng_key=1))
    model.add_adapter("b", VeraConfig(r=16, attn_matrices=["q"], leave_out=[1], projection_prng_key=2))
    randomize(model, "a", 1)
    randomize(model, "b", 2)
    layer = model.layers[0].self_attn.q_proj
    model.set_active_adapters(ac.Average("a", "b", weights=[3, 1]))
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = layer.base_forward(x) + 0.75 * layer.adapters["a"].delta(x) + 0.25 * layer.adapters["b"].delta(x)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_compile_fullgraph(fresh, hidden, randomize):
    model = fresh("qwen3")
    model.add_adapter("a", VeraConfig(**CFG), set_active=True)
    randomize(model, "a")
    inputs = tiny_inputs(model)
    eager = hidden(model, inputs)
    layer = model.layers[0].self_attn.q_proj
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x))
    assert torch.equal(hidden(model, inputs), eager)
