"""average_adapter (linear and SVD of the averaged delta), weight initialisation, and dtypes."""

from __future__ import annotations

import pytest
import torch

import adapters.composition as ac
from adapters.errors import AdapterError
from adapters_lora import DoRAConfig, IA3Config, LoRAConfig

CFG = LoRAConfig(r=4, alpha=8, attn_matrices=["q", "v"], intermediate_lora=True)


def _randomize_all(model, name: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model._adapters_state.layers(name):
            for p in layer.adapters[name].parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _units(model, name: str):
    for layer in model._adapters_state.layers(name):
        module = layer.adapters[name]
        parts = module.parts.items() if hasattr(module, "parts") else [("", module)]
        for key, unit in parts:
            yield layer, key, unit


def test_average_linear(helpers) -> None:
    model = helpers.build("qwen3")
    for name, seed in (("a", 1), ("b", 2)):
        model.add_adapter(name, CFG)
        _randomize_all(model, name, seed)
    model.average_adapter("avg", ["a", "b"], weights=[3, 1])
    for layer in model._adapters_state.layers("avg"):
        a, b, avg = (layer.adapters[n] for n in ("a", "b", "avg"))
        torch.testing.assert_close(avg.lora_A, 0.75 * a.lora_A + 0.25 * b.lora_A)
        torch.testing.assert_close(avg.lora_B, 0.75 * a.lora_B + 0.25 * b.lora_B)
    with pytest.raises(AdapterError, match="combine_strategy"):
        model.average_adapter("bad", ["a", "b"], combine_strategy="ties")
    assert not model.has_adapter("bad")


@pytest.mark.parametrize("model_type", ["qwen3", "gpt2"])
def test_average_svd_exact_when_low_rank(model_type: str, helpers) -> None:
    model = helpers.build(model_type)
    cfg = LoRAConfig(r=4, alpha=8, attn_matrices=["q", "v"], intermediate_lora=True)
    for name, seed in (("a", 1), ("b", 2)):
        model.add_adapter(name, cfg)
        _randomize_all(model, name, seed)
    with torch.no_grad():  # same A: the averaged delta s·(w_a B_a + w_b B_b) A has rank <= r
        for layer, key, unit in _units(model, "b"):
            src = dict(_units_map(model, "a"))[(layer.location, key)]
            unit.lora_A.copy_(src.lora_A)
    model.average_adapter("svd", ["a", "b"], weights=[2, 1], combine_strategy="lora_delta_w_svd")
    a_units = dict(_units_map(model, "a"))
    b_units = dict(_units_map(model, "b"))
    for layer, key, unit in _units(model, "svd"):
        target = (2 / 3) * a_units[(layer.location, key)].delta_weight() + (1 / 3) * b_units[
            (layer.location, key)].delta_weight()
        torch.testing.assert_close(unit.delta_weight(), target, atol=1e-5, rtol=1e-4)
    inputs = helpers.tiny_inputs(model)
    model.set_active_adapters(ac.Average("a", "b", weights=[2, 1]))
    averaged = helpers.forward(model, inputs)
    model.set_active_adapters("svd")
    torch.testing.assert_close(helpers.forward(model, inputs), averaged, atol=1e-4, rtol=1e-4)


def _units_map(model, name: str):
    for layer, key, unit in _units(model, name):
        yield (layer.location, key), unit


def test_average_svd_is_best_rank_r(helpers) -> None:
    model = helpers.build("llama")
    for name, seed in (("a", 1), ("b", 2)):
        model.add_adapter(name, CFG)
        _randomize_all(model, name, seed)
    model.average_adapter("svd", ["a", "b"], combine_strategy="lora_delta_w_svd")
    a_units, b_units = dict(_units_map(model, "a")), dict(_units_map(model, "b"))
    for (loc, key), unit in _units_map(model, "svd"):
        target = 0.5 * a_units[(loc, key)].delta_weight() + 0.5 * b_units[(loc, key)].delta_weight()
        sigma = torch.linalg.svdvals(target)
        assert (sigma[4:] > 1e-4).any()  # genuinely rank > r
        err = torch.linalg.matrix_norm(unit.delta_weight() - target)
        torch.testing.assert_close(err, sigma[4:].pow(2).sum().sqrt(), atol=1e-4, rtol=1e-4)  # Eckart-Young


def test_average_svd_refuses_ia3(helpers) -> None:
    model = helpers.build("qwen3")
    model.add_adapter("a", IA3Config())
    model.add_adapter("b", IA3Config())
    with pytest.raises(AdapterError, match="lora_delta_w_svd"):
        model.average_adapter("c", ["a", "b"], combine_strategy="lora_delta_w_svd")
    assert not model.has_adapter("c")


def test_init_weights_seed(helpers) -> None:
    models = [helpers.build("qwen3") for _ in range(3)]
    rng = torch.random.get_rng_state()
    models[0].add_adapter("a", LoRAConfig(r=4, init_weights="bert", init_weights_seed=7))
    models[1].add_adapter("a", LoRAConfig(r=4, init_weights="bert", init_weights_seed=7))
    models[2].add_adapter("a", LoRAConfig(r=4, init_weights="bert", init_weights_seed=8))
    assert torch.equal(torch.random.get_rng_state(), rng), "a seeded init must not touch the global RNG"
    w = [[u for _, _, u in _units(m, "a")] for m in models]
    for u0, u1, u2 in zip(*w):
        assert torch.equal(u0.lora_A, u1.lora_A) and torch.equal(u0.lora_B, u1.lora_B)
        assert not torch.equal(u0.lora_A, u2.lora_A)
    assert not torch.equal(w[0][0].lora_A, w[0][1].lora_A[: w[0][0].lora_A.shape[0]])  # layers differ
    # without a seed the global RNG drives the init
    torch.manual_seed(0)
    models[0].add_adapter("x", LoRAConfig(r=4))
    torch.manual_seed(0)
    models[1].add_adapter("x", LoRAConfig(r=4))
    for (_, _, u0), (_, _, u1) in zip(_units(models[0], "x"), _units(models[1], "x")):
        assert torch.equal(u0.lora_A, u1.lora_A)


def test_init_schemes(helpers) -> None:
    model = helpers.build("qwen3")
    model.add_adapter("lora", LoRAConfig(r=4, init_weights_seed=0))
    model.add_adapter("bert", LoRAConfig(r=4, init_weights="bert", init_weights_seed=0))
    model.add_adapter("gauss", LoRAConfig(r=4, init_weights="gaussian", init_weights_seed=0))
    model.add_adapter("ia3", IA3Config(init_weights_seed=0))
    cat = {n: [torch.cat([u.lora_A.flatten() for _, _, u in _units(model, n)]),
               torch.cat([u.lora_B.flatten() for _, _, u in _units(model, n)])] for n in ("lora", "bert", "gauss")}
    a, b = cat["lora"]
    assert a.abs().max() <= 32 ** -0.5 and a.std() > 0.05 and torch.count_nonzero(b) == 0  # kaiming-uniform
    a, b = cat["bert"]
    assert 0.015 < a.std() < 0.025 and 0.015 < b.std() < 0.025
    a, b = cat["gauss"]
    assert 0.2 < a.std() < 0.3 and torch.count_nonzero(b) == 0  # N(0, 1/r), r = 4
    for _, _, u in _units(model, "ia3"):
        assert torch.equal(u.lora_B, torch.ones_like(u.lora_B))


@pytest.mark.parametrize("config", [LoRAConfig(r=4), DoRAConfig(r=4), IA3Config()], ids=["lora", "dora", "ia3"])
def test_bf16_model_gets_bf16_adapters(config, helpers) -> None:
    model = helpers.build("qwen3").to(torch.bfloat16)
    inputs = helpers.tiny_inputs(model)
    base = helpers.forward(model, inputs)
    model.add_adapter("a", config, set_active=True)
    params = model._adapters_state.adapter_parameters("a")
    assert params and all(p.dtype == torch.bfloat16 for p in params)
    _randomize_all(model, "a", 4)
    out = helpers.forward(model, inputs)  # no autocast
    assert out.dtype == torch.bfloat16 and not torch.equal(out, base)


@pytest.mark.parametrize("config", [LoRAConfig(r=4, dtype="float32"), DoRAConfig(r=4, dtype="float32"),
                                    IA3Config(dtype="float32")], ids=["lora", "dora", "ia3"])
def test_float32_adapters_on_bf16_model(config, helpers) -> None:
    model = helpers.build("qwen3").to(torch.bfloat16)
    inputs = helpers.tiny_inputs(model)
    base = helpers.forward(model, inputs)
    model.add_adapter("a", config, set_active=True)
    assert all(p.dtype == torch.float32 for p in model._adapters_state.adapter_parameters("a"))
    _randomize_all(model, "a", 4)
    out = helpers.forward(model, inputs)
    assert out.dtype == torch.bfloat16 and not torch.equal(out, base)
    model.merge_adapter("a")
    merged = helpers.forward(model, inputs)
    assert (merged.float() - out.float()).abs().mean() < 0.05  # bf16 weights: merged up to bf16 rounding
