"""``adapter_interface.json`` is saved beside adapters of custom-interface models; ``adapters.load_model`` uses it."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

import adapters
from adapters.interface import INTERFACE_FILE
from adapters.plugins import registry
from adapters.testing import tiny_inputs, tiny_model


def test_custom_interface_is_saved_and_rebuilt(tmp_path):
    builtin = registry.interface("qwen3")
    custom = dataclasses.replace(builtin, layer_intermediate_proj="mlp.gate_proj")  # LoRA on the gate branch
    model = adapters.init(tiny_model("qwen3", "base"), interface=custom)
    inputs = tiny_inputs(model)
    model.add_adapter("g", adapters.LoRAConfig(selfattn_lora=False, intermediate_lora=True, init_weights="bert",
                                               init_weights_seed=0))
    model.set_active_adapters("g")
    assert type(model.layers[0].mlp.gate_proj).__name__ == "LoRALinear"
    with torch.no_grad():
        ref = model(**inputs).last_hidden_state
    model.save_adapter(str(tmp_path), "g")
    assert os.path.exists(tmp_path / INTERFACE_FILE)
    assert adapters.AdapterModelInterface.load(str(tmp_path / INTERFACE_FILE)) == custom

    rebuilt = adapters.load_model(tiny_model("qwen3", "base"), str(tmp_path), set_active=True)
    assert rebuilt._adapters_state.interface == custom
    assert type(rebuilt.layers[0].mlp.gate_proj).__name__ == "LoRALinear"
    assert type(rebuilt.layers[0].mlp.up_proj).__name__ == "Linear"
    with torch.no_grad():
        assert torch.equal(rebuilt(**inputs).last_hidden_state, ref)


def test_builtin_interface_writes_no_interface_file(tmp_path):
    model = adapters.init(tiny_model("qwen3", "base"))
    model.add_adapter("a", adapters.LoRAConfig())
    model.save_adapter(str(tmp_path), "a")
    assert not os.path.exists(tmp_path / INTERFACE_FILE)
    rebuilt = adapters.load_model(tiny_model("qwen3", "base"), str(tmp_path))
    assert rebuilt._adapters_state.interface == registry.interface("qwen3")
    assert "a" in rebuilt._adapters_state.adapters


@pytest.mark.parametrize("config", [
    dict(cls="FalconConfig", multi_query=True),  # Falcon-7B: one key/value head (its num_kv_heads says 4)
    dict(cls="GPTBigCodeConfig", multi_query=True),
])
def test_multi_query_fused_projection_rows(config):
    """A fused q|k|v projection of a multi-query model splits as heads·d, d, d (not in equal thirds, which cut
    through q): the q, k and v parts each change exactly their rows when merged."""
    import transformers

    cls = getattr(transformers, config.pop("cls"))
    sizes = dict(vocab_size=128, num_hidden_layers=2, **config)
    if cls.__name__ == "FalconConfig":
        cfg, model_cls = cls(hidden_size=32, num_attention_heads=4, **sizes), transformers.FalconForCausalLM
    else:
        cfg, model_cls = cls(n_embd=32, n_head=4, n_positions=64, **sizes), transformers.GPTBigCodeForCausalLM
    torch.manual_seed(0)
    model = adapters.init(model_cls(cfg), interface="auto")
    fused = model._adapters_state.points.layers[0].module.module
    qkv = next(m for n, m in fused.named_modules() if n.endswith(("query_key_value", "c_attn")))
    before = qkv.weight.detach().clone()
    rows = {}
    for part in ("q", "k", "v"):
        model.add_adapter(part, adapters.LoRAConfig(attn_matrices=[part], init_weights="bert"))
        model.merge_adapter(part)
        changed = (qkv.weight != before).any(dim=1 if qkv.weight.shape[0] == 48 else 0).nonzero().flatten()
        rows[part] = (int(changed.min()), int(changed.max()), len(changed))
        model.reset_adapter()
        model.delete_adapter(part)
    assert rows == {"q": (0, 31, 32), "k": (32, 39, 8), "v": (40, 47, 8)}, rows
