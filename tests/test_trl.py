"""Training with a plain ``transformers.Trainer`` and TRL's ``SFTTrainer`` (no AdapterTrainer).

A model prepared with ``adapters.init`` + ``train_adapter`` is checkpointed through its own
``save_pretrained``: adapter files only (``load_adapter(checkpoint)`` reproduces the outputs), plus the
index through which the Trainer's own resume and best-model reload copy the trained weights back in
place. Every test trains a tiny random Qwen3 (hidden 32, 2 layers) with LoRA for a few steps on CPU,
and compares tensors with ``torch.equal``.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import adapters
from adapters import LoRAConfig
from adapters.checkpoint import adapter_tensors
from adapters.testing import tiny_dataset, tiny_model

SEQ = 10
ADAPTER_ONLY = {"adapter_trainer.json", "adapter_config.json", "adapter.safetensors", "model.safetensors.index.json",
                "resume_weights.safetensors", "optimizer.pt", "trainer_state.json"}
FULL_MODEL = {"model.safetensors", "pytorch_model.bin", "config.json"}


def _model(task: str = "causal_lm", name: str = "a") -> torch.nn.Module:
    model = tiny_model("qwen3", task)
    adapters.init(model)
    model.add_adapter(name, LoRAConfig(r=4, alpha=8, attn_matrices=["q", "v"], output_lora=True))
    model.train_adapter(name)
    return model


ARGS = {"use_cpu": True, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4, "max_steps": 4,
        "learning_rate": 5e-2, "report_to": [], "disable_tqdm": True, "save_strategy": "no", "seed": 0,
        "lr_scheduler_type": "constant", "dataloader_num_workers": 0}


def _args(out, **kw) -> TrainingArguments:
    return TrainingArguments(str(out), **{**ARGS, **kw})


def _frozen(model) -> dict[str, torch.Tensor]:
    own = model._adapters_state.owned_parameter_ids()
    return {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in own and not p.requires_grad}


def _assert_trained(before: dict, after: dict, frozen_before: dict, model) -> None:
    assert set(before) == set(after)
    assert all(not torch.equal(before[k], after[k]) for k in before), "every LoRA tensor (A and B) has moved"
    frozen_after = dict(model.named_parameters())
    assert frozen_before
    for name, value in frozen_before.items():
        assert torch.equal(frozen_after[name], value), name


def _assert_same_outputs(a, b) -> None:
    a.eval()
    b.eval()
    x = torch.randint(4, 128, (2, SEQ), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out_a, out_b = a(input_ids=x).logits, b(input_ids=x).logits
    assert torch.equal(out_a, out_b)


def _assert_equal_tensors(got: dict, want: dict) -> None:
    assert set(got) == set(want) and want
    for k in want:
        assert torch.equal(got[k], want[k]), k


# ----------------------------------------------------------------------------------- transformers.Trainer
def test_trainer_checkpoints_hold_the_adapter_alone_and_reload_exactly(tmp_path):
    model = _model()
    before, frozen = adapter_tensors(model, "a"), _frozen(model)
    trainer = Trainer(model=model, args=_args(tmp_path, save_strategy="steps", save_steps=2),
                      train_dataset=tiny_dataset())
    trainer.train()
    live = adapter_tensors(model, "a")
    _assert_trained(before, live, frozen, model)

    ckpt = tmp_path / "checkpoint-4"
    files = set(os.listdir(ckpt))
    assert ADAPTER_ONLY <= files and not files & FULL_MODEL, files
    manifest = json.loads((ckpt / "adapter_trainer.json").read_text())
    assert manifest["adapters"] == {"a": "."} and manifest["trainable"] == ["a"]
    _assert_equal_tensors(load_file(str(ckpt / "adapter.safetensors")), live)
    # the resume index names exactly the adapter's tensors, under the model's own keys
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    resume = load_file(str(ckpt / "resume_weights.safetensors"))
    lora_keys = {k for k in model.state_dict() if ".adapters.a.lora_" in k}
    assert set(index["weight_map"]) == set(resume) == lora_keys and len(lora_keys) == len(live)
    # the optimizer holds the adapter only: two Adam moments per LoRA tensor
    assert len(torch.load(ckpt / "optimizer.pt", weights_only=True)["state"]) == len(live)

    fresh = adapters.init(tiny_model("qwen3", "causal_lm"))
    assert fresh.load_adapter(str(ckpt), set_active=True) == "a"
    _assert_same_outputs(fresh, model)
    again = adapters.load_model(tiny_model("qwen3", "causal_lm"), str(ckpt), set_active=True)
    _assert_same_outputs(again, model)
    with pytest.raises((OSError, KeyError)):  # not a full model: plain transformers cannot load it
        AutoModelForCausalLM.from_pretrained(str(ckpt))


def test_trainer_resume_continues_bit_for_bit_with_head_and_optimizer(tmp_path):
    # sequence classification: the "score" head trains beside the adapter and is checkpointed too
    full = _model("seq_cls")
    Trainer(model=full, args=_args(tmp_path / "full", max_steps=6, save_strategy="steps", save_steps=3),
            train_dataset=tiny_dataset(labels="cls")).train()
    ckpt = tmp_path / "full" / "checkpoint-3"
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["score.weight"] == "trainable_params.safetensors"

    resumed = _model("seq_cls")
    live = {id(p) for p in resumed.parameters()}
    trainer = Trainer(model=resumed, args=_args(tmp_path / "resumed", max_steps=6),
                      train_dataset=tiny_dataset(labels="cls"))
    trainer.train(resume_from_checkpoint=str(ckpt))
    assert trainer.state.global_step == 6
    _assert_equal_tensors(adapter_tensors(resumed, "a"), adapter_tensors(full, "a"))
    assert torch.equal(resumed.score.weight, full.score.weight)
    # restored in place: the optimizer steps the model's own parameters, and its state was kept
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} <= live
    final = torch.load(tmp_path / "full" / "checkpoint-6" / "optimizer.pt", weights_only=True)["state"]
    state = trainer.optimizer.state_dict()["state"]
    assert set(state) == set(final)
    for i in final:
        assert torch.equal(state[i]["exp_avg"], final[i]["exp_avg"])
        assert torch.equal(state[i]["exp_avg_sq"], final[i]["exp_avg_sq"])
        assert int(state[i]["step"]) == int(final[i]["step"]) == 6


def test_trainer_load_best_model_at_end_restores_the_best_adapter(tmp_path):
    model = _model()
    scores = iter([1.0, 0.0, 0.0])  # the first evaluation is the best one
    args = _args(tmp_path, max_steps=6, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                 load_best_model_at_end=True, metric_for_best_model="score", greater_is_better=True)
    trainer = Trainer(model=model, args=args, train_dataset=tiny_dataset(), eval_dataset=tiny_dataset(4, seed=1),
                      compute_metrics=lambda _pred: {"score": next(scores)},
                      preprocess_logits_for_metrics=lambda logits, _: logits[..., :1])
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-2")
    best = load_file(str(tmp_path / "checkpoint-2" / "adapter.safetensors"))
    last = load_file(str(tmp_path / "checkpoint-6" / "adapter.safetensors"))
    assert any(not torch.equal(best[k], last[k]) for k in best)
    _assert_equal_tensors(adapter_tensors(model, "a"), best)


def test_save_model_and_save_pretrained_while_training_write_the_adapter_checkpoint(tmp_path):
    model = _model()
    model.add_adapter("b", "lora")  # added after train_adapter: frozen and inactive, so not part of the checkpoint
    trainer = Trainer(model=model, args=_args(tmp_path / "run", max_steps=2), train_dataset=tiny_dataset(8))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    model.save_pretrained(str(tmp_path / "mine"))
    for out in ("final", "mine"):
        files = set(os.listdir(tmp_path / out))
        assert {"adapter_trainer.json", "adapter.safetensors", "model.safetensors.index.json"} <= files
        assert not files & FULL_MODEL, files
        fresh = adapters.init(tiny_model("qwen3", "causal_lm"))
        fresh.load_adapter(str(tmp_path / out), set_active=True)
        _assert_same_outputs(fresh, model)


def test_two_trained_adapters_get_one_directory_each_and_resume(tmp_path):
    def two():
        model = adapters.init(tiny_model("qwen3", "causal_lm"))
        model.add_adapter("a", LoRAConfig(r=4, attn_matrices=["q"], output_lora=True))
        model.add_adapter("b", LoRAConfig(r=2, attn_matrices=["v"], output_lora=True))
        model.train_adapter(adapters.Stack("a", "b"))
        return model

    model = two()
    Trainer(model=model, args=_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
            train_dataset=tiny_dataset(8)).train()
    ckpt = tmp_path / "checkpoint-2"
    assert json.loads((ckpt / "adapter_trainer.json").read_text())["adapters"] == {"a": "a", "b": "b"}
    assert not (ckpt / "adapter_config.json").exists()
    fresh = adapters.init(tiny_model("qwen3", "causal_lm"))
    fresh.load_adapter(str(ckpt / "a"))
    fresh.load_adapter(str(ckpt / "b"))
    fresh.set_active_adapters(adapters.Stack("a", "b"))
    _assert_same_outputs(fresh, model)
    resumed = two()
    Trainer(model=resumed, args=_args(tmp_path / "r"), train_dataset=tiny_dataset(8))._load_from_checkpoint(str(ckpt))
    for name in ("a", "b"):
        _assert_equal_tensors(adapter_tensors(resumed, name), adapter_tensors(model, name))


HAS_BOTTLENECK = importlib.util.find_spec("adapters_bottleneck") is not None


@pytest.mark.skipif(not HAS_BOTTLENECK, reason="AdapterFusion needs adapters-bottleneck")
def test_trained_fusion_is_checkpointed_and_restored_in_place(tmp_path):
    model = adapters.init(tiny_model("qwen3", "causal_lm"))
    model.add_adapter("x", "seq_bn")
    model.add_adapter("y", "seq_bn")
    fusion = model.add_adapter_fusion(["x", "y"])
    model.train_adapter_fusion(adapters.Fuse("x", "y"))
    Trainer(model=model, args=_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
            train_dataset=tiny_dataset(8)).train()
    ckpt = tmp_path / "checkpoint-2"
    manifest = json.loads((ckpt / "adapter_trainer.json").read_text())
    assert manifest["fusions"] == {fusion: "fusion-x_y"} and manifest["trainable"] == [fusion]
    assert manifest["adapters"] == {"x": "x", "y": "y"}  # active in the fusion: saved too
    state = model._adapters_state
    live = [p.detach().clone() for p in state.fusion_parameters(fusion)]
    with torch.no_grad():
        for p in state.fusion_parameters(fusion):
            p.zero_()
    Trainer(model=model, args=_args(tmp_path / "r"))._load_from_checkpoint(str(ckpt))  # the Trainer's own reader
    for p, q in zip(state.fusion_parameters(fusion), live, strict=True):
        assert torch.equal(p, q)


def test_save_pretrained_without_training_setup_writes_full_model_and_adapter_beside(tmp_path):
    model = _model()
    with torch.no_grad():  # a trained-looking adapter: B no longer zero
        for p in model._adapters_state.adapter_parameters("a"):
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    model.freeze_model(False)  # the whole model trains: no adapter-only checkpoint can hold it
    with pytest.warns(UserWarning, match="merge_and_unload"):
        model.save_pretrained(str(tmp_path))
    files = set(os.listdir(tmp_path))
    assert {"config.json", "model.safetensors", "adapter_trainer.json", "a"} <= files
    assert not files & {"adapter_config.json", "model.safetensors.index.json"}  # from_pretrained reads those
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager")  # the base model
    restored = adapters.init(base)
    restored.load_adapter(str(tmp_path / "a"), set_active=True)
    _assert_same_outputs(restored, model)


# ----------------------------------------------------------------------------------- TRL's SFTTrainer
def _tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, 128)}}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                   pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", bos_token="<bos>")


def _sft_dataset():
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(6, 12, (16,), generator=g).tolist()
    return Dataset.from_dict({"input_ids": [torch.randint(4, 128, (n,), generator=g).tolist() for n in lengths]})


def _sft(model, out, **kw):
    trl = pytest.importorskip("trl")
    args = trl.SFTConfig(str(out), **{**ARGS, "bf16": False, "logging_steps": 1, **kw})  # TRL's default: bf16
    return trl.SFTTrainer(model=model, args=args, train_dataset=_sft_dataset(), processing_class=_tokenizer())


def test_sft_trainer_trains_checkpoints_reloads_and_resumes_exactly(tmp_path):
    full = _model()
    before, frozen = adapter_tensors(full, "a"), _frozen(full)
    trainer = _sft(full, tmp_path / "full", max_steps=4, save_strategy="steps", save_steps=2)
    assert trainer.args.gradient_checkpointing  # TRL's default, kept
    trainer.train()
    _assert_trained(before, adapter_tensors(full, "a"), frozen, full)

    ckpt = tmp_path / "full" / "checkpoint-2"
    files = set(os.listdir(ckpt))
    assert ADAPTER_ONLY <= files and "tokenizer.json" in files and not files & FULL_MODEL, files
    final = tmp_path / "full" / "checkpoint-4"
    fresh = adapters.init(tiny_model("qwen3", "causal_lm"))
    fresh.load_adapter(str(final), set_active=True)
    _assert_same_outputs(fresh, full)

    resumed = _model()
    trainer = _sft(resumed, tmp_path / "resumed", max_steps=4)
    trainer.train(resume_from_checkpoint=str(ckpt))
    assert trainer.state.global_step == 4
    _assert_equal_tensors(adapter_tensors(resumed, "a"), adapter_tensors(full, "a"))
