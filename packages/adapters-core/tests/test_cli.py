"""The ``adapters`` command line: ``main([...])`` in-process and the installed console script.

Works with core alone (the ``core`` nox session): saved adapters come from the in-process test
method of ``conftest.py`` (``toy`` fixture), models from :mod:`adapters.testing`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import adapters
from adapters.cli import main
from adapters.plugins import registry
from adapters.testing import tiny_config, tiny_inputs, tiny_model


def _saved_toy_adapter(toy, directory, *, seed: int = 3) -> tuple[torch.nn.Module, int]:
    model = adapters.init(tiny_model("bert", "seq_cls"))
    model.add_adapter("mood", config=toy.Config(init_scale=1.0))
    toy.randomize(model, "mood", seed=seed)
    model.save_adapter(str(directory), "mood", with_head=True)
    n_params = sum(p.numel() for p in model._adapters_state.adapter_parameters("mood"))
    return model, n_params


# ---------------------------------------------------------------------------------------------- plugins
def test_plugins_lists_core_interfaces_with_distribution(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    version = adapters.__version__
    for model_type in ("llama", "bert", "gpt2", "t5", "vit"):
        assert any(line.split()[:3] == [model_type, "adapters-core", version] for line in out.splitlines()), model_type
    assert "Plugins that failed to load:" in out


def test_plugins_json_matches_registry_and_reports_failures(capsys, monkeypatch):
    from adapters.plugins import GROUP_INTERFACES, PluginInfo

    bogus = PluginInfo(GROUP_INTERFACES, "nonexistent_arch", "adapters_cli_test_missing_module", "cli-test-dist", "9.9")
    entry_points = registry.entry_points()
    monkeypatch.setitem(entry_points[GROUP_INTERFACES], "nonexistent_arch", [bogus])
    try:
        assert main(["plugins", "--json"]) == 0
        payload = json.loads(capsys.readouterr().out)
        names = {(e["name"], e["distribution"]) for e in payload["interfaces"]}
        assert ("qwen3", "adapters-core") in names
        assert len(payload["interfaces"]) == len([i for i in registry.installed() if i.group == GROUP_INTERFACES])
        failed = {f["module"]: f for f in payload["failed"]}
        assert "adapters_cli_test_missing_module" in failed
        assert failed["adapters_cli_test_missing_module"]["distribution"] == "cli-test-dist"
        assert "ModuleNotFoundError" in failed["adapters_cli_test_missing_module"]["error"]

        assert main(["plugins"]) == 0
        text = capsys.readouterr().out
        line = next(x for x in text.splitlines() if x.strip().startswith("nonexistent_arch"))
        assert line.split()[1:] == ["cli-test-dist", "9.9", "FAILED"]
        tail = text.split("Plugins that failed to load:")[1]
        assert "adapters_cli_test_missing_module (cli-test-dist 9.9): ModuleNotFoundError" in tail
    finally:
        registry.failed.pop("adapters_cli_test_missing_module", None)


# ---------------------------------------------------------------------------------------------- inspect
def test_inspect_model_type_prints_every_hook_point(capsys):
    assert main(["inspect", "llama", "--all-layers"]) == 0
    out = capsys.readouterr().out
    assert "registered for 'llama' by adapters-core" in out
    assert "layers.0.self_attn.q -> layers.0.self_attn.q_proj: Linear(32 -> 32)" in out
    # grouped-query attention: k/v are narrower than q
    assert "layers.1.self_attn.k -> layers.1.self_attn.k_proj: Linear(32 -> 16)" in out
    assert "layers.1.output -> layers.1.mlp.down_proj: Linear(64 -> 32)" in out
    assert "2 layer(s), hidden size 32: every path resolves." in out


def test_inspect_fused_qkv_shows_split(capsys):
    assert main(["inspect", "gpt2", "--task", "causal_lm"]) == 0
    out = capsys.readouterr().out
    assert "base model: transformer (GPT2Model)" in out
    assert "layers.0.self_attn.qkv -> transformer.h.0.attn.c_attn: Conv1D(32 -> 96)" in out
    assert "fused q/k/v widths [32, 32, 32]" in out


def test_inspect_local_model_directory(tmp_path, capsys):
    tiny_config("qwen3").save_pretrained(tmp_path)  # config only: no weights needed
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "model: Qwen3Model (model_type 'qwen3'" in out
    assert "layers.0.self_attn.v -> layers.0.self_attn.v_proj: Linear(32 -> 16)" in out


def test_inspect_reports_paths_that_do_not_resolve(tmp_path, capsys):
    interface = registry.interface("bert")
    broken = adapters.AdapterModelInterface.from_dict({**interface.to_dict(), "attn_q_proj": "self.qq",
                                                       "layer_output_proj": "output.nope"})
    broken.save(tmp_path)
    code = main(["inspect", "bert", "--interface", str(tmp_path / "adapter_interface.json")])
    assert code == 2
    captured = capsys.readouterr()
    assert "does not resolve" in captured.err
    assert "attn_q_proj='self.qq' (from self_attn): missing in layer(s) 0-1" in captured.err
    assert "layer_output_proj='output.nope' (from a layer): missing in layer(s) 0-1" in captured.err
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("argv, message", [
    (["inspect", "no_such_model_type"], "neither a model directory nor a known model type"),
    (["inspect", "vit", "--task", "causal_lm"], "cannot build a 'vit' model"),
    (["inspect", "bert", "--interface", "/nonexistent/interface.json"], "cannot read the interface"),
    (["summary", "/nonexistent/adapter"], "does not exist"),
    (["convert", "/nonexistent/a", "/tmp/b", "--model", "bert"], "is not a directory"),
    (["convert", "a", "b"], "--model"),
    (["frobnicate"], "invalid choice"),
    ([], None),
])
def test_bad_input_exits_2_with_a_message(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    if message is not None:
        assert message in err
        assert "error:" in err
    assert "Traceback" not in err


def test_help_and_version(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("plugins", "inspect", "summary", "convert"):
        assert command in out
    assert main(["inspect", "--help"]) == 0
    assert "model type" in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert adapters.__version__ in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- summary
def test_summary_of_a_saved_adapter(toy, tmp_path, capsys):
    model, n_params = _saved_toy_adapter(toy, tmp_path / "mood")
    assert n_params == 2 * 32  # one scale vector of width 32 at each of the 2 FFN output projections
    assert main(["summary", str(tmp_path / "mood")]) == 0
    out = capsys.readouterr().out
    assert f"method:      {toy.NAME} (ToyScaleConfig)" in out
    assert "parameters:  64 in 2 tensors (F32 64)" in out
    head = sum(p.numel() for p in model.classifier.parameters())
    assert f"head:        {head:,} parameters" in out
    assert "model_type=bert" in out and "model_class=BertForSequenceClassification" in out
    assert "init_scale = 1.0" in out

    assert main(["summary", str(tmp_path / "mood"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["weights"]["parameters"] == n_params
    assert info["weights"]["tensors"] == 2
    assert info["base_model"]["hidden_size"] == 32
    assert info["format"] == "adapters (native)"


def test_summary_rejects_broken_directories(toy, tmp_path, capsys):
    _saved_toy_adapter(toy, tmp_path / "a")
    (tmp_path / "a" / "adapter.safetensors").write_bytes(b"\x01\x02")
    assert main(["summary", str(tmp_path / "a")]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err
    (tmp_path / "b").mkdir()
    assert main(["summary", str(tmp_path / "b")]) == 2
    assert "has no adapter_config.json" in capsys.readouterr().err
    (tmp_path / "b" / "adapter_config.json").write_text("{not json")
    assert main(["summary", str(tmp_path / "b")]) == 2
    assert "not valid JSON" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- convert
def test_convert_without_compat_says_unavailable(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "adapters.compat", None)  # as if this installation had no converters
    assert main(["convert", str(tmp_path), str(tmp_path / "out"), "--model", "bert"]) == 2
    err = capsys.readouterr().err
    assert "conversion is not available in this installation" in err
    assert not (tmp_path / "out").exists()


def test_convert_native_roundtrip_keeps_weights_and_outputs(toy, tmp_path, capsys):
    model, _ = _saved_toy_adapter(toy, tmp_path / "src", seed=5)
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--model", "bert", "--task",
                 "seq_cls"]) == 0
    assert "converted adapter 'mood'" in capsys.readouterr().out
    before = load_file(str(tmp_path / "src" / "adapter.safetensors"))
    after = load_file(str(tmp_path / "dst" / "adapter.safetensors"))
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    fresh = adapters.init(tiny_model("bert", "seq_cls"))
    fresh.load_adapter(str(tmp_path / "dst"), set_active=True, with_head=False)
    model.set_active_adapters("mood")
    inputs = tiny_inputs(model)
    with torch.no_grad():
        assert torch.equal(fresh.bert(**inputs).last_hidden_state, model.bert(**inputs).last_hidden_state)
    # a non-empty destination is refused unless --force
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--model", "bert"]) == 2
    assert "--force" in capsys.readouterr().err


def test_convert_refuses_what_the_format_cannot_hold(toy, tmp_path, capsys):
    _saved_toy_adapter(toy, tmp_path / "src")
    code = main(["convert", str(tmp_path / "src"), str(tmp_path / "peft"), "--model", "bert", "--task", "seq_cls",
                 "--to", "peft"])
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot convert" in err and "PEFT" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------- console script
def _console_script() -> str:
    path = os.path.join(os.path.dirname(sys.executable), "adapters")
    assert os.path.exists(path), f"console script not installed next to {sys.executable}"
    return path


def test_console_script_runs(tmp_path):
    script = _console_script()
    # what the console script adds is the entry point: commands are tested in-process (torch would make a
    # subprocess slow and its time swing with the machine's load)
    result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"adapters-core {adapters.__version__}"
    result = subprocess.run([script, "summary", str(tmp_path / "missing")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert "adapters summary: error:" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "-m", "adapters", "--version"], capture_output=True, text=True,
                            timeout=120)  # python -m adapters: the same command line
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"adapters-core {adapters.__version__}"


def test_convert_finds_the_task_of_a_saved_head_itself(toy, tmp_path, capsys):
    _saved_toy_adapter(toy, tmp_path / "src", seed=5)  # saved from BertForSequenceClassification, with its head
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--model", "bert"]) == 0
    out = capsys.readouterr().out
    assert "--task seq_cls" in out and "converted adapter 'mood'" in out
    assert (tmp_path / "dst" / "head.safetensors").exists()


def test_convert_to_peft_names_the_method_first(toy, tmp_path, capsys):
    _saved_toy_adapter(toy, tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "peft"), "--model", "bert", "--to", "peft"]) == 2
    err = capsys.readouterr().err
    assert f"it is a {toy.NAME} adapter" in err and "format" in err and "head" not in err


def test_inspect_shows_an_interface_a_plugin_registered(capsys):
    """A model type that only a plugin knows (no tiny model of it in adapters.testing) is shown as registered."""
    from adapters.plugin import hookimpl
    from adapters.testing import toy_interface

    class Plugin:
        @hookimpl
        def adapters_register_model_interfaces(self, register):
            register("toy-inspected", toy_interface())

    adapters.register_plugin(Plugin(), distribution="toy-inspect-plugin")
    assert main(["inspect", "toy-inspected"]) == 0
    out = capsys.readouterr().out
    assert "registered for 'toy-inspected' by toy-inspect-plugin" in out and "layer_output_proj" in out
