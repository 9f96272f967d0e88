"""LoRA lifecycle on every architecture family: add, activate, merge, reset, save/load, delete, train."""

from __future__ import annotations

import pytest
import torch

from adapters_lora.layer import LoRALinear

MODELS = ["qwen3", "llama", "gemma2", "gpt2", "phi3", "bert", "modernbert", "t5", "gpt_neox"]
FULL = "lora[r=4, alpha=8, attn_matrices=['q','k','v','o'], intermediate_lora=True, output_lora=True]"


def _structure(model: torch.nn.Module) -> list[tuple[str, str]]:
    return [(n, type(m).__name__) for n, m in model.named_modules()]


@pytest.mark.parametrize("model_type", MODELS)
def test_lifecycle(model_type: str, helpers, tmp_path) -> None:
    model = helpers.build(model_type)
    inputs = helpers.tiny_inputs(model)
    base = helpers.forward(model, inputs)
    keys = list(model.state_dict().keys())
    modules = _structure(model)
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}

    model.add_adapter("a", FULL)
    base_sd = {k: v for k, v in model.state_dict().items() if "adapters." not in k}
    assert list(base_sd) == keys, "base state-dict keys must not change while adapters exist"
    assert any(isinstance(m, LoRALinear) for m in model.modules())
    # added but inactive: exactly the base model
    assert torch.equal(helpers.forward(model, inputs), base)

    helpers.randomize_adapter(model, "a")
    model.set_active_adapters("a")
    out = helpers.forward(model, inputs)
    assert not torch.allclose(out, base, atol=1e-4), "an active adapter with non-zero B must change the output"

    model.set_active_adapters(None)
    assert torch.equal(helpers.forward(model, inputs), base), "deactivated: exactly the base computation"

    model.set_active_adapters("a")
    model.merge_adapter("a")
    merged = helpers.forward(model, inputs)
    torch.testing.assert_close(merged, out, atol=1e-5, rtol=1e-5)
    model.reset_adapter()
    for k, v in model.state_dict().items():
        if k in base_weights:
            assert torch.equal(v, base_weights[k]), f"reset_adapter must restore {k} exactly"
    assert torch.equal(helpers.forward(model, inputs), out)

    model.save_adapter(str(tmp_path / "a"), "a")
    name = model.load_adapter(str(tmp_path / "a"), load_as="b")
    assert name == "b"
    model.set_active_adapters("b")
    assert torch.equal(helpers.forward(model, inputs), out), "save -> load must be bit-identical"

    model.delete_adapter("b")
    model.delete_adapter("a")
    assert _structure(model) == modules
    assert list(model.state_dict().keys()) == keys
    assert torch.equal(helpers.forward(model, inputs), base)


@pytest.mark.parametrize("model_type", ["qwen3", "gpt2", "bert"])
def test_training_moves_only_lora(model_type: str, helpers) -> None:
    model = helpers.build(model_type, "seq_cls")
    state = model._adapters_state
    base_ids = {id(p) for p in state.points.base_model.parameters()}
    head = {n: p for n, p in model.named_parameters() if id(p) not in base_ids}
    assert head, "a sequence-classification model has a head outside its base model"
    head_flags = {n: p.requires_grad for n, p in head.items()}
    model.add_adapter("a", "lora[r=4, attn_matrices=['q','v'], intermediate_lora=True]")
    model.add_adapter("other", "lora[r=4]")
    model.train_adapter("a")
    assert model.training
    lora = {id(p) for p in state.adapter_parameters("a")}
    other = {id(p) for p in state.adapter_parameters("other")}
    for n, p in model.named_parameters():
        if id(p) in lora:
            assert p.requires_grad, n
        elif id(p) in base_ids or id(p) in other:
            assert not p.requires_grad, n
    assert {n: p.requires_grad for n, p in model.named_parameters() if n in head} == head_flags

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    inputs = helpers.tiny_inputs(model, batch=4)
    labels = torch.tensor([0, 1, 0, 1])
    for _ in range(3):
        opt.zero_grad()
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        if id(p) in lora:
            continue
        if id(p) in base_ids or id(p) in other:
            assert not changed, f"{n} is not part of adapter 'a' but moved"
    # B starts at zero, so every B gets a gradient from the first step; A only once B is non-zero
    stuck = [n for n, p in model.named_parameters() if id(p) in lora and n.endswith("lora_B")
             and torch.equal(p, before[n])]
    assert not stuck, f"LoRA B matrices that did not move: {stuck}"
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters()
               if id(p) in lora and n.endswith("lora_A"))


@pytest.mark.parametrize("config", [
    "dora[r=4, attn_matrices=['q','v'], output_lora=True]",
    "ia3",
    "lora[r=4, use_gating=True, attn_matrices=['k','v']]",
    "mtl_lora[r=4, n_up_projection=2, task_specific_matrix_type='linear']",
], ids=["dora", "ia3", "gated", "mtl"])
def test_variants_save_load_delete(config: str, helpers, tmp_path) -> None:
    model = helpers.build("gpt2")
    inputs = helpers.tiny_inputs(model)
    base = helpers.forward(model, inputs)
    keys, modules = list(model.state_dict().keys()), _structure(model)
    model.add_adapter("a", config, set_active=True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model._adapters_state.adapter_parameters("a"):
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    out = helpers.forward(model, inputs)
    assert not torch.allclose(out, base, atol=1e-4)
    model.save_adapter(str(tmp_path / "a"), "a")
    model.delete_adapter("a")
    assert _structure(model) == modules and list(model.state_dict().keys()) == keys
    assert torch.equal(helpers.forward(model, inputs), base)
    model.load_adapter(str(tmp_path / "a"), set_active=True)
    assert torch.equal(helpers.forward(model, inputs), out)
