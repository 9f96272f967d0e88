"""VeRA: placement, math, merge, checkpoints, training and deletion on five architectures."""

from __future__ import annotations

import math
import os

import pytest
import torch

import adapters
from adapters.testing import tiny_inputs
from adapters_vera import VeraConfig
from adapters_vera.layer import VeraFusedParts, VeraLinear, VeraVectors

MODELS = ("qwen3", "llama", "gpt2", "bert", "phi3")
FULL = dict(r=16, intermediate_lora=True, output_lora=True)  # q, v, FFN up and down


def _projections(model, name):
    return model._adapters_state.shared_modules(name)["projections"]


def _reference_projections(key: int, r: int, max_in: int, max_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented recipe, written out independently of the package."""
    gen = torch.Generator().manual_seed(key)
    a = torch.empty(r, max_in).uniform_(-1 / math.sqrt(max_in), 1 / math.sqrt(max_in), generator=gen)
    b = torch.empty(max_out, r).uniform_(-1 / math.sqrt(r), 1 / math.sqrt(r), generator=gen)
    return a, b


def _units(module):
    if isinstance(module, VeraFusedParts):
        return list(module.parts.values())
    return [module]


@pytest.mark.parametrize("model_type", MODELS)
def test_add_changes_output_and_inactive_is_exact(model_type, fresh, hidden, randomize):
    model = fresh(model_type)
    inputs = tiny_inputs(model)
    base = hidden(model, inputs)
    model.add_adapter("v", VeraConfig(**FULL))
    assert torch.equal(hidden(model, inputs), base)  # added, not active
    model.set_active_adapters("v")
    assert torch.equal(hidden(model, inputs), base)  # λ_b = 0 at init: a no-op
    randomize(model, "v")
    active = hidden(model, inputs)
    assert (active - base).abs().max() > 1e-3
    model.set_active_adapters(None)
    assert torch.equal(hidden(model, inputs), base)


@pytest.mark.parametrize("model_type", MODELS)
def test_hand_computed_formula_every_layer(model_type, fresh, randomize):
    config = VeraConfig(r=16, alpha=8, projection_prng_key=7, attn_matrices=["q", "k", "v", "o"],
                        intermediate_lora=True, output_lora=True)
    model = fresh(model_type)
    model.add_adapter("v", config, set_active=True)
    randomize(model, "v", seed=3)
    proj = _projections(model, "v")
    a_ref, b_ref = _reference_projections(7, 16, proj.max_in, proj.max_out)
    assert torch.equal(proj.A, a_ref) and torch.equal(proj.B, b_ref)
    s = 8 / 16
    layers = [m for m in model.modules() if isinstance(m, VeraLinear)]
    assert len(layers) == 2 * ((2 if model_type in ("gpt2", "phi3") else 4) + 2)
    gen = torch.Generator().manual_seed(5)
    for layer in layers:
        x = torch.randn(2, 3, layer.in_features, generator=gen)
        w = layer.weight.t() if layer.is_conv1d else layer.weight  # out × in
        expected = x @ w.t() + (layer.bias if layer.bias is not None else 0)
        expected = expected.clone()
        for unit in _units(layer.adapters["v"]):
            rows = unit.rows
            index = torch.arange(layer.out_features) if rows is None else (
                torch.arange(rows.start, rows.stop) if isinstance(rows, slice) else rows)
            a = a_ref[:, : layer.in_features]
            b = b_ref[: index.numel()]
            delta = s * unit.lambda_b * ((unit.lambda_d * (x @ a.t())) @ b.t())
            expected[..., index] += delta
        with torch.no_grad():
            got = layer(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_gqa_and_fused_widths(fresh):
    model = fresh("qwen3")
    model.add_adapter("v", VeraConfig(r=16, attn_matrices=["q", "k", "v"]))
    attn = model.layers[0].self_attn
    assert attn.q_proj.adapters["v"].lambda_b.shape == (32,)
    assert attn.k_proj.adapters["v"].lambda_b.shape == (16,)  # 2 kv heads × 8
    assert attn.v_proj.adapters["v"].lambda_b.shape == (16,)
    assert _projections(model, "v").A.shape == (16, 32) and _projections(model, "v").B.shape == (32, 16)
    phi = fresh("phi3")
    phi.add_adapter("v", VeraConfig(r=16, attn_matrices=["q", "k", "v"]))
    parts = phi.layers[0].self_attn.qkv_proj.adapters["v"].parts
    assert [parts[m].rows for m in "qkv"] == [slice(0, 32), slice(32, 48), slice(48, 64)]
    assert [parts[m].lambda_b.numel() for m in "qkv"] == [32, 16, 16]


@pytest.mark.parametrize("model_type,expected", [("qwen3", 416), ("llama", 416), ("gpt2", 448), ("bert", 448),
                                                 ("phi3", 544)])
def test_parameter_count_exact(model_type, expected, fresh):
    # per layer: q (r + 32) + v (r + 16 with GQA, r + 32 for gpt2 and bert)
    #            + FFN up (r + 64; phi3 gate|up r + 128) + down (r + 32)
    model = fresh(model_type)
    model.add_adapter("v", VeraConfig(**FULL))
    row = model.adapter_summary(as_dict=True)[0]
    assert row["name"] == "v" and row["#params"] == expected
    model.add_adapter("skip0", VeraConfig(**FULL, leave_out=[0]))
    assert model.adapter_summary(as_dict=True)[1]["#params"] == expected // 2
    model.train_adapter("v")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected
    # the projections are buffers: neither parameters nor trainable
    assert not any(n.startswith("adapters_shared") for n, _ in model.named_parameters())


@pytest.mark.parametrize("model_type", MODELS)
def test_merge_equals_unmerged_and_reset_is_exact(model_type, fresh, hidden, randomize):
    model = fresh(model_type)
    inputs = tiny_inputs(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.add_adapter("v", VeraConfig(**FULL, alpha=4, attn_matrices=["q", "k", "v", "o"]), set_active=True)
    randomize(model, "v")
    unmerged = hidden(model, inputs)
    model.merge_adapter("v")
    merged = hidden(model, inputs)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
    changed = [k for k, v in before.items() if not torch.equal(model.state_dict()[k], v)]
    assert changed  # the base weights really moved
    model.reset_adapter()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert torch.equal(hidden(model, inputs), unmerged)


@pytest.mark.parametrize("model_type", MODELS)
@pytest.mark.parametrize("save_projection", [True, False])
def test_save_load_identical(model_type, save_projection, fresh, hidden, randomize, tmp_path):
    model = fresh(model_type)
    inputs = tiny_inputs(model)
    config = VeraConfig(**FULL, projection_prng_key=11, save_projection=save_projection)
    model.add_adapter("v", config, set_active=True)
    randomize(model, "v")
    expected = hidden(model, inputs)
    model.save_adapter(str(tmp_path), "v")
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "adapter.safetensors")))
    shared = {k for k in keys if k.startswith("shared.")}
    assert shared == ({"shared.projections.A", "shared.projections.B"} if save_projection else set())
    assert all(k.rsplit(".", 1)[1] in ("lambda_d", "lambda_b") for k in keys if not k.startswith("shared."))
    other = fresh(model_type)
    name = other.load_adapter(str(tmp_path), set_active=True)
    assert name == "v" and other._adapters_state.adapters["v"].config == config
    assert torch.equal(hidden(other, inputs), expected)


def test_save_without_projection_is_smaller(fresh, randomize, tmp_path):
    sizes = {}
    for flag in (True, False):
        model = fresh("qwen3")
        model.add_adapter("v", VeraConfig(r=64, save_projection=flag))
        randomize(model, "v")
        model.save_adapter(str(tmp_path / str(flag)), "v")
        sizes[flag] = os.path.getsize(tmp_path / str(flag) / "adapter.safetensors")
    # A (64×32) and B (32×64) in float32 are 16 KiB together
    assert sizes[True] - sizes[False] >= 2 * 64 * 32 * 4


def test_same_key_same_projections(fresh):
    first, second = fresh("llama"), fresh("llama")
    state = torch.get_rng_state()
    first.add_adapter("a", VeraConfig(r=16, projection_prng_key=42))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    torch.manual_seed(1234)  # the global RNG does not matter either
    second.add_adapter("b", VeraConfig(r=16, projection_prng_key=42))
    second.add_adapter("c", VeraConfig(r=16, projection_prng_key=43))
    pa, pb, pc = _projections(first, "a"), _projections(second, "b"), _projections(second, "c")
    assert torch.equal(pa.A, pb.A) and torch.equal(pa.B, pb.B)
    assert not torch.equal(pa.A, pc.A)
    # all layers of one adapter share the same matrices
    layers = [m for m in first.modules() if isinstance(m, VeraLinear)]
    assert all(u.projections is pa for m in layers for u in _units(m.adapters["a"]))


@pytest.mark.parametrize("model_type", ["qwen3", "gpt2"])
def test_training_moves_only_lambda_vectors(model_type, fresh):
    model = fresh(model_type)  # the base model: a task head would be trainable too (it is not an adapter)
    inputs = tiny_inputs(model)
    model.add_adapter("v", VeraConfig(**FULL, vera_b=0.1))
    model.add_adapter("idle", VeraConfig(r=8))
    model.train_adapter("v")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        loss = model(**inputs).last_hidden_state.pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    moved = {k for k, v in before.items() if not torch.equal(after[k], v)}
    assert moved
    assert all(k.endswith((".v.lambda_d", ".v.lambda_b")) or ".v.parts." in k for k in moved), sorted(moved)
    assert all(k.rsplit(".", 1)[1] in ("lambda_d", "lambda_b") for k in moved)
    assert any(k.endswith("lambda_d") for k in moved) and any(k.endswith("lambda_b") for k in moved)
    assert torch.equal(after["adapters_shared.v.projections.A"], before["adapters_shared.v.projections.A"])


@pytest.mark.parametrize("model_type", MODELS)
def test_delete_restores_model(model_type, fresh, hidden, randomize):
    model = fresh(model_type)
    inputs = tiny_inputs(model)
    base = hidden(model, inputs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = {n: type(m) for n, m in model.named_modules()}
    model.add_adapter("v", VeraConfig(**FULL), set_active=True)
    randomize(model, "v")
    assert set(before) <= set(model.state_dict())  # base keys unchanged while the adapter is there
    model.delete_adapter("v")
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(isinstance(m, (VeraLinear, VeraVectors)) for m in model.modules())
    assert {n: type(m) for n, m in model.named_modules() if not n.startswith("adapters_shared")} == types
    assert torch.equal(hidden(model, inputs), base)


def test_config_string_export_and_dtype(fresh, hidden):
    from adapters import VeraConfig as Exported

    assert Exported is VeraConfig
    cfg = adapters.AdapterConfig.load("vera[r=8, projection_prng_key=3, save_projection=False]")
    assert isinstance(cfg, VeraConfig) and (cfg.r, cfg.projection_prng_key, cfg.save_projection) == (8, 3, False)
    assert VeraConfig().scaling == 1.0 and VeraConfig(r=16, alpha=8).scaling == 0.5
    assert VeraConfig.from_dict(VeraConfig(r=4, leave_out=[1]).to_dict()) == VeraConfig(r=4, leave_out=[1])
    model = fresh("qwen3").to(torch.bfloat16)
    model.add_adapter("v", "vera[r=8]", set_active=True)
    proj = _projections(model, "v")
    assert proj.A.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model._adapters_state.adapter_parameters("v"))
    model.add_adapter("f", VeraConfig(r=8, dtype="float32"), set_active=True)
    assert _projections(model, "f").A.dtype == torch.float32
    out = hidden(model, tiny_inputs(model))
    assert out.dtype == torch.bfloat16


def test_invalid_configs(fresh):
    with pytest.raises(ValueError):
        VeraConfig(attn_matrices=["x"])
    with pytest.raises(ValueError):
        VeraConfig(r=0)
    model = fresh("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(adapters.errors.AdapterError):
        model.add_adapter("v", VeraConfig(selfattn_lora=False))
    with pytest.raises(adapters.errors.AdapterError):
        model.add_adapter("v", VeraConfig(leave_out=[0, 1]))
    assert set(model.state_dict()) == set(before)
    assert not any(isinstance(m, VeraLinear) for m in model.modules())
