"""Lifecycle of bottleneck adapters on every architecture family we care about."""

from __future__ import annotations

import pytest
import torch

from adapters.errors import AdapterError

MODELS = ["bert", "roberta", "qwen3", "llama", "gemma2", "t5", "vit"]
CONFIGS = ["seq_bn", "double_seq_bn", "par_bn", "adapterplus[reduction_factor=8]",
           "compacter[reduction_factor=8]"]


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("model_type", MODELS)
def test_add_inactive_delete(make, helpers, model_type):
    model, inputs = make(model_type)
    base = helpers.output(model, inputs)
    keys = list(model.state_dict())
    modules = {n: m for n, m in model.named_modules()}
    hooks = _hooks(model)
    for i, config in enumerate(CONFIGS):
        model.add_adapter(f"a{i}", config)
        helpers.randomize(model, f"a{i}", seed=i)
    # base keys are still there, unchanged
    assert set(keys) <= set(model.state_dict())
    for i in range(len(CONFIGS)):
        model.set_active_adapters(f"a{i}")
        out = helpers.output(model, inputs)
        assert torch.isfinite(out).all()
        assert (out - base).abs().max() > 1e-4, CONFIGS[i]
    model.set_active_adapters(None)
    assert torch.equal(helpers.output(model, inputs), base)
    for i in range(len(CONFIGS)):
        model.delete_adapter(f"a{i}")
    assert list(model.state_dict()) == keys
    assert {n: m for n, m in model.named_modules()} == modules
    assert _hooks(model) == hooks
    assert torch.equal(helpers.output(model, inputs), base)


@pytest.mark.parametrize("model_type", MODELS)
def test_save_load_identical(make, helpers, tmp_path, model_type):
    model, inputs = make(model_type)
    model.add_adapter("a", "double_seq_bn[use_gating=True, ln_before=True, scaling='channel']", set_active=True)
    helpers.randomize(model, "a")
    out = helpers.output(model, inputs)
    model.save_adapter(str(tmp_path), "a")
    fresh, _ = make(model_type)
    name = fresh.load_adapter(str(tmp_path), set_active=True)
    assert name == "a"
    assert fresh.adapters_config["a"] == model.adapters_config["a"]
    assert torch.equal(helpers.output(fresh, inputs), out)


@pytest.mark.parametrize("model_type", ["bert", "llama", "t5"])
def test_training_moves_only_adapter_weights(make, model_type):
    model, inputs = make(model_type)
    model.add_adapter("a", "double_seq_bn[init_weights='mam_adapter']")
    model.add_adapter("other", "seq_bn")
    model.train_adapter("a")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.a." in n for n in trainable)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        out = model(**inputs)[0]
        out.pow(2).mean().backward()
        opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= trainable
    assert any(".up." in n for n in moved)


def test_t5_cross_attention_location(make):
    model, _ = make("t5")
    model.add_adapter("a", "double_seq_bn")
    locs = {layer.location for layer in model._adapters_state.layers("a")}
    # 2 encoder + 2 decoder layers: attn + output everywhere, cross only in the decoder (layers 2, 3)
    assert {"layers.2.bottleneck_cross", "layers.3.bottleneck_cross"} <= locs
    assert "layers.0.bottleneck_cross" not in locs
    model.add_adapter("b", "double_seq_bn[cross_adapter=False]")
    assert not any("cross" in layer.location for layer in model._adapters_state.layers("b"))


def test_dtype_follows_base_model(make, helpers):
    model, inputs = make("llama")
    model.to(torch.bfloat16)
    model.add_adapter("a", "seq_bn", set_active=True)
    assert all(p.dtype == torch.bfloat16 for p in model._adapters_state.adapter_parameters("a"))
    assert helpers.output(model, inputs).dtype == torch.bfloat16
    model.add_adapter("b", "seq_bn[dtype='float32']", set_active=True)
    assert all(p.dtype == torch.float32 for p in model._adapters_state.adapter_parameters("b"))
    assert helpers.output(model, inputs).dtype == torch.bfloat16


def test_default_config_is_seq_bn(make):
    model, _ = make("llama")
    model.add_adapter("a")
    assert type(model.adapters_config["a"]).__name__ == "SeqBnConfig"


def test_validate_refuses_missing_hook_point():
    import adapters
    from adapters import AdapterModelInterface
    from adapters.interfaces.builtin import BUILTIN_INTERFACES
    from adapters.testing import tiny_model

    model = tiny_model("llama")
    fields = {k: v for k, v in vars(BUILTIN_INTERFACES["llama"]).items() if k != "layer_pre_ffn"}
    adapters.init(model, interface=AdapterModelInterface(**fields))
    keys = list(model.state_dict())
    with pytest.raises(AdapterError, match="layer_pre_ffn"):
        model.add_adapter("a", "seq_bn")
    assert list(model.state_dict()) == keys and not model._adapters_state.adapters
    # a config that never reads the residual stream works without it
    model.add_adapter("b", "seq_bn[original_ln_before=False]")


def test_compacter_divisibility_and_leave_out(make):
    model, _ = make("llama")
    with pytest.raises(AdapterError, match="phm_dim"):
        model.add_adapter("c", "compacter")  # hidden 32 / 32 = 1, not divisible by 4
    assert not model._adapters_state.adapters
    from adapters_bottleneck import SeqBnConfig

    model.add_adapter("s", SeqBnConfig(reduction_factor={"1": 4, "default": 8}))
    sizes = {layer.location: layer.adapters["s"].down.out_features for layer in model._adapters_state.layers("s")}
    assert sizes == {"layers.0.bottleneck_output": 4, "layers.1.bottleneck_output": 8}
    model.add_adapter("t", "double_seq_bn[leave_out=[0]]")
    assert {layer.location for layer in model._adapters_state.layers("t")} == {
        "layers.1.bottleneck_attn", "layers.1.bottleneck_output"}


def test_lora_on_same_projection_keeps_bottleneck(make, helpers):
    pytest.importorskip("adapters_lora")
    model, inputs = make("llama")
    base = helpers.output(model, inputs)
    model.add_adapter("bn", "double_seq_bn", set_active=True)
    helpers.randomize(model, "bn")
    bn_out = helpers.output(model, inputs)
    model.add_adapter("lo", "lora[attn_matrices=['o'], output_lora=True]")  # wraps o_proj and down_proj
    assert torch.equal(helpers.output(model, inputs), bn_out)
    model.delete_adapter("lo")
    assert torch.equal(helpers.output(model, inputs), bn_out)
    model.delete_adapter("bn")
    assert torch.equal(helpers.output(model, inputs), base)


def test_summary_names_the_bottleneck_kind(make):
    """``adapter_summary`` tells the bottleneck kinds apart (the configs' ``label``)."""
    model, _ = make("bert")
    kinds = (("s", "seq_bn"), ("p", "par_bn"), ("d", "double_seq_bn"), ("c", "compacter[reduction_factor=4]"))
    for name, config in kinds:
        model.add_adapter(name, config)
    rows = {r["name"]: r["method"] for r in model.adapter_summary(as_dict=True)}
    assert [rows[n] for n in "spdc"] == ["seq_bn", "par_bn", "double_seq_bn", "compacter"]
