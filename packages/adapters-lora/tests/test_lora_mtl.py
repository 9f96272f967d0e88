"""MTL-LoRA: the per-task math, parameter sharing across tasks, MultiTask, per-task merge, save/load."""

from __future__ import annotations

import pytest
import torch

import adapters.composition as ac
from adapters_lora import MTLLoRAConfig
from adapters_lora.layer import MTLLoRADelta


def _fill(unit: MTLLoRADelta, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (unit.lora_B, unit.task_weights):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        unit.task_matrix.add_(torch.randn(unit.task_matrix.shape, generator=gen) * 0.3)


def _mtl_ref(unit: MTLLoRADelta, x: torch.Tensor, tau: float, diagonal: bool) -> torch.Tensor:
    alpha = torch.softmax(unit.task_weights / tau, dim=0)
    h = x @ unit.lora_A.T
    h = h * unit.task_matrix if diagonal else h @ unit.task_matrix.T  # Λ_t A x
    return unit.scaling * sum(alpha[i] * (h @ unit.lora_B[i].T) for i in range(unit.lora_B.shape[0]))


@pytest.mark.parametrize("kind", ["singular_values", "linear"])
def test_mtl_lora_math(kind: str, helpers) -> None:
    model = helpers.build("bert")
    config = MTLLoRAConfig(r=4, alpha=8, n_up_projection=3, task_specific_matrix_type=kind, weights_sharpness=0.5)
    model.add_adapter("t", config, set_active=True)
    layer = model.encoder.layer[0].attention.self.query
    unit = layer.adapters["t"]
    assert isinstance(unit, MTLLoRADelta)
    assert unit.lora_B.shape == (3, 32, 4) and torch.count_nonzero(unit.lora_B) == 0
    if kind == "singular_values":
        assert torch.equal(unit.task_matrix, torch.ones(4))
    else:
        assert torch.equal(unit.task_matrix, torch.eye(4))
    assert torch.equal(unit.task_weights, torch.zeros(3))
    _fill(unit, 1)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = x @ layer.weight.T + layer.bias + _mtl_ref(unit, x, 0.5, kind == "singular_values")
        torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)
    # merge (for this task) equals the unmerged output
    for lay in model._adapters_state.layers("t"):
        _fill(lay.adapters["t"], 7)
    inputs = helpers.tiny_inputs(model)
    out = helpers.forward(model, inputs)
    model.merge_adapter("t")
    torch.testing.assert_close(helpers.forward(model, inputs), out, atol=1e-5, rtol=1e-5)
    model.reset_adapter()
    assert torch.equal(helpers.forward(model, inputs), out)


