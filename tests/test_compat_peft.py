"""PEFT LoRA / DoRA / IA3 interoperability: read PEFT checkpoints, write them, round trips (SPEC §6).

Exports name modules as the task-model class does (``model.layers...`` for a ``Qwen3Model`` adapter), so
peft loads them into the task model (``Qwen3ForCausalLM``, ``BertForSequenceClassification``); its base
part is given the very weights of our base model and compared hidden state for hidden state."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapters
from adapters.errors import CheckpointError
from adapters.testing import tiny_inputs, tiny_model

DATA = os.path.join(os.path.dirname(__file__), "data", "compat")
HAVE_PEFT = importlib.util.find_spec("peft") is not None


def _ours(model_type: str = "qwen3", task: str = "base"):
    model = tiny_model(model_type, task)
    adapters.init(model)
    return model


def _out(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


TASK_OF = {"bert": "seq_cls"}


def _peft_task_model(model_type: str, directory, base: torch.nn.Module | None = None):
    """PeftModel.from_pretrained on the task-model class of ``model_type`` whose base part holds ``base``'s
    weights (default: a fresh ``tiny_model(model_type)``); returns the base part (hidden states out)."""
    from peft import PeftModel

    task = tiny_model(model_type, TASK_OF.get(model_type, "causal_lm"))
    task.base_model.load_state_dict((base or tiny_model(model_type)).state_dict())
    return PeftModel.from_pretrained(task, str(directory)).eval().get_base_model().base_model


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_fixture_made_by_peft_loads_with_identical_outputs(method):
    """Files written by peft.save_pretrained (tests/data/compat/peft_qwen3_*) give PEFT's recorded outputs."""
    directory = os.path.join(DATA, f"peft_qwen3_{method}")
    ref = load_file(os.path.join(directory, "reference.safetensors"))
    model = _ours("qwen3")
    inputs = {"input_ids": ref["input_ids"], "attention_mask": ref["attention_mask"]}
    base = _out(model, inputs)
    name = model.load_adapter(directory, set_active=True)
    config = model._adapters_state.record(name).config
    assert config.r == 2 and config.alpha == 3 and config.use_dora == (method == "dora")
    assert config.target_modules == [f"layers.{i}.{m}" for i in range(2)
                                     for m in ("mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj")]
    out = _out(model, inputs)
    assert not torch.allclose(out, base, atol=1e-3)
    torch.testing.assert_close(out, ref["output"], atol=1e-5, rtol=0)
    model.set_active_adapters(None)
    assert torch.equal(_out(model, inputs), base)


