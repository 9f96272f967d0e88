"""Prompt / prefix checkpoints of PEFT and AdapterHub load and give the outputs those libraries recorded; prompt
and prefix adapters stack with LoRA.

Fixtures: ``scripts/make_reference_checkpoints.py peft-prompt`` (peft 0.21, transformers 5) and
``adapterhub-prefix`` (AdapterHub ``adapters`` 1.3, transformers 4.57) on tiny models, padded inputs included.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import adapters
import adapters.composition as ac
from adapters.errors import CheckpointError
from adapters.testing import tiny_inputs, tiny_model
from adapters.testing.conformance import perturb

DATA = os.path.join(os.path.dirname(__file__), "data", "compat")


def _ah_base(model_type: str):
    from transformers import AutoConfig, AutoModel

    folder = "ah_llama_mha_prefix_base" if model_type == "llama_mha" else f"ah_{model_type}_base"
    directory = os.path.join(DATA, folder)
    with open(os.path.join(directory, "config.json")) as fh:
        cfg = json.load(fh)
    config = AutoConfig.for_model(cfg.pop("model_type"), **{k: v for k, v in cfg.items()
                                                            if k not in ("transformers_version", "architectures")})
    config._attn_implementation = "eager"
    model = AutoModel.from_config(config, add_pooling_layer=False) if config.model_type == "bert" else \
        AutoModel.from_config(config)
    state = {k: v.float() for k, v in load_file(os.path.join(directory, "model.safetensors")).items()}
    model.load_state_dict(state, strict=False)
    return adapters.init(model.eval())


@pytest.mark.parametrize(("base", "adapter"), [("bert", "prefix"), ("bert", "prefix_flat_gated"),
                                               ("llama_mha", "prefix")])
def test_adapterhub_prefix_checkpoints_give_the_recorded_outputs(base, adapter):
    directory = os.path.join(DATA, f"ah_{base}_{adapter}")
    ref = load_file(os.path.join(directory, "reference.safetensors"))
    model = _ah_base(base)
    inputs = {"input_ids": ref["input_ids"], "attention_mask": ref["attention_mask"]}
    with torch.no_grad():
        plain = model(**inputs).last_hidden_state
        assert model.load_adapter(directory, set_active=True) == adapter
        out = model(**inputs).last_hidden_state
    real = ref["attention_mask"].bool()
    assert not torch.allclose(out[real], plain[real], atol=1e-3)
    torch.testing.assert_close(out[real], ref["output"][real], rtol=0, atol=1e-5)
    config = model.adapters_config[adapter]
    assert config.flat == (adapter != "prefix") and config.use_gating == (adapter != "prefix")


def test_adapterhub_prefix_on_grouped_query_attention_is_refused_naming_the_cause():
    model = adapters.init(tiny_model("qwen3", "base"))  # 2 key/value heads for 4 query heads
    directory = os.path.join(DATA, "ah_llama_mha_prefix")
    with pytest.raises(CheckpointError, match="llama"):
        model.load_adapter(directory)
    model = _ah_base("llama")  # AdapterHub's own tiny Llama with 1 key/value head
    with pytest.raises(CheckpointError, match="num_attention_heads"):
        model.load_adapter(directory)
    assert not model.adapters_config


@pytest.mark.parametrize(("name", "arch", "task"), [("peft_qwen3_prompt", "qwen3", "causal_lm"),
                                                    ("peft_bert_prompt", "bert", "base"),
                                                    ("peft_qwen3_prefix", "qwen3", "causal_lm"),
                                                    ("peft_gpt2_prefix", "gpt2", "causal_lm")])
def test_peft_prompt_and_prefix_checkpoints_give_the_recorded_outputs(name, arch, task):
    directory = os.path.join(DATA, name)
    ref = load_file(os.path.join(directory, "reference.safetensors"))
    model = adapters.init(tiny_model(arch, task))
    inputs = {"input_ids": ref["input_ids"], "attention_mask": ref["attention_mask"]}
    with torch.no_grad():
        plain = model(**inputs)[0]
        model.load_adapter(directory, set_active=True)
        out = model(**inputs)[0]
    assert out.shape == plain.shape == ref["output"].shape
    assert not torch.allclose(out, plain, atol=1e-3)
    torch.testing.assert_close(out, ref["output"], rtol=0, atol=1e-5)


def test_peft_round_trip_through_the_native_format(tmp_path):
    model = adapters.init(tiny_model("qwen3", "causal_lm"))
    model.load_adapter(os.path.join(DATA, "peft_qwen3_prefix"), set_active=True)
    name = next(iter(model.adapters_config))
    assert model.adapters_config[name].offset_positions and model.adapters_config[name].flat
    model.train_adapter(name)
    model.eval()
    model.save_adapter(str(tmp_path), name)
    other = adapters.init(tiny_model("qwen3", "causal_lm"))
    other.load_adapter(str(tmp_path), set_active=True)
    inputs = tiny_inputs(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, other(**inputs).logits)


@pytest.mark.parametrize("config", ["prefix_tuning[prefix_length=3, bottleneck_size=8]",
                                    "prompt_tuning[prompt_length=3]"])
def test_stack_with_lora_is_both_adapters(config):
    """``Stack(prefix, lora)``: LoRA's projections see the prefix-tuned attention (and vice versa); each alone
    differs, the stack equals the two applied together with the LoRA merged into the weights."""
    model = adapters.init(tiny_model("llama", "causal_lm"))
    model.add_adapter("p", config=config)
    model.add_adapter("l", config="lora[r=2, init_weights='bert']")
    perturb(model, "p", std=0.5)
    inputs = tiny_inputs(model)
    with torch.no_grad():
        outs = {}
        for setup in ("p", "l", ac.Stack("p", "l")):
            with adapters.AdapterSetup(setup):
                outs[str(setup)] = model(**inputs).logits
        model.set_active_adapters(ac.Stack("l", "p"))
        model.merge_adapter("l")
        merged = model(**inputs).logits
        model.reset_adapter()
    stacked = outs[str(ac.Stack("p", "l"))]
    assert not torch.allclose(stacked, outs["p"], atol=1e-4) and not torch.allclose(stacked, outs["l"], atol=1e-4)
    torch.testing.assert_close(merged, stacked, rtol=1e-4, atol=1e-5)
    model.train_adapter(ac.Stack("p", "l"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora" in n for n in trainable) and any("prompt_tuning" in n or "prefix" in n for n in trainable)


def test_adapterhub_prefix_with_options_we_lack_is_refused(tmp_path):
    import shutil

    directory = tmp_path / "ah_bert_prefix"
    shutil.copytree(os.path.join(DATA, "ah_bert_prefix"), directory)
    meta = json.loads((directory / "adapter_config.json").read_text())
    meta["config"]["future_knob"] = 3
    (directory / "adapter_config.json").write_text(json.dumps(meta))
    model = _ah_base("bert")
    with pytest.raises(CheckpointError, match="future_knob"):
        model.load_adapter(str(directory))
    assert not model.adapters_config
