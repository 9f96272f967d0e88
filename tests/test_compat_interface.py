"""``adapter_interface.json`` is saved beside adapters of custom-interface models; ``adapters.load_model`` uses it."""

from __future__ import annotations

import dataclasses
import os

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
