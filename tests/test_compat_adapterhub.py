"""AdapterHub ``adapters`` 1.x checkpoints: files written by the real package load with its recorded outputs.

Fixtures: ``scripts/make_reference_checkpoints.py adapterhub`` (run in a venv with ``adapters`` 1.3 and
transformers 4.57) saved tiny random BERT / Llama base weights, LoRA and IA3 adapters, and the outputs.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import adapters
from adapters.errors import CheckpointError
from adapters.testing import tiny_model

DATA = os.path.join(os.path.dirname(__file__), "data", "compat")


def _base(model_type: str):
    from transformers import AutoConfig, AutoModel

    directory = os.path.join(DATA, f"ah_{model_type}_base")
    with open(os.path.join(directory, "config.json")) as fh:
        cfg = json.load(fh)
    config = AutoConfig.for_model(cfg.pop("model_type"), **{k: v for k, v in cfg.items()
                                                            if k not in ("transformers_version", "architectures")})
    config._attn_implementation = "eager"
    model = AutoModel.from_config(config, add_pooling_layer=False) if model_type == "bert" else \
        AutoModel.from_config(config)
    state = {k: v.float() for k, v in load_file(os.path.join(directory, "model.safetensors")).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k or "position_ids" in k for k in missing), (missing, unexpected)
    adapters.init(model.eval())
    return model


def _out(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).last_hidden_state


@pytest.mark.parametrize("model_type", ["bert", "llama"])
@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_adapterhub_checkpoint_gives_recorded_outputs(model_type, method):
    directory = os.path.join(DATA, f"ah_{model_type}_{method}")
    ref = load_file(os.path.join(directory, "reference.safetensors"))
    model = _base(model_type)
    base = _out(model, ref["input_ids"])
    name = model.load_adapter(directory, set_active=True)
    assert name == method
    out = _out(model, ref["input_ids"])
    assert not torch.allclose(out, base, atol=1e-3)
    torch.testing.assert_close(out, ref["output"], atol=1e-5, rtol=0)
    config = model._adapters_state.record(name).config
    assert config.composition_mode == ("scale" if method == "ia3" else "add")
    model.set_active_adapters(None)
    assert torch.equal(_out(model, ref["input_ids"]), base)


def test_llama_lora_leave_out_and_module_roles():
    """AdapterHub's Llama 'intermediate_lora' lives on mlp.down_proj; we follow the module, not the flag."""
    model = _base("llama")
    name = model.load_adapter(os.path.join(DATA, "ah_llama_lora"))
    config = model._adapters_state.record(name).config
    assert config.leave_out == [0] and config.intermediate_lora and config.output_lora
    assert config.attn_matrices == ["q", "v"] and config.r == 2 and config.alpha == 4


def test_native_round_trip_after_adapterhub_load(tmp_path):
    directory = os.path.join(DATA, "ah_bert_lora")
    ref = load_file(os.path.join(directory, "reference.safetensors"))
    model = _base("bert")
    model.load_adapter(directory, set_active=True)
    model.save_adapter(str(tmp_path), "lora")
    other = _base("bert")
    other.load_adapter(str(tmp_path), set_active=True)
    assert torch.equal(_out(other, ref["input_ids"]), _out(model, ref["input_ids"]))


def _copy(tmp_path, which="ah_bert_lora"):
    target = tmp_path / which
    shutil.copytree(os.path.join(DATA, which), target)
    return target


def _edit(directory, fn):
    path = directory / "adapter_config.json"
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("edit,needle", [
    (lambda m: m["config"].update(use_gating=True), "use_gating"),
    (lambda m: m["config"].update(future_knob=3), "future_knob"),
    (lambda m: m["config"].update(architecture="prefix_tuning"), "prefix_tuning"),
    (lambda m: m.update(model_type="roberta"), "'roberta'"),
    (lambda m: m["config"].update(r=3), "rank 2"),
])
def test_bad_adapterhub_configs(tmp_path, edit, needle):
    directory = _copy(tmp_path)
    _edit(directory, edit)
    model = _base("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=needle):
        model.load_adapter(str(directory))
    assert not model._adapters_state.adapters
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_adapterhub_checkpoint_on_wrong_model_size(tmp_path):
    from adapters.testing import tiny_model

    model = tiny_model("bert", "base")  # hidden 32, the fixture has 16
    adapters.init(model)
    with pytest.raises(CheckpointError, match=r"shape|hidden size"):
        model.load_adapter(os.path.join(DATA, "ah_bert_lora"))
    assert not model._adapters_state.adapters


@pytest.mark.parametrize("model_type", ["bert", "llama"])
@pytest.mark.parametrize("method", ["seq_bn", "double_seq_bn", "par_bn"])
def test_adapterhub_bottleneck_gives_recorded_outputs(model_type, method):
    directory = os.path.join(DATA, f"ah_{model_type}_{method}")
    ref = load_file(os.path.join(directory, "reference.safetensors"))
    model = _base(model_type)
    base = _out(model, ref["input_ids"])
    name = model.load_adapter(directory, set_active=True)
    assert model._adapters_state.record(name).config.method == "bottleneck"
    out = _out(model, ref["input_ids"])
    assert not torch.allclose(out, base, atol=1e-3)
    torch.testing.assert_close(out, ref["output"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_adapterhub_loreft_gives_recorded_outputs(model_type):
    directory = os.path.join(DATA, f"ah_{model_type}_loreft")
    ref = load_file(os.path.join(directory, "reference.safetensors"))
    model = _base(model_type)
    base = _out(model, ref["input_ids"])
    name = model.load_adapter(directory, set_active=True)
    config = model._adapters_state.record(name).config
    assert config.method == "reft" and config.r == 2 and config.prefix_positions == 3
    out = _out(model, ref["input_ids"])
    assert not torch.allclose(out, base, atol=1e-3)
    torch.testing.assert_close(out, ref["output"], atol=1e-5, rtol=0)


def test_summary_and_the_readers_use_one_format_rule(tmp_path):
    """``adapters summary`` names the format the loaders read (one rule: checkpoint_io.detect_format)."""
    import json

    from adapters.checkpoint_io import detect_format
    from adapters.cli import _read_adapter_dir

    labels = {"native": "adapters (native)", "peft": "PEFT", "adapterhub": "AdapterHub adapters 1.x"}
    model = adapters.init(tiny_model("bert"))
    model.add_adapter("x", config="lora")
    model.save_adapter(str(tmp_path / "native"), "x")
    folders = [str(tmp_path / "native")] + [os.path.join(DATA, d) for d in sorted(os.listdir(DATA))
                                             if os.path.exists(os.path.join(DATA, d, "adapter_config.json"))]
    seen = set()
    for folder in folders:
        with open(os.path.join(folder, "adapter_config.json"), encoding="utf-8") as fh:
            kind = detect_format(json.load(fh))
        if kind is None:
            continue
        seen.add(kind)
        assert _read_adapter_dir(folder)["format"] == labels[kind], folder
    assert seen == set(labels)
