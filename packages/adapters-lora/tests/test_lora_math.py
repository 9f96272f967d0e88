"""The LoRA / IA3 / DoRA math checked by hand on single layers, and where adapters are placed."""

from __future__ import annotations

import math

import pytest
import torch

from adapters.errors import AdapterError
from adapters_lora import DoRAConfig, IA3Config, LoRAConfig
from adapters_lora.layer import LoRALinear


def _x(*shape: int, seed: int = 5) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _rand_(p: torch.Tensor, seed: int, std: float = 0.3, mean: float = 0.0) -> None:
    with torch.no_grad():
        p.copy_(mean + std * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_linear_by_hand(rslora: bool, helpers) -> None:
    model = helpers.build("bert")
    config = LoRAConfig(r=4, alpha=6, use_rslora=rslora, attn_matrices=["q"])
    model.add_adapter("a", config, set_active=True)
    layer = model.encoder.layer[0].attention.self.query
    assert isinstance(layer, LoRALinear)
    unit = layer.adapters["a"]
    scale = 6 / math.sqrt(4) if rslora else 6 / 4
    assert config.scaling == pytest.approx(scale) and unit.scaling == pytest.approx(scale)
    _rand_(unit.lora_B, 1)
    W, b, A, B = layer.weight, layer.bias, unit.lora_A, unit.lora_B
    assert b is not None and b.abs().sum() > 0
    x = _x(2, 5, 32)
    with torch.no_grad():
        y = layer(x)
        ref = x @ W.T + b + scale * ((x @ A.T) @ B.T)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    model.set_active_adapters(None)
    with torch.no_grad():
        assert torch.equal(layer(x), torch.nn.functional.linear(x, W, b))


def test_lora_init_is_identity_and_shapes(helpers) -> None:
    model = helpers.build("qwen3")
    model.add_adapter("a", "lora[r=4]", set_active=True)
    q = model.layers[0].self_attn.q_proj
    assert q.adapters["a"].lora_A.shape == (4, 32) and q.adapters["a"].lora_B.shape == (32, 4)
    assert torch.count_nonzero(q.adapters["a"].lora_B) == 0
    v = model.layers[0].self_attn.v_proj  # grouped-query: 2 kv heads of 8
    assert v.adapters["a"].lora_B.shape == (16, 4)
    assert not isinstance(model.layers[0].self_attn.k_proj, LoRALinear)


def test_ia3_math_and_merge(helpers) -> None:
    model = helpers.build("bert")
    model.add_adapter("a", IA3Config(), set_active=True)
    att = model.encoder.layer[0].attention.self
    assert isinstance(att.key, LoRALinear) and isinstance(att.value, LoRALinear)
    assert not isinstance(att.query, LoRALinear)
    assert isinstance(model.encoder.layer[0].intermediate.dense, LoRALinear)
    unit = att.key.adapters["a"]
    assert torch.equal(unit.lora_B, torch.ones(32))  # "ia3" init: ones
    for layer in model._adapters_state.layers("a"):
        _rand_(layer.adapters["a"].lora_B, hash(layer.location) % 1000, std=0.2, mean=1.0)
    x = _x(2, 5, 32)
    with torch.no_grad():
        y = att.key(x)
        ref = unit.lora_B * (x @ att.key.weight.T + att.key.bias)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-6)

    inputs = helpers.tiny_inputs(model)
    out = helpers.forward(model, inputs)
    w0, b0 = att.key.weight.detach().clone(), att.key.bias.detach().clone()
    model.merge_adapter("a")
    torch.testing.assert_close(att.key.weight, unit.lora_B.unsqueeze(1) * w0)
    torch.testing.assert_close(att.key.bias, unit.lora_B * b0)  # the bias is scaled too
    torch.testing.assert_close(helpers.forward(model, inputs), out, atol=1e-5, rtol=1e-5)
    model.reset_adapter()
    assert torch.equal(att.key.weight, w0) and torch.equal(att.key.bias, b0)


def _dora_ref(x, W, b, A, B, m, s):
    Wp = W + s * B @ A  # materialised in the test only
    return (x @ Wp.T) * (m / Wp.norm(dim=1)) + b