def test_share_unshare_multitask_train(helpers, tmp_path) -> None:
    model = helpers.build("qwen3")
    config = MTLLoRAConfig(r=4, n_up_projection=2, attn_matrices=["q", "v"])
    for t in ("t1", "t2", "t3"):
        model.add_adapter(t, config)
    state = model._adapters_state
    for t, seed in (("t1", 1), ("t2", 2), ("t3", 3)):
        for i, lay in enumerate(state.layers(t)):
            _fill(lay.adapters[t], seed * 100 + i)
    ref_values = {lay.location: lay.adapters["t2"].lora_A.detach().clone() for lay in state.layers("t2")}
    task_before = {lay.location: lay.adapters["t1"].task_matrix for lay in state.layers("t1")}

    model.share_parameters(["t1", "t2"], reference_adapter_name="t2")
    for lay in state.layers("t1"):
        u1, u2, u3 = (lay.adapters[t] for t in ("t1", "t2", "t3"))
        assert u1.lora_A is u2.lora_A and u1.lora_B is u2.lora_B  # the same Parameter objects
        assert torch.equal(u1.lora_A, ref_values[lay.location])  # reference adapter's values
        assert u1.task_matrix is task_before[lay.location] and u1.task_matrix is not u2.task_matrix
        assert u1.task_weights is not u2.task_weights and u3.lora_A is not u1.lora_A
    assert len(state.adapter_parameters("t1")) == len(state.adapter_parameters("t2"))

    # MultiTask forward with task ids routes rows; the output depends on the per-task parts
    inputs = helpers.tiny_inputs(model, batch=4)
    model.set_active_adapters(ac.MultiTask("t1", "t2"))
    with torch.no_grad():
        out = model(**inputs, task_ids=[0, 1, 1, 0]).last_hidden_state
    single = {}
    for t in ("t1", "t2"):
        model.set_active_adapters(t)
        single[t] = helpers.forward(model, inputs)
    torch.testing.assert_close(out[[0, 3]], single["t1"][[0, 3]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[[1, 2]], single["t2"][[1, 2]], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(single["t1"], single["t2"], atol=1e-4)

    # training the MultiTask setup: shared A/B get gradients from both tasks; t3 and the base stay still
    model.train_adapter(ac.MultiTask("t1", "t2"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(**inputs, task_ids=torch.tensor([0, 1, 1, 0])).last_hidden_state.pow(2).mean().backward()
        opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(".t1." in n or ".t2." in n for n in moved)
    lay = state.layers("t1")[0]
    assert lay.adapters["t1"].lora_A is lay.adapters["t2"].lora_A  # still tied after training
    # training only t1 keeps the parameters it shares with t2 trainable
    model.train_adapter("t1")
    assert lay.adapters["t2"].lora_A.requires_grad and not lay.adapters["t2"].task_matrix.requires_grad
    model.eval()

    # save -> load of one task is bit-identical
    model.set_active_adapters("t1")
    out_t1 = helpers.forward(model, inputs)
    model.save_adapter(str(tmp_path / "t1"), "t1")
    model.load_adapter(str(tmp_path / "t1"), load_as="t1copy", set_active=True)
    assert torch.equal(helpers.forward(model, inputs), out_t1)

    # merge per task: t1 merged equals t1 unmerged
    model.set_active_adapters("t1")
    model.merge_adapter("t1")
    torch.testing.assert_close(helpers.forward(model, inputs), out_t1, atol=1e-5, rtol=1e-5)
    model.reset_adapter()

    model.unshare_parameters(["t1", "t2"])
    for lay in state.layers("t1"):
        u1, u2 = lay.adapters["t1"], lay.adapters["t2"]
        assert u1.lora_A is not u2.lora_A and u1.lora_B is not u2.lora_B
        assert torch.equal(u1.lora_A, u2.lora_A)  # copies of the shared values
    with torch.no_grad():
        for lay in state.layers("t1"):
            lay.adapters["t1"].lora_A.add_(1.0)
    assert not torch.equal(state.layers("t2")[0].adapters["t2"].lora_A, state.layers("t1")[0].adapters["t1"].lora_A)


def test_share_refuses_different_placement(helpers) -> None:
    from adapters.errors import AdapterError

    model = helpers.build("qwen3")
    model.add_adapter("t1", MTLLoRAConfig(r=4))
    model.add_adapter("t2", MTLLoRAConfig(r=4, attn_matrices=["q", "k"]))
    a_before = [lay.adapters["t1"].lora_A for lay in model._adapters_state.layers("t1")]
    with pytest.raises(AdapterError, match="share_parameters"):
        model.share_parameters(["t1", "t2"])
    assert [lay.adapters["t1"].lora_A for lay in model._adapters_state.layers("t1")] == a_before


def test_mtl_config_strings(helpers) -> None:
    model = helpers.build("qwen3")
    model.add_adapter("t", "mtl_lora[r=4, n_up_projection=2, task_specific_matrix_type='linear']")
    unit = model.layers[0].self_attn.q_proj.adapters["t"]
    assert unit.task_matrix.shape == (4, 4) and unit.lora_B.shape == (2, 32, 4)
    with pytest.raises(ValueError):
        MTLLoRAConfig(task_specific_matrix_type="diag")
