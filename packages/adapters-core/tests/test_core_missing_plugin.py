"""Asking for a method whose plugin is not installed names the distribution to install.

These tests must mean something in every nox session, including ``tests`` where every method package
*is* installed. Absence is therefore simulated for real: a private ``Registry(autoload=False)``
swapped in for the process-wide one (in-process), and ``ADAPTERS_DISABLE_PLUGIN_AUTOLOAD=1`` in a
subprocess, which hides every installed plugin distribution from discovery.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import adapters
import adapters.initialization
import adapters.model
import adapters.plugins
from adapters.plugins import MissingPluginError, Registry
from adapters.testing import tiny_inputs, tiny_model


@pytest.fixture
def no_plugins(monkeypatch):
    """The process sees no installed plugin distribution (core's built-in interfaces still load)."""
    private = Registry(autoload=False)
    monkeypatch.setattr(adapters.plugins, "registry", private)
    monkeypatch.setattr(adapters.model, "registry", private)
    monkeypatch.setattr(adapters.initialization, "registry", private)
    for name in ("LoRAConfig", "SeqBnConfig", "VeraConfig", "LoReftConfig"):
        monkeypatch.delitem(adapters.__dict__, name, raising=False)
    return private


def test_private_registry_sees_no_plugin_but_builtin_interfaces(no_plugins):
    assert not no_plugins.has_config_string("lora")
    assert not no_plugins.has_export("LoRAConfig")
    assert no_plugins.interface("qwen3") is not None
    assert {i.distribution for i in no_plugins.installed()} == {"adapters-core"}


@pytest.mark.parametrize(
    ("config", "dist"),
    [("lora", "adapters-lora"), ("ia3", "adapters-lora"), ("lora[r=4]", "adapters-lora"),
     ("seq_bn", "adapters-bottleneck"), ("loreft", "adapters-reft"), ("vera", "adapters-vera")],
)
def test_add_adapter_without_plugin_raises_missing_plugin_error(no_plugins, config, dist):
    model = adapters.init(tiny_model("qwen3"))
    inputs = tiny_inputs(model)
    keys = list(model.state_dict())
    with torch.no_grad():
        base = model(**inputs).last_hidden_state
    with pytest.raises(MissingPluginError) as info:
        model.add_adapter("x", config=config)
    assert isinstance(info.value, ModuleNotFoundError)
    assert f"pip install {dist}" in str(info.value)
    assert not model.has_adapter("x")
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(**inputs).last_hidden_state, base)


def test_add_adapter_without_config_and_without_bottleneck_says_to_pass_one(no_plugins):
    model = adapters.init(tiny_model("qwen3"))
    with pytest.raises(adapters.AdapterError, match=r"needs a config.*pip install adapters-bottleneck"):
        model.add_adapter("x")


@pytest.mark.parametrize(("name", "dist"), [("LoRAConfig", "adapters-lora"), ("SeqBnConfig", "adapters-bottleneck"),
                                            ("VeraConfig", "adapters-vera"), ("LoReftConfig", "adapters-reft")])
def test_from_adapters_import_config_without_plugin(no_plugins, name, dist):
    with pytest.raises(MissingPluginError) as info:
        exec(f"from adapters import {name}", {})
    assert isinstance(info.value, ModuleNotFoundError)
    assert f"pip install {dist}" in str(info.value)


def test_unknown_name_is_an_attribute_error(no_plugins):
    with pytest.raises(ImportError):
        exec("from adapters import NoSuchThingConfig", {})
    with pytest.raises(AttributeError):
        _ = adapters.no_such_lowercase_name


def test_unknown_config_string_lists_available(no_plugins):
    model = adapters.init(tiny_model("qwen3"))
    with pytest.raises(KeyError, match="no_such_method"):
        model.add_adapter("x", config="no_such_method")


def _subprocess(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)


def test_missing_plugin_in_a_fresh_process_with_autoload_disabled():
    code = (
        "import sys, adapters\n"
        "import torch\n"
        "net = torch.nn.Module()\n"
        "net.layers = torch.nn.ModuleList([torch.nn.Module()])\n"
        "net.layers[0].fc = torch.nn.Linear(4, 4)\n"
        "interface = adapters.AdapterModelInterface(model_layers='layers', layer_output_proj='fc')\n"
        "model = adapters.init(net, interface=interface)\n"
        "try:\n"
        "    model.add_adapter('x', config='lora')\n"
        "except ModuleNotFoundError as exc:\n"
        "    print(type(exc).__name__, '|', exc)\n"
        "try:\n"
        "    from adapters import LoRAConfig\n"
        "except ModuleNotFoundError as exc:\n"
        "    print(type(exc).__name__, '|', exc)\n"
        "print('loaded:', 'adapters_lora' in sys.modules)\n"
    )
    result = _subprocess(code, ADAPTERS_DISABLE_PLUGIN_AUTOLOAD="1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3, result.stdout
    for line in lines[:2]:
        assert line.startswith("MissingPluginError |") and "pip install adapters-lora" in line
    assert lines[2] == "loaded: False"