def test_dora_math_and_merge(helpers) -> None:
    model = helpers.build("bert")
    model.add_adapter("a", DoRAConfig(r=4, alpha=8, attn_matrices=["q", "v"]), set_active=True)
    layer = model.encoder.layer[0].attention.self.query
    unit = layer.adapters["a"]
    torch.testing.assert_close(unit.magnitude, layer.weight.norm(dim=1))  # m starts at ‖W‖_row
    x = _x(2, 5, 32)
    with torch.no_grad():  # at init (B = 0) DoRA is the identity up to float
        torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias, atol=1e-5, rtol=1e-5)
    for i, lay in enumerate(model._adapters_state.layers("a")):
        _rand_(lay.adapters["a"].lora_B, 10 + i)
        _rand_(lay.adapters["a"].magnitude, 20 + i, std=0.1, mean=1.5)
    with torch.no_grad():
        ref = _dora_ref(x, layer.weight, layer.bias, unit.lora_A, unit.lora_B, unit.magnitude, unit.scaling)
        torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)
    inputs = helpers.tiny_inputs(model)
    out = helpers.forward(model, inputs)
    model.merge_adapter("a")
    torch.testing.assert_close(helpers.forward(model, inputs), out, atol=1e-5, rtol=1e-5)
    model.reset_adapter()
    assert torch.equal(helpers.forward(model, inputs), out)


def test_dora_on_fused_conv1d(helpers) -> None:
    model = helpers.build("gpt2")
    model.add_adapter("a", DoRAConfig(r=4, attn_matrices=["v"]), set_active=True)
    layer = model.h[0].attn.c_attn
    unit = layer.adapters["a"].parts["v"]
    _rand_(unit.lora_B, 3)
    _rand_(unit.magnitude, 4, std=0.1, mean=2.0)
    x = _x(2, 5, 32)
    W, b = layer.weight.T, layer.bias  # Conv1D stores in x out
    with torch.no_grad():
        y = layer(x)
        model.set_active_adapters(None)
        full = layer(x)
        model.set_active_adapters("a")
        ref = _dora_ref(x, W[64:], b[64:], unit.lora_A, unit.lora_B, unit.magnitude, unit.scaling)
    assert torch.equal(y[..., :64], full[..., :64])
    torch.testing.assert_close(y[..., 64:], ref, atol=1e-5, rtol=1e-5)
    inputs = helpers.tiny_inputs(model)
    out = helpers.forward(model, inputs)
    model.merge_adapter("a")
    torch.testing.assert_close(helpers.forward(model, inputs), out, atol=1e-5, rtol=1e-5)


def test_gating(helpers) -> None:
    model = helpers.build("llama")
    model.add_adapter("a", LoRAConfig(r=4, use_gating=True, attn_matrices=["q"]), set_active=True)
    layer = model.layers[0].self_attn.q_proj
    unit = layer.adapters["a"]
    _rand_(unit.lora_B, 7)
    x = _x(2, 5, 32)
    with torch.no_grad():
        delta = unit.scaling * (x @ unit.lora_A.T) @ unit.lora_B.T
        base = x @ layer.weight.T
        torch.testing.assert_close(layer(x), base + 0.5 * delta, atol=1e-6, rtol=1e-6)  # zero-init gate: 0.5
        _rand_(unit.gate.weight, 8)
        _rand_(unit.gate.bias, 9)
        gate = torch.sigmoid(x @ unit.gate.weight.T + unit.gate.bias).mean(dim=1, keepdim=True)  # per sequence
        assert not torch.allclose(gate[0], gate[1])
        torch.testing.assert_close(layer(x), base + gate * delta, atol=1e-6, rtol=1e-6)
    with pytest.raises(AdapterError, match="gate"):
        model.merge_adapter("a")
    assert torch.equal(layer.weight, model.layers[0].self_attn.q_proj.weight)


def _layer_delta(layer: LoRALinear, x: torch.Tensor, model, name: str) -> torch.Tensor:
    with torch.no_grad():
        model.set_active_adapters(name)
        on = layer(x)
        model.set_active_adapters(None)
        return on - layer(x)


def test_phi3_only_k_changes_only_k_rows(helpers) -> None:
    model = helpers.build("phi3")
    model.add_adapter("a", LoRAConfig(r=4, attn_matrices=["k"]))
    helpers.randomize_adapter(model, "a")
    layer = model.layers[0].self_attn.qkv_proj
    assert list(layer.adapters["a"].parts) == ["k"]
    assert layer.adapters["a"].parts["k"].lora_B.shape == (16, 4)  # grouped-query: q 32, k 16, v 16
    diff = _layer_delta(layer, _x(2, 5, 32), model, "a")
    assert torch.count_nonzero(diff[..., :32]) == 0 and torch.count_nonzero(diff[..., 48:]) == 0
    assert torch.count_nonzero(diff[..., 32:48]) == diff[..., 32:48].numel()