def test_fixture_loads_into_task_model_with_prefix():
    """A PEFT adapter made on Qwen3Model (paths ``layers.0...``) maps onto Qwen3ForCausalLM (``model.layers...``)."""
    directory = os.path.join(DATA, "peft_qwen3_lora")
    ref = load_file(os.path.join(directory, "reference.safetensors"))
    model = _ours("qwen3", "causal_lm")
    inputs = {"input_ids": ref["input_ids"], "attention_mask": ref["attention_mask"]}
    model.load_adapter(directory, set_active=True)
    with torch.no_grad():
        hidden = model.model(**inputs).last_hidden_state
    torch.testing.assert_close(hidden, ref["output"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_dora", [False, True])
def test_round_trip_ours_peft_ours_is_exact(tmp_path, use_dora):
    model = _ours("qwen3")
    inputs = tiny_inputs(model)
    cfg = adapters.LoRAConfig(r=3, alpha=5, attn_matrices=["q", "k", "o"], output_lora=True, leave_out=[1],
                              use_dora=use_dora, init_weights="bert", init_weights_seed=1)
    model.add_adapter("a", cfg)
    model.set_active_adapters("a")
    ref = _out(model, inputs)
    model.save_adapter(str(tmp_path), "a", format="peft")
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    other = _ours("qwen3")
    other.load_adapter(str(tmp_path), load_as="a", set_active=True)
    got = other._adapters_state.record("a").config
    assert (got.r, got.alpha, got.use_dora) == (3, 5, use_dora)
    assert {layer.location for layer in other._adapters_state.layers("a")} == {
        layer.location for layer in model._adapters_state.layers("a")}
    assert torch.equal(_out(other, inputs), ref)
    from adapters.checkpoint import adapter_tensors

    a, b = adapter_tensors(model, "a"), adapter_tensors(other, "a")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_layout_matches_peft_fixture(tmp_path):
    """Our export uses PEFT's key scheme and config keys (checked against files peft itself wrote)."""
    model = _ours("qwen3")
    model.add_adapter("a", adapters.LoRAConfig(r=2, alpha=3, attn_matrices=["q", "v"], output_lora=True))
    model.save_adapter(str(tmp_path), "a", format="peft")
    ours = load_file(str(tmp_path / "adapter_model.safetensors"))
    theirs = load_file(os.path.join(DATA, "peft_qwen3_lora", "adapter_model.safetensors"))
    # the fixture was made on Qwen3Model; our export names modules as Qwen3ForCausalLM does
    theirs = {k.replace("base_model.model.", "base_model.model.model.", 1): v for k, v in theirs.items()}
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    with open(os.path.join(DATA, "peft_qwen3_lora", "adapter_config.json")) as fh:
        ref_cfg = json.load(fh)
    for key in ("peft_type", "r", "lora_alpha", "bias", "use_dora", "use_rslora", "fan_in_fan_out"):
        assert cfg[key] == ref_cfg[key], key


def test_fused_qkv_export_gpt2(tmp_path):
    """GPT-2's fused c_attn: q and v parts (separate A) export as one stacked rank-2r LoRA with rank/alpha patterns.

    PEFT reproduces the outputs exactly (when installed), and so do we reading it back: modules of
    different ranks with one scaling load as one native LoRA (smaller ranks padded with zeros).
    """
    model = _ours("gpt2")
    inputs = tiny_inputs(model)
    model.add_adapter("a", adapters.LoRAConfig(r=2, alpha=4, attn_matrices=["q", "v"], intermediate_lora=True,
                                               init_weights="bert", init_weights_seed=3))
    model.set_active_adapters("a")
    ref = _out(model, inputs)
    model.save_adapter(str(tmp_path), "a", format="peft")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    # r is the real (largest) tensor rank, as servers read it; c_fc keeps rank 2 with alpha 4 (one scaling)
    assert (cfg["r"], cfg["lora_alpha"]) == (4, 8)
    assert set(cfg["rank_pattern"].values()) == {2} and set(cfg["alpha_pattern"].values()) == {4}
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    b = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert b.shape == (96, 4) and torch.count_nonzero(b[32:64]) == 0  # no k part
    if HAVE_PEFT:
        back = _peft_task_model("gpt2", tmp_path)
        torch.testing.assert_close(_out(back, inputs), ref, atol=1e-5, rtol=0)
    other = _ours("gpt2")
    other.load_adapter(str(tmp_path), set_active=True)
    torch.testing.assert_close(_out(other, inputs), ref, atol=1e-5, rtol=0)


@pytest.mark.skipif(not HAVE_PEFT, reason="peft is not installed; the fixture tests above cover reading")
@pytest.mark.parametrize("model_type,targets,use_dora", [
    (model_type, targets, use_dora)
    for model_type, targets in (("qwen3", ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]),
                                ("llama", ["k_proj", "v_proj"]),
                                ("bert", ["query", "value", "output.dense", "intermediate.dense"]),
                                ("gpt2", ["c_attn", "c_fc"]))
    for use_dora in (False, True)
    if not (use_dora and model_type == "gpt2")  # DoRA on a fused qkv is refused by design (tested below)
])
def test_live_peft_both_directions(tmp_path, model_type, targets, use_dora):
    """peft-made adapter -> ours (same outputs); our export -> peft (same outputs)."""
    from peft import LoraConfig, get_peft_model

    base = tiny_model(model_type, "base")
    inputs = tiny_inputs(base)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=6, target_modules=targets, use_dora=use_dora,
                                                 init_lora_weights=False, use_rslora=model_type == "llama"))
    ref = _out(peft_model, inputs)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    ours = _ours(model_type)
    plain = _out(ours, inputs)
    name = ours.load_adapter(str(tmp_path / "peft"), set_active=True)
    out = _out(ours, inputs)
    assert not torch.allclose(out, plain, atol=1e-4)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    ours.save_adapter(str(tmp_path / "export"), name, format="peft")
    back = _peft_task_model(model_type, tmp_path / "export")
    torch.testing.assert_close(_out(back, inputs), ref, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- unsupported -> clear errors
def _peft_copy(tmp_path, method="lora"):
    import shutil

    target = tmp_path / "ckpt"
    shutil.copytree(os.path.join(DATA, f"peft_qwen3_{method}"), target)
    return target


def _edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes,needle", [
    ({"bias": "all"}, "bias"),
    ({"peft_type": "LOHA"}, "no installed method reads"),
    ({"some_future_option": {"x": 1}}, "some_future_option"),
    ({"alpha_pattern": []}, "alpha_pattern"),
    ({"r": "eight"}, "r='eight' \\(not a number\\)"),
])
def test_unsupported_peft_options_raise(tmp_path, changes, needle):
    directory = _peft_copy(tmp_path)
    _edit_config(directory, **changes)
    model = _ours("qwen3")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=needle):
        model.load_adapter(str(directory))
    assert not model._adapters_state.adapters
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_unmapped_module_names_it(tmp_path):
    directory = _peft_copy(tmp_path)
    path = directory / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors["base_model.model.layers.0.mlp.gate_projj.lora_A.weight"] = torch.zeros(2, 32)
    tensors["base_model.model.layers.0.mlp.gate_projj.lora_B.weight"] = torch.zeros(64, 2)
    save_file(tensors, str(path))
    model = _ours("qwen3")
    with pytest.raises(CheckpointError, match=r"does not have: \['layers.0.mlp.gate_projj'\]"):
        model.load_adapter(str(directory))
    assert not model._adapters_state.adapters


