"""The AdapterHub documentation examples, run as tests against the installed packages."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import adapters
from adapters.plugins import registry
from adapters.testing import tiny_inputs, tiny_model


def _needs(*names: str) -> None:
    missing = [n for n in names if not (registry.has_export(n) or registry.has_config_string(n))]
    if missing:
        pytest.skip(f"plugins for {missing} are not installed")


def test_quickstart_add_lora():
    _needs("lora")
    model = tiny_model("qwen3", "causal_lm")
    inputs = tiny_inputs(model)
    with torch.no_grad():
        base = model(**inputs).logits
    adapters.init(model)
    model.add_adapter("x", config="lora")
    model.train_adapter("x")
    assert model.active_adapters == adapters.Stack("x")
    assert any(p.requires_grad for p in model.get_adapter("x")["layers.0.self_attn.q"].parameters())
    model.eval()
    with torch.no_grad():  # LoRA's B starts at zero: the fresh adapter is the identity
        assert torch.equal(model(**inputs).logits, base)


def test_import_config_classes_and_trainer():
    _needs("SeqBnConfig", "LoRAConfig", "VeraConfig", "MTLLoRAConfig")
    import adapters.composition as ac
    from adapters import AdapterTrainer, LoRAConfig, MTLLoRAConfig, SeqBnConfig, VeraConfig

    assert LoRAConfig().r == 8 and LoRAConfig().alpha == 8
    assert SeqBnConfig.__name__ == "SeqBnConfig"
    assert VeraConfig().r == 256
    assert MTLLoRAConfig().n_up_projection == 1
    assert issubclass(AdapterTrainer, __import__("transformers").Trainer)
    assert ac.Stack("a", "b").flatten() == ["a", "b"]
    assert adapters.LoRAConfig is LoRAConfig


def test_config_objects_and_parameterised_strings():
    _needs("lora", "LoRAConfig")
    from adapters import LoRAConfig

    model = adapters.init(tiny_model("qwen3"))
    model.add_adapter("a", config=LoRAConfig(r=4, alpha=16))
    model.add_adapter("b", config="lora[r=4, alpha=16]")
    assert model.adapters_config["a"] == model.adapters_config["b"] == LoRAConfig(r=4, alpha=16)
    rows = {r["name"]: r for r in model.adapter_summary(as_dict=True)}
    assert rows["a"]["#params"] == rows["b"]["#params"]


def test_composition_example_with_bottleneck_adapters():
    _needs("seq_bn")
    import adapters.composition as ac

    model = adapters.init(tiny_model("bert"))
    inputs = tiny_inputs(model, batch=4)
    model.add_adapter("a", config="seq_bn")
    model.add_adapter("b", config="seq_bn")
    model.set_active_adapters(ac.Stack("a", "b"))
    assert model.active_adapters == ac.Stack("a", "b")
    with torch.no_grad():
        model(**inputs)
    model.set_active_adapters(ac.BatchSplit("a", "b", batch_sizes=[2, 2]))
    with torch.no_grad():
        assert model(**inputs).last_hidden_state.shape[0] == 4


def test_import_adapters_loads_no_method_package_with_everything_installed():
    env = {k: v for k, v in os.environ.items() if k not in ("ADAPTERS_DISABLE_PLUGIN_AUTOLOAD", "ADAPTERS_PLUGINS")}
    result = subprocess.run(
        [sys.executable, "-c", "import adapters, sys; print('adapters_lora' in sys.modules)"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