def test_gpt_neox_per_head_v_rows(helpers) -> None:
    model = helpers.build("gpt_neox")
    model.add_adapter("a", LoRAConfig(r=4, attn_matrices=["v"]))
    helpers.randomize_adapter(model, "a")
    layer = model.layers[0].attention.query_key_value
    diff = _layer_delta(layer, _x(2, 5, 32), model, "a")
    rows = torch.tensor([h * 24 + 16 + j for h in range(4) for j in range(8)])  # [q_h | k_h | v_h] per head
    mask = torch.zeros(96, dtype=torch.bool)
    mask[rows] = True
    assert torch.count_nonzero(diff[..., ~mask]) == 0
    assert torch.count_nonzero(diff[..., mask]) == diff[..., mask].numel()


def test_gpt2_conv1d_q_and_v(helpers) -> None:
    model = helpers.build("gpt2")
    model.add_adapter("a", LoRAConfig(r=4, alpha=4, attn_matrices=["q", "v"]))
    helpers.randomize_adapter(model, "a")
    layer = model.h[0].attn.c_attn
    x = _x(2, 5, 32)
    diff = _layer_delta(layer, x, model, "a")
    parts = layer.adapters["a"].parts
    with torch.no_grad():
        for which, sl in (("q", slice(0, 32)), ("v", slice(64, 96))):
            u = parts[which]
            torch.testing.assert_close(diff[..., sl], (x @ u.lora_A.T) @ u.lora_B.T, atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(diff[..., 32:64]) == 0


def test_leave_out_and_ffn_placement(helpers) -> None:
    model = helpers.build("qwen3")
    model.add_adapter("a", LoRAConfig(r=4, leave_out=[0], intermediate_lora=True, output_lora=True))
    l0, l1 = model.layers[0], model.layers[1]
    assert not any(isinstance(m, LoRALinear) for m in l0.modules())
    assert isinstance(l1.self_attn.q_proj, LoRALinear) and isinstance(l1.self_attn.v_proj, LoRALinear)
    assert isinstance(l1.mlp.up_proj, LoRALinear) and isinstance(l1.mlp.down_proj, LoRALinear)
    assert not isinstance(l1.mlp.gate_proj, LoRALinear)
    model.add_adapter("b", LoRAConfig(r=4))
    assert "b" not in l1.mlp.up_proj.adapters
    assert "b" in l0.self_attn.q_proj.adapters and "b" not in l1.mlp.down_proj.adapters
    locations = {layer.location for layer in model._adapters_state.layers("a")}
    assert locations == {"layers.1.self_attn.q", "layers.1.self_attn.v", "layers.1.intermediate",
                         "layers.1.output"}


def test_t5_cross_attention(helpers) -> None:
    model = helpers.build("t5", "base")
    model.add_adapter("a", LoRAConfig(r=4, attn_matrices=["q", "k", "v", "o"]))
    helpers.randomize_adapter(model, "a")
    for block in model.decoder.block:
        cross = block.layer[1].EncDecAttention
        assert all(isinstance(getattr(cross, p), LoRALinear) for p in "qkvo")
        assert all("a" in getattr(cross, p).adapters for p in "qkvo")
        assert isinstance(block.layer[0].SelfAttention.q, LoRALinear)
    for block in model.encoder.block:
        assert isinstance(block.layer[0].SelfAttention.k, LoRALinear)
        assert not any(isinstance(m, LoRALinear) for m in block.layer[1].modules())  # the FFN
    locations = {layer.location for layer in model._adapters_state.layers("a")}
    assert "layers.2.cross_attn.k" in locations and "layers.0.cross_attn.k" not in locations
    # only cross-attention active in the decoder changes the output too
    model.add_adapter("x", LoRAConfig(r=4, attn_matrices=["k"]))
    for layer in model._adapters_state.layers("x"):
        if "cross_attn" not in layer.location:
            layer.delete_adapter("x")
    helpers.randomize_adapter(model, "x")
    inputs = helpers.tiny_inputs(model)
    base = helpers.forward(model, inputs)
    model.set_active_adapters("x")
    assert not torch.allclose(helpers.forward(model, inputs), base, atol=1e-4)