def test_export_rejects_what_peft_lora_cannot_hold(tmp_path):
    model = _ours("qwen3")
    model.add_adapter("mtl", adapters.MTLLoRAConfig())
    with pytest.raises(adapters.AdapterError, match="MTLLoRAConfig"):
        model.save_adapter(str(tmp_path), "mtl", format="peft")
    model.add_adapter("g", adapters.LoRAConfig(use_gating=True))
    with pytest.raises(adapters.AdapterError, match="use_gating"):
        model.save_adapter(str(tmp_path), "g", format="peft")
    with pytest.raises(adapters.AdapterError, match="Unknown checkpoint format"):
        model.save_adapter(str(tmp_path), "g", format="onnx")
    gpt2 = _ours("gpt2")
    gpt2.add_adapter("d", adapters.DoRAConfig(attn_matrices=["q", "v"]))
    with pytest.raises(adapters.AdapterError, match="DoRA on a fused"):
        gpt2.save_adapter(str(tmp_path / "d"), "d", format="peft")


EXPORT_ARCHS = ["qwen3", "llama", "gpt2", "phi3", "gpt_neox", "bert", "bart"]
EXPORT_CONFIGS = {
    "qv": "lora[r=2, alpha=4, init_weights='bert']",
    "all": "lora[r=3, alpha=5, attn_matrices=['q','k','v','o'], intermediate_lora=True, output_lora=True, "
           "init_weights='bert']",
    "rslora": "lora[r=4, alpha=3, use_rslora=True, attn_matrices=['q','k','v'], init_weights='bert']",
    "dora": "lora[r=2, alpha=4, use_dora=True, attn_matrices=['q','v'], init_weights='bert']",
}


@pytest.mark.parametrize("config", sorted(EXPORT_CONFIGS))
@pytest.mark.parametrize("model_type", EXPORT_ARCHS)
def test_our_peft_export_is_read_back_exactly_by_us_and_by_peft(tmp_path, model_type, config):
    """Every architecture and LoRA shape the PEFT export accepts (fused Conv1D / Linear q|k|v included)
    loads into a fresh model, ours and peft's, with the exporting model's outputs."""
    torch.manual_seed(0)
    model = _ours(model_type)
    inputs = tiny_inputs(model)
    model.add_adapter("a", EXPORT_CONFIGS[config])
    model.set_active_adapters("a")
    ref = _out(model, inputs)
    try:
        model.save_adapter(str(tmp_path), "a", format="peft")
    except adapters.AdapterError as exc:  # refused by design: DoRA on a fused q|k|v projection
        assert config == "dora" and "fused" in str(exc)
        return
    ours = _ours(model_type)
    ours.load_adapter(str(tmp_path), set_active=True)
    torch.testing.assert_close(_out(ours, inputs), ref, atol=1e-5, rtol=1e-5)
    if HAVE_PEFT:
        theirs = _peft_task_model(model_type, tmp_path, base=tiny_model(model_type))
        torch.testing.assert_close(_out(theirs, inputs), ref, atol=1e-5, rtol=1e-5)



@pytest.mark.skipif(not HAVE_PEFT, reason="peft is not installed")
def test_classifier_heads_travel_as_modules_to_save_both_ways(tmp_path):
    """A SEQ_CLS adapter with its trained classifier: peft -> us and us -> peft give identical outputs."""
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    theirs = get_peft_model(tiny_model("bert", "seq_cls"),
                            LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"]))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(0.1 * torch.randn_like(p))
    theirs.eval()
    inputs = tiny_inputs(tiny_model("bert", "seq_cls"))
    ref = _out(theirs, inputs)
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = _ours("bert", "seq_cls")
    ours.load_adapter(str(tmp_path / "peft"), set_active=True)
    torch.testing.assert_close(_out(ours, inputs), ref, atol=1e-5, rtol=1e-5)
    # and back: our PEFT export carries the head, peft applies it
    ours.save_adapter(str(tmp_path / "ours"), "peft", format="peft")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["classifier"]
    back = PeftModel.from_pretrained(tiny_model("bert", "seq_cls"), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(_out(back, inputs), ref, atol=1e-5, rtol=1e-5)
