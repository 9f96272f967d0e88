"""The example third-party plugin, installed as its own distribution, used through core's API only."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import adapters
import adapters.composition as ac
from adapters.plugins import GROUP_EXPORTS, GROUP_METHODS, registry
from adapters.testing import tiny_inputs, tiny_model

ARCHS = ["qwen3", "gpt2", "bert", "t5"]


def _out(model, inputs, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **kwargs)[0]


def _randomize(model, name: str, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model._adapters_state.adapter_parameters(name):
            p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))


def test_listed_by_the_registry_without_being_imported():
    code = (
        "import sys\n"
        "from adapters.plugins import registry\n"
        "infos = [(i.group, i.name, i.distribution, i.version) for i in registry.installed()\n"
        "         if i.distribution == 'adapters-example-scaling']\n"
        "print(sorted(infos))\n"
        "print(registry.has_config_string('channel_scale'), 'adapters_example_scaling' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("ADAPTERS_DISABLE_PLUGIN_AUTOLOAD", "ADAPTERS_PLUGINS")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    listed, loaded = result.stdout.strip().splitlines()
    assert listed == str(sorted([
        (GROUP_EXPORTS, "ChannelScaleConfig", "adapters-example-scaling", "0.1.0"),
        (GROUP_METHODS, "channel_scale", "adapters-example-scaling", "0.1.0"),
    ]))
    assert loaded == "True False"
    assert any(i.name == "channel_scale" and i.distribution == "adapters-example-scaling"
               for i in registry.installed())


def test_from_adapters_import_config():
    from adapters_example_scaling import ChannelScaleConfig as Direct

    from adapters import ChannelScaleConfig

    assert ChannelScaleConfig is Direct
    assert ChannelScaleConfig().init_scale == 1.0
    method = registry.method("channel_scale")
    assert method.distribution == "adapters-example-scaling"
    assert method.can_merge and "Fuse" not in method.supported_blocks


@pytest.mark.parametrize("arch", ARCHS)
def test_add_train_save_load_merge_delete(arch, tmp_path):
    model = adapters.init(tiny_model(arch))
    inputs = tiny_inputs(model)
    base = _out(model, inputs)
    keys = list(model.state_dict())
    types_before = [(n, type(m)) for n, m in model.named_modules()]
    model.add_adapter("s", config="channel_scale")
    model.set_active_adapters("s")
    assert torch.equal(_out(model, inputs), base)  # scales start at one: the identity
    # hand-computed: with init_scale=2 every FFN output doubles; check one layer's projection
    model.add_adapter("d", config="channel_scale[init_scale=2.0]", set_active=True)
    state = model._adapters_state
    layer = next(lay for lay in state.layers("d") if lay.location == "layers.0.output")
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(layer(x), 2.0 * layer.base_forward(x), rtol=0, atol=1e-6)
    model.delete_adapter("d")
    # train: only the scales of "s" move
    model.train_adapter("s")
    params = {id(p) for p in state.adapter_parameters("s")}
    assert {id(p) for p in model.parameters() if p.requires_grad} == params
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    target = torch.randn(base.shape, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        opt.zero_grad()
        (model(**inputs)[0] - target).pow(2).mean().backward()
        opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(".adapters.s.scale" in n for n in moved)
    model.eval()
    out = _out(model, inputs)
    assert not torch.equal(out, base)
    # summary
    rows = {r["name"]: r for r in model.adapter_summary(as_dict=True)}
    assert rows["s"]["method"] == "channel_scale"
    assert rows["s"]["#params"] == state.points.num_layers * state.points.hidden_size
    # save -> load into a fresh model: bit-identical
    model.save_adapter(str(tmp_path), "s")
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["config"]["method"] == "channel_scale"
    assert meta["methods"] == {"channel_scale": "adapters-example-scaling"}
    fresh = adapters.init(tiny_model(arch))
    fresh.load_adapter(str(tmp_path), set_active=True)
    assert torch.equal(_out(fresh, inputs), out)
    # merge / reset
    model.merge_adapter("s")
    torch.testing.assert_close(_out(model, inputs), out, rtol=0, atol=1e-5)
    model.reset_adapter()
    assert torch.equal(_out(model, inputs), out)
    # delete: the original model
    model.delete_adapter("s")
    assert list(model.state_dict()) == keys
    assert [(n, type(m)) for n, m in model.named_modules()] == types_before
    assert torch.equal(_out(model, inputs), base)


def test_composition_with_the_plugin():
    model = adapters.init(tiny_model("qwen3"))
    inputs = tiny_inputs(model, batch=4)
    refs = {}
    for i, name in enumerate(("a", "b")):
        model.add_adapter(name, config="channel_scale")
        _randomize(model, name, seed=i)
        model.set_active_adapters(name)
        refs[name] = _out(model, inputs)
    model.set_active_adapters(ac.MultiTask("a", "b"))
    out = _out(model, inputs, task_ids=[1, 0, 0, 1])
    for row, name in enumerate("baab"):
        torch.testing.assert_close(out[row], refs[name][row], rtol=0, atol=1e-6)
    model.set_active_adapters(ac.Parallel("a", "b"))
    out = _out(model, inputs)
    assert out.shape[0] == 8
    torch.testing.assert_close(out[:4], refs["a"], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[4:], refs["b"], rtol=0, atol=1e-6)
    with pytest.raises(adapters.CompositionError, match=r"channel_scale.*Fuse"):
        model.set_active_adapters(ac.Fuse("a", "b"))


@pytest.mark.parametrize("arch", ARCHS)
def test_passes_the_shipped_conformance_suite(arch, tmp_path):
    """The same checks our own methods pass (adapters.testing.conformance), run by a third-party package."""
    from adapters.testing.conformance import check_method

    assert check_method("channel_scale", arch, tmp_path)
