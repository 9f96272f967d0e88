"""Every LoRA-family shape peft writes, both directions, against peft itself (installed in the tests session).

One test per shape: ``"all-linear"`` (gate / up / down included), per-module ranks and alphas
(``rank_pattern`` / ``alpha_pattern``, several scalings), LoRA on the input embeddings and the LM head,
rsLoRA with mixed ranks, IA3 (output scaling), a SEQ_CLS head as ``modules_to_save``. peft makes the
adapter (weights perturbed so it really acts), we load it and must give peft's outputs; we export it and
peft must give them again. Exports are server-ready: modules named as the causal-LM class names them, ``r``
the largest real tensor rank, ``lora_alpha`` the adapter's scaling at that rank.
"""

from __future__ import annotations

import json

import pytest
import torch

import adapters
from adapters.errors import CheckpointError
from adapters.testing import tiny_inputs, tiny_model

peft = pytest.importorskip("peft")


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _peft_model(config, arch: str = "qwen3", task: str = "causal_lm", seed: int = 0):
    model = peft.get_peft_model(tiny_model(arch, task), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("lora_", "ia3_l", "modules_to_save")):
                p.add_((0.1 * torch.randn(p.shape, generator=gen)).to(p.dtype))
    return model.eval()


def _round_trip(theirs, tmp_path, arch: str = "qwen3", task: str = "causal_lm") -> tuple[dict, torch.nn.Module]:
    """peft -> ours (same logits) -> our PEFT export -> peft (same logits); returns the exported config."""
    inputs = tiny_inputs(tiny_model(arch, task), batch=2, seq=6)
    ref = _logits(theirs, inputs)
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = adapters.init(tiny_model(arch, task))
    plain = _logits(ours, inputs)
    name = ours.load_adapter(str(tmp_path / "peft"), set_active=True)
    assert not torch.allclose(_logits(ours, inputs), plain, atol=1e-4)
    torch.testing.assert_close(_logits(ours, inputs), ref, atol=1e-5, rtol=1e-5)
    ours.save_adapter(str(tmp_path / "ours"), name, format="peft")
    back = peft.PeftModel.from_pretrained(tiny_model(arch, task), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(_logits(back, inputs), ref, atol=1e-5, rtol=1e-5)
    return json.loads((tmp_path / "ours" / "adapter_config.json").read_text()), ours


def test_all_linear(tmp_path):
    cfg, _ours = _round_trip(_peft_model(peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")), tmp_path)
    kinds = {m.rsplit(".", 1)[1] for m in cfg["target_modules"]}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"], cfg["alpha_pattern"]) == (4, 8, {}, {})
    assert all(m.startswith("model.layers.") for m in cfg["target_modules"])


def test_rank_and_alpha_patterns_with_several_scalings(tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             rank_pattern={"down_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
                             alpha_pattern={"v_proj": 3})
    cfg, ours = _round_trip(_peft_model(config), tmp_path)
    native = ours._adapters_state.record(next(iter(ours._adapters_state.adapters))).config
    assert native.rank_pattern and native.alpha_pattern
    assert cfg["r"] == 6  # the largest real rank, as vLLM checks it


def test_input_embeddings_and_lm_head(tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["embed_tokens", "lm_head", "q_proj"])
    cfg, ours = _round_trip(_peft_model(config), tmp_path)
    assert type(ours.model.embed_tokens).__name__ == "LoRAEmbedding"
    assert type(ours.lm_head).__name__ == "LoRALinear"
    assert {"model.embed_tokens", "lm_head"} <= set(cfg["target_modules"])


def test_rslora_with_mixed_ranks(tmp_path):
    config = peft.LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules=["k_proj", "up_proj"],
                             rank_pattern={"up_proj": 2})
    _round_trip(_peft_model(config), tmp_path)


def test_dora_on_every_linear(tmp_path):
    _round_trip(_peft_model(peft.LoraConfig(r=2, target_modules="all-linear", use_dora=True)), tmp_path)


def test_fused_qkv_projection_whole(tmp_path):
    """Phi-3's fused qkv_proj and gate_up_proj adapted whole (as peft does), both ways."""
    cfg, _ours = _round_trip(_peft_model(peft.LoraConfig(r=4, target_modules=["qkv_proj", "gate_up_proj"]), "phi3"),
                            tmp_path, "phi3")
    assert cfg["r"] == 4 and not cfg["rank_pattern"]


def test_ia3_output_scaling(tmp_path):
    config = peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=[])
    cfg, ours = _round_trip(_peft_model(config), tmp_path)
    assert cfg["peft_type"] == "IA3"
    assert ours._adapters_state.record(next(iter(ours._adapters_state.adapters))).config.composition_mode == "scale"


def test_ia3_with_feedforward_modules_scaling_inputs(tmp_path):
    """peft's default IA3 shape for Llama-style models: k, v and down_proj, down_proj scaling its input."""
    config = peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    cfg, ours = _round_trip(_peft_model(config), tmp_path)
    assert cfg["feedforward_modules"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    native = ours._adapters_state.record(next(iter(ours._adapters_state.adapters))).config
    assert native.feedforward_modules == ["layers.0.mlp.down_proj", "layers.1.mlp.down_proj"]


def test_malformed_ia3_vector_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    _peft_model(peft.IA3Config(target_modules=["k_proj"], feedforward_modules=[])).save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.zeros(2, 32)
    save_file(tensors, str(path))
    ours = adapters.init(tiny_model("qwen3", "causal_lm"))
    with pytest.raises(CheckpointError, match="neither an adapter weight"):
        ours.load_adapter(str(tmp_path))
    assert not ours._adapters_state.adapters


def test_base_model_adapter_exports_with_the_causal_lm_names(tmp_path):
    """An adapter trained on Qwen3Model is written as Qwen3ForCausalLM names it (vLLM / peft load it there);
    ``convert --to peft`` of its native checkpoint does the same."""
    base = adapters.init(tiny_model("qwen3"))
    base.add_adapter("a", adapters.LoRAConfig(target_modules=["q_proj", "down_proj"], r=4))
    base.save_adapter(str(tmp_path / "peft"), "a", format="peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert all(m.startswith("model.layers.") for m in cfg["target_modules"])
    base.save_adapter(str(tmp_path / "native"), "a")
    tiny_model("qwen3").save_pretrained(str(tmp_path / "base"))
    from adapters.cli import main

    assert main(["convert", str(tmp_path / "native"), str(tmp_path / "converted"), "--to", "peft",
                 "--model", str(tmp_path / "base")]) == 0
    converted = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert converted["target_modules"] == cfg["target_modules"]


def test_peft_export_carries_a_trained_head_and_embeddings(tmp_path):
    """``save_adapter(..., format="peft", with_head=True)`` never drops the trained head or embeddings."""
    model = adapters.init(tiny_model("bert", "seq_cls"))
    model.add_adapter("a", adapters.LoRAConfig(r=2))
    model.train_adapter("a", train_embeddings=True)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
        model.bert.embeddings.word_embeddings.weight.add_(0.5)
    model.eval()
    inputs = tiny_inputs(model, batch=2, seq=6)
    ref = _logits(model, inputs)
    model.save_adapter(str(tmp_path), "a", format="peft", with_head=True)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {"classifier", "bert.embeddings.word_embeddings"} <= set(cfg["modules_to_save"])
    back = peft.PeftModel.from_pretrained(tiny_model("bert", "seq_cls"), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(back, inputs), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("targets", [["embed_tokens"], ["embed_tokens", "q_proj"], ["lm_head", "q_proj"],
                                     ["embed_tokens", "lm_head", "v_proj"]])
def test_lora_inside_the_embeddings_or_head_after_train_adapter(tmp_path, targets):
    """A LoRA on the input embeddings or the LM head lives inside those modules; once ``train_adapter`` made
    it trainable, its tensors are still the adapter's: the PEFT export holds them as ``lora_embedding_A/B`` /
    ``lora_A/B`` only (no ``modules_to_save``) and loads in peft with the same outputs; the native checkpoint
    holds each once, and a fresh model reloads it bit for bit. Embeddings that train whole *and* carry the
    LoRA cannot be written in PEFT's format: refused, nothing written."""
    from safetensors.torch import load_file

    model = adapters.init(tiny_model("qwen3", "causal_lm"))
    model.add_adapter("t", adapters.LoRAConfig(target_modules=targets, r=4))
    model.train_adapter("t")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))  # a training step's worth of change
    model.eval()
    inputs = tiny_inputs(model, batch=2, seq=6)
    ref = _logits(model, inputs)
    model.save_adapter(str(tmp_path / "peft"), "t", format="peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] is None
    keys = set(load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    assert all(".lora_" in k and ".adapters." not in k for k in keys), sorted(keys)  # adapter tensors only
    back = peft.PeftModel.from_pretrained(tiny_model("qwen3", "causal_lm"), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(_logits(back, inputs), ref, atol=1e-5, rtol=1e-5)
    model.save_adapter(str(tmp_path / "native"), "t")
    native = load_file(str(tmp_path / "native" / "adapter.safetensors"))
    assert not any("embed_tokens.weight" in k or "lm_head.weight" in k for k in native), sorted(native)
    fresh = adapters.init(tiny_model("qwen3", "causal_lm"))
    fresh.load_adapter(str(tmp_path / "native"), set_active=True)
    assert torch.equal(_logits(fresh.eval(), inputs), ref)
    if "embed_tokens" in targets:
        model.train_adapter("t", train_embeddings=True)
        with pytest.raises(adapters.AdapterError, match="PEFT holds a module either adapted or saved whole"):
            model.save_adapter(str(tmp_path / "both"), "t", format="peft")
        assert not (tmp_path / "both").exists()


def test_ia3_on_fused_qkv_parts_exports_as_one_scaling(tmp_path):
    """IA3 placed on GPT-2's fused ``c_attn`` parts (k, v) exports as one ``ia3_l`` over the whole projection
    (each part's scales on its rows, 1 on q's): peft computes the same."""
    model = adapters.init(tiny_model("gpt2", "causal_lm"))
    model.add_adapter("t", config="ia3")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model._adapters_state.adapter_parameters("t"):
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    model.set_active_adapters("t")
    inputs = tiny_inputs(model, batch=2, seq=5)
    ref = _logits(model.eval(), inputs)
    model.save_adapter(str(tmp_path), "t", format="peft")
    back = peft.PeftModel.from_pretrained(tiny_model("gpt2", "causal_lm"), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(back, inputs), ref, atol=1e-6, rtol=1e-6)


def test_servable_check_names_what_a_server_would_refuse_or_change(tmp_path):
    model = adapters.init(tiny_model("qwen3", "causal_lm"))
    model.add_adapter("plain", adapters.LoRAConfig(target_modules="all-linear", r=4, rank_pattern={"down_proj": 2},
                                                   alpha_pattern={"down_proj": 4}))  # smaller rank, same scaling
    model.add_adapter("scaled", adapters.LoRAConfig(target_modules=["q_proj", "v_proj"], alpha_pattern={"v_proj": 2}))
    model.add_adapter("dora", adapters.DoRAConfig())
    model.add_adapter("ia3", adapters.IA3Config())
    for name in ("plain", "scaled", "dora", "ia3"):
        model.save_adapter(str(tmp_path / name), name, format="peft")
    assert adapters.servable_problems(str(tmp_path / "plain")) == []  # smaller ranks, one scaling: fine
    adapters.check_servable(str(tmp_path / "plain"))
    assert any("own scaling" in p for p in adapters.servable_problems(str(tmp_path / "scaled")))
    assert any("DoRA" in p for p in adapters.servable_problems(str(tmp_path / "dora")))
    with pytest.raises(adapters.AdapterError, match="LoRA adapters only"):
        adapters.check_servable(str(tmp_path / "ia3"))
    cls = adapters.init(tiny_model("bert", "seq_cls"))
    cls.add_adapter("c", adapters.LoRAConfig())
    cls.train_adapter("c")
    cls.save_adapter(str(tmp_path / "cls"), "c", format="peft")
    assert any("modules_to_save" in p for p in adapters.servable_problems(str(tmp_path / "cls")))


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_encoder_decoder_names(arch, tmp_path):
    """T5's task class holds encoder / decoder itself (no prefix); BART's wraps BartModel under ``model.``."""
    targets = ["q", "v", "wo"] if arch == "t5" else ["q_proj", "v_proj", "fc2"]
    _round_trip(_peft_model(peft.LoraConfig(r=2, target_modules=targets), arch), tmp_path, arch)
    base = adapters.init(tiny_model(arch))
    base.add_adapter("a", adapters.LoRAConfig(target_modules=targets, r=2))
    base.save_adapter(str(tmp_path / "base"), "a", format="peft")
    names = json.loads((tmp_path / "base" / "adapter_config.json").read_text())["target_modules"]
    assert all(n.startswith("encoder." if arch == "t5" else "model.") or n.startswith("decoder.") for n in names)
    assert any(n.startswith("model.") for n in names) == (arch == "bart")


def test_convert_servable_refuses_and_writes_nothing(tmp_path, capsys):
    from adapters.cli import main

    tiny_model("qwen3").save_pretrained(str(tmp_path / "base"))
    model = adapters.init(tiny_model("qwen3"))
    model.add_adapter("ok", adapters.LoRAConfig(target_modules="all-linear"))
    model.add_adapter("d", adapters.DoRAConfig())
    for name in ("ok", "d"):
        model.save_adapter(str(tmp_path / name), name)
    common = ["--to", "peft", "--servable", "--model", str(tmp_path / "base")]
    assert main(["convert", str(tmp_path / "ok"), str(tmp_path / "ok_peft"), *common]) == 0
    assert main(["convert", str(tmp_path / "d"), str(tmp_path / "d_peft"), *common]) == 2
    assert "DoRA is refused by vLLM" in capsys.readouterr().err
    assert not (tmp_path / "d_peft").exists()


@pytest.mark.parametrize("arch", ["phi3", "gpt2"])
def test_fused_qkv_parts_export_states_the_real_rank(arch, tmp_path):
    """Interface-placed LoRA on the parts of a fused q|k|v projection (Phi-3's qkv_proj, GPT-2's c_attn): the
    file's ``r`` is the largest real tensor rank (what vLLM sizes by), every module's ``lora_alpha / r`` the
    adapter's scaling where no pattern says otherwise, and peft reproduces the outputs."""
    model = adapters.init(tiny_model(arch, "causal_lm"))
    model.add_adapter("a", adapters.LoRAConfig(r=2, alpha=6, attn_matrices=["q", "k", "v", "o"], init_weights="bert"))
    model.set_active_adapters("a")
    inputs = tiny_inputs(model, batch=2, seq=6)
    ref = _logits(model, inputs)
    model.save_adapter(str(tmp_path), "a", format="peft")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    from safetensors.torch import load_file

    ranks = {k: v.shape[0] for k, v in load_file(str(tmp_path / "adapter_model.safetensors")).items()
             if k.endswith("lora_A.weight")}
    assert cfg["r"] == max(ranks.values()) == 6  # three parts of rank 2 stacked
    assert cfg["lora_alpha"] / cfg["r"] == 3.0  # the adapter's scaling, alpha / r = 6 / 2
    assert adapters.servable_problems(str(tmp_path)) == []
    back = peft.PeftModel.from_pretrained(tiny_model(arch, "causal_lm"), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(back, inputs), ref, atol=1e-5, rtol=1e-5)
