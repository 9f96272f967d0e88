"""``import adapters`` stays cheap, and ``adapters.init`` prepares a model without changing what it computes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import adapters
from adapters.interface import INTERFACE_FILE, AdapterModelInterface
from adapters.points import InterfaceError
from adapters.testing import tiny_inputs, tiny_model

INIT_TYPES = ["qwen3", "bert", "gpt2", "t5"]


def _run(code: str, **env: str) -> str:
    import os

    full_env = {**os.environ, **env}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_import_adapters_imports_no_method_package_and_no_model_code():
    code = (
        "import sys, adapters\n"
        "from adapters.plugins import registry\n"
        "registry.installed()\n"  # discovery reads entry-point names only
        "registry.has_config_string('lora'); registry.has_export('LoRAConfig')\n"
        "methods = [m for m in sys.modules if m.split('.')[0] in "
        "('adapters_lora', 'adapters_bottleneck', 'adapters_reft', 'adapters_vera', 'adapters_example_scaling')]\n"
        "models = [m for m in sys.modules if m.startswith('transformers.models.')]\n"
        "print(methods, models, 'torch' in sys.modules)"
    )
    assert _run(code) == "[] [] False"


def test_dir_lists_core_names_without_importing_plugins():
    code = "import sys, adapters\nnames = dir(adapters)\nprint('init' in names, 'adapters_lora' in sys.modules)"
    assert _run(code) == "True False"


@pytest.mark.parametrize("model_type", INIT_TYPES)
def test_init_leaves_outputs_bit_identical(model_type):
    task = "seq_cls" if model_type == "bert" else "causal_lm"
    model = tiny_model(model_type, task)
    inputs = tiny_inputs(model)
    keys = list(model.state_dict())
    with torch.no_grad():
        before = model(**inputs).logits
    returned = adapters.init(model)
    assert returned is model
    assert isinstance(model, type(tiny_model(model_type, task)))  # original class stays a base class
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        after = model(**inputs).logits
    assert torch.equal(before, after)
    # idempotent: a second init (with or without the same interface) changes nothing
    state = model._adapters_state
    hooks = (len(model._forward_pre_hooks), len(model._forward_hooks))
    assert adapters.init(model) is model
    assert adapters.init(model, interface=state.interface) is model
    assert model._adapters_state is state
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)


def test_init_with_a_different_interface_after_init_is_refused():
    model = adapters.init(tiny_model("qwen3"))
    other = AdapterModelInterface(model_layers="layers", layer_self_attn="self_attn", attn_q_proj="q_proj")
    with pytest.raises(InterfaceError, match="different interface"):
        adapters.init(model, interface=other)


def _custom_interface(**changes) -> AdapterModelInterface:
    fields = dict(
        adapter_methods=["lora", "core_test_scale"],
        model_embeddings="embed_tokens",
        model_layers="layers",
        layer_self_attn="self_attn",
        attn_q_proj="q_proj",
        attn_k_proj="k_proj",
        attn_v_proj="v_proj",
        attn_o_proj="o_proj",
        layer_intermediate_proj="mlp.up_proj",
        layer_output_proj="mlp.down_proj",
    )
    fields.update(changes)
    return AdapterModelInterface(**fields)


def test_init_with_custom_interface(toy):
    model = tiny_model("qwen3", "causal_lm")
    inputs = tiny_inputs(model)
    with torch.no_grad():
        base = model(**inputs).logits
    interface = _custom_interface()
    adapters.init(model, interface=interface)
    assert model.adapter_interface is interface
    points = model._adapters_state.points
    assert points.num_layers == 2
    assert points.layers[1].output.module is model.model.layers[1].mlp.down_proj
    assert points.layers[0].self_attn.q.module is model.model.layers[0].self_attn.q_proj
    model.add_adapter("s", config=toy.NAME, set_active=True)
    toy.randomize(model, "s")
    with torch.no_grad():
        assert not torch.equal(model(**inputs).logits, base)
    model.set_active_adapters(None)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, base)


def test_custom_interface_restricts_methods(toy):
    model = adapters.init(tiny_model("qwen3"), interface=_custom_interface(adapter_methods=["lora"]))
    before = toy.snapshot(model)
    with pytest.raises(adapters.AdapterError, match="core_test_scale"):
        model.add_adapter("s", config=toy.NAME)
    toy.assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("field", "path", "expected_close"),
    [
        ("layer_output_proj", "mlp.dwn_proj", "'mlp.down_proj'"),  # full path, not only the last name
        ("attn_q_proj", "query_proj", "q_proj"),
        ("model_layers", "layer", "layers"),
    ],
)
def test_bad_interface_path_names_field_path_and_closest_names(field, path, expected_close):
    model = tiny_model("qwen3", "causal_lm")
    inputs = tiny_inputs(model)
    keys = list(model.state_dict())
    cls = type(model)
    with torch.no_grad():
        base = model(**inputs).logits
    with pytest.raises(InterfaceError) as info:
        adapters.init(model, interface=_custom_interface(**{field: path}))
    message = str(info.value)
    assert field in message and repr(path) in message and expected_close in message
    # the model is untouched: same class, no state, no hooks, same outputs
    assert type(model) is cls
    assert not hasattr(model, "_adapters_state")
    assert len(model._forward_pre_hooks) == 0 and len(model._forward_hooks) == 0
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, base)


def test_interface_json_round_trip(tmp_path):
    interface = _custom_interface(model_type="qwen3")
    path = interface.save(tmp_path)
    assert path == str(tmp_path / INTERFACE_FILE)
    payload = json.loads((tmp_path / INTERFACE_FILE).read_text())
    assert payload["model_type"] == "qwen3"
    assert payload["version"] == adapters.__version__
    assert payload["interface"]["layer_output_proj"] == "mlp.down_proj"
    loaded = AdapterModelInterface.load(tmp_path)
    assert loaded == interface
    assert AdapterModelInterface.load(path) == interface
    assert AdapterModelInterface.from_dict(interface.to_dict()) == interface
    # a loaded interface works on a model
    model = adapters.init(tiny_model("qwen3"), interface=loaded)
    assert model._adapters_state.points.num_layers == 2


def test_interface_json_errors(tmp_path):
    (tmp_path / INTERFACE_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        AdapterModelInterface.load(tmp_path)
    (tmp_path / INTERFACE_FILE).write_text(json.dumps({"interface": {"model_layers": "x", "bogus_field": 1}}))
    with pytest.raises(ValueError, match="bogus_field"):
        AdapterModelInterface.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        AdapterModelInterface.load(tmp_path / "missing")


def test_adapter_types_alias():
    a = AdapterModelInterface(adapter_types=["lora", "bottleneck"], model_layers="layers")
    b = AdapterModelInterface(adapter_methods=["lora", "bottleneck"], model_layers="layers")
    assert a == b and a.adapter_methods == ["lora", "bottleneck"]
    assert a.accepts("lora") and not a.accepts("reft")
    assert AdapterModelInterface.from_dict({"adapter_types": ["lora"], "model_layers": "layers"}).adapter_methods == [
        "lora"
    ]
    with pytest.raises(ValueError, match="adapter_types"):
        AdapterModelInterface(adapter_methods=["lora"], adapter_types=["reft"], model_layers="layers")
    with pytest.raises(ValueError, match="not both"):
        AdapterModelInterface(model_layers="layers", attn_qkv_proj="c_attn", attn_q_proj="q")


def test_no_interface_for_model_type_is_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(InterfaceError,
                       match=r"No model interface is registered for Sequential, which has no config\.model_type"):
        adapters.init(model)

    class Config:
        model_type = "my_unknown_arch"

    model.config = Config()
    with pytest.raises(InterfaceError) as info:
        adapters.init(model)
    assert "my_unknown_arch" in str(info.value) and "qwen3" in str(info.value)
    assert not hasattr(model, "_adapters_state")


def test_init_any_module_with_an_interface(toy):
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ff_in = torch.nn.Linear(8, 16)
            self.ff_out = torch.nn.Linear(16, 8)

        def forward(self, x):
            return x + self.ff_out(torch.relu(self.ff_in(x)))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block(), Block()])

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    torch.manual_seed(0)
    net = Net()
    x = torch.randn(3, 8)
    base = net(x)
    interface = AdapterModelInterface(model_layers="blocks", layer_intermediate_proj="ff_in",
                                      layer_output_proj="ff_out")
    adapters.init(net, interface=interface)
    net.add_adapter("s", config=toy.Config(init_scale=2.0), set_active=True)
    # hand-computed: every FFN output is doubled
    h = x
    for block in net.blocks:
        h = h + 2.0 * torch.nn.functional.linear(torch.relu(block.ff_in(h)), block.ff_out.weight, block.ff_out.bias)
    torch.testing.assert_close(net(x), h, rtol=0, atol=1e-6)
    net.delete_adapter("s")
    assert torch.equal(net(x), base)
    assert type(net.blocks[0].ff_out) is torch.nn.Linear


def test_first_hour_messages():
    """A wrong-case public name gets a did-you-mean; an interface prints one field per line; a plain
    nn.Module without an interface is told what it lacks."""
    import importlib.util

    from adapters.testing import ToyEncoder, toy_interface

    with pytest.raises(AttributeError, match="Did you mean 'Stack'"):
        adapters.stack  # noqa: B018
    text = str(toy_interface())
    assert text.splitlines()[1].split() == ["model_embeddings", "embed"] and len(text.splitlines()) > 8
    with pytest.raises(adapters.InterfaceError, match=r"ToyEncoder, which has no config\.model_type"):
        adapters.init(ToyEncoder())
    if importlib.util.find_spec("accelerate") is None:  # the core session: the hint names the extra
        with pytest.raises(ImportError, match=r"adapters-core\[train\]"):
            adapters.AdapterTrainer  # noqa: B018
