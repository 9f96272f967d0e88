"""AdapterTrainer: refusal without trainable adapters, optimizer scope, adapter-only checkpoints, exact
resume, best-model reload, gradient accumulation, mixed precision, gradient checkpointing, torch.compile.

Every test trains a tiny random Qwen3 (hidden 32, 2 layers) with LoRA for a few steps on CPU.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainingArguments

import adapters
from adapters import AdapterTrainer, LoRAConfig
from adapters.checkpoint import adapter_tensors
from adapters.errors import AdapterError
from adapters.testing import tiny_dataset, tiny_model

HAS_BOTTLENECK = importlib.util.find_spec("adapters_bottleneck") is not None
SEQ = 10


def _model(task: str = "causal_lm", dtype: torch.dtype | None = None, freeze_head: bool = True):
    model = tiny_model("qwen3", task)
    if dtype is not None:
        model.to(dtype)
    adapters.init(model)
    model.add_adapter("a", LoRAConfig(r=4, alpha=8, attn_matrices=["q", "v"], output_lora=True))
    model.train_adapter("a")
    if freeze_head and task == "causal_lm":
        model.lm_head.weight.requires_grad_(False)
    return model


def _args(out: str, **kw) -> TrainingArguments:
    base = {"use_cpu": True, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4, "max_steps": 4,
            "learning_rate": 5e-2, "report_to": [], "disable_tqdm": True, "save_strategy": "no", "seed": 0,
            "lr_scheduler_type": "constant", "dataloader_num_workers": 0}
    base.update(kw)
    return TrainingArguments(str(out), **base)


def _weights(model) -> dict[str, torch.Tensor]:
    return adapter_tensors(model, "a")


def _base_snapshot(model) -> dict[str, torch.Tensor]:
    state = model._adapters_state
    own = {id(p) for p in state.adapter_parameters("a")}
    return {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in own}


# ----------------------------------------------------------------------------------------------- refusal
def test_refuses_model_without_init(tmp_path):
    with pytest.raises(AdapterError, match=r"adapters\.init"):
        AdapterTrainer(model=tiny_model("qwen3", "causal_lm"), args=_args(tmp_path), train_dataset=tiny_dataset(4))


def test_refuses_to_train_without_trainable_adapter(tmp_path):
    model = tiny_model("qwen3", "causal_lm")
    adapters.init(model)
    trainer = AdapterTrainer(model=model, args=_args(tmp_path), train_dataset=tiny_dataset(4))
    with pytest.raises(AdapterError, match="no adapter is set to be trained"):
        trainer.train()
    model.add_adapter("a", "lora")
    for p in model.parameters():  # an adapter exists, but nothing of it requires grad
        p.requires_grad_(False)
    with pytest.raises(AdapterError, match=r"train_adapter"):
        trainer.train()
    assert trainer.state.global_step == 0


# ----------------------------------------------------------------------------------------------- training
def test_trains_only_adapter_weights_and_optimizer_sees_only_them(tmp_path):
    model = _model()
    before_base = _base_snapshot(model)
    before = _weights(model)
    trainer = AdapterTrainer(model=model, args=_args(tmp_path), train_dataset=tiny_dataset())
    trainer.train()
    trainable = {id(p) for p in model._adapters_state.adapter_parameters("a")}
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == trainable
    after = _weights(model)
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(moved) == len(before)  # every LoRA tensor (A and B) has been updated
    for name, p in model.named_parameters():
        if name in before_base:
            assert torch.equal(p, before_base[name]), name


def test_checkpoint_holds_only_adapter_weights_in_native_format(tmp_path):
    model = _model()
    trainer = AdapterTrainer(model=model, args=_args(tmp_path, save_strategy="steps", save_steps=2),
                             train_dataset=tiny_dataset())
    trainer.train()
    ckpt = tmp_path / "checkpoint-4"
    files = set(os.listdir(ckpt))
    assert {"adapter_trainer.json", "a", "optimizer.pt", "trainer_state.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "config.json", "trainable_params.safetensors"}
    manifest = json.loads((ckpt / "adapter_trainer.json").read_text())
    assert manifest["adapters"] == {"a": "a"} and manifest["trainable"] == ["a"]
    saved = load_file(str(ckpt / "a" / "adapter.safetensors"))
    live = _weights(model)
    assert set(saved) == set(live)
    for k in live:
        assert torch.equal(saved[k], live[k])
    # optimizer state covers the adapter only: 2 Adam moments per LoRA tensor, nothing of the base model
    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert len(opt["state"]) == len(live)
    # the checkpoint loads into a fresh model with identical outputs
    fresh = tiny_model("qwen3", "causal_lm")
    adapters.init(fresh)
    fresh.load_adapter(str(ckpt / "a"), set_active=True)
    model.eval()
    x = torch.randint(4, 128, (2, SEQ))
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=x).logits, model(input_ids=x).logits)
    # the checkpoint directory itself is not an adapter: the error names the subdirectory to load
    with pytest.raises(adapters.CheckpointError, match=r"holds saved adapters in subdirectories \['a'\]; load one"):
        fresh.load_adapter(str(ckpt))


def test_resume_from_checkpoint_restores_adapters_exactly(tmp_path):
    full = _model()
    AdapterTrainer(model=full, args=_args(tmp_path / "full", max_steps=6, save_strategy="steps", save_steps=3),
                   train_dataset=tiny_dataset()).train()
    expected = _weights(full)

    resumed = _model()
    trainer = AdapterTrainer(model=resumed, args=_args(tmp_path / "resumed", max_steps=6), train_dataset=tiny_dataset())
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert trainer.state.global_step == 6
    got = _weights(resumed)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-6)


def test_resume_restores_trained_head(tmp_path):
    # sequence classification: the "score" head lives outside the base model and is trained alongside
    model = _model("seq_cls")
    assert model.score.weight.requires_grad
    AdapterTrainer(model=model, args=_args(tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=2),
                   train_dataset=tiny_dataset(labels="cls")).train()
    ckpt = tmp_path / "run" / "checkpoint-2"
    head = load_file(str(ckpt / "trainable_params.safetensors"))
    assert set(head) == {"score.weight"}
    fresh = _model("seq_cls")
    trainer = AdapterTrainer(model=fresh, args=_args(tmp_path / "resumed", max_steps=4), train_dataset=tiny_dataset())
    trainer._load_from_checkpoint(str(ckpt))
    assert torch.equal(fresh.score.weight, head["score.weight"])
    saved = load_file(str(ckpt / "a" / "adapter.safetensors"))
    for k, v in _weights(fresh).items():
        assert torch.equal(v, saved[k])


def test_load_best_model_at_end_reloads_best_adapters(tmp_path):
    model = _model()
    calls = []

    def metric(_pred) -> dict[str, float]:  # the first evaluation is the best one
        calls.append(1)
        return {"score": 1.0 if len(calls) == 1 else 0.0}

    args = _args(tmp_path, max_steps=6, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                 load_best_model_at_end=True, metric_for_best_model="score", greater_is_better=True,
                 save_total_limit=5)
    trainer = AdapterTrainer(model=model, args=args, train_dataset=tiny_dataset(), eval_dataset=tiny_dataset(4, seed=1),
                             compute_metrics=metric, preprocess_logits_for_metrics=lambda logits, _: logits[..., :1])
    trainer.train()
    assert len(calls) == 3
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-2")
    best = load_file(str(tmp_path / "checkpoint-2" / "a" / "adapter.safetensors"))
    last = load_file(str(tmp_path / "checkpoint-6" / "a" / "adapter.safetensors"))
    live = _weights(model)
    assert any(not torch.equal(best[k], last[k]) for k in best)
    for k in best:
        assert torch.equal(live[k], best[k])


def test_gradient_accumulation_matches_large_batch(tmp_path):
    big = _model()
    AdapterTrainer(model=big, args=_args(tmp_path / "big", max_steps=2, optim="sgd", learning_rate=1.0),
                   train_dataset=tiny_dataset(8)).train()
    acc = _model()
    AdapterTrainer(model=acc, args=_args(tmp_path / "acc", max_steps=2, optim="sgd", learning_rate=1.0,
                                         per_device_train_batch_size=2, gradient_accumulation_steps=2),
                   train_dataset=tiny_dataset(8)).train()
    start = _weights(_model())
    w_big, w_acc = _weights(big), _weights(acc)
    for k in w_big:
        torch.testing.assert_close(w_acc[k], w_big[k], rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(w_big[k], start[k]) for k in start)


def test_gradient_checkpointing_gives_same_updates(tmp_path):
    plain = _model()
    AdapterTrainer(model=plain, args=_args(tmp_path / "plain", max_steps=2), train_dataset=tiny_dataset(8)).train()
    ckpt = _model()
    trainer = AdapterTrainer(model=ckpt, args=_args(tmp_path / "gc", max_steps=2, gradient_checkpointing=True),
                             train_dataset=tiny_dataset(8))
    trainer.train()
    assert ckpt.model.gradient_checkpointing
    start = _weights(_model())
    w_plain, w_gc = _weights(plain), _weights(ckpt)
    for k in w_plain:
        torch.testing.assert_close(w_gc[k], w_plain[k], rtol=1e-5, atol=1e-6)
        assert not torch.equal(w_gc[k], start[k])


def test_bf16_autocast_on_cpu_keeps_fp32_weights(tmp_path):
    model = _model()
    before = _weights(model)
    out = AdapterTrainer(model=model, args=_args(tmp_path, max_steps=2, bf16=True),
                         train_dataset=tiny_dataset(8)).train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    after = _weights(model)
    assert all(v.dtype == torch.float32 for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bf16_model_stays_bf16_no_silent_upcast(tmp_path):
    model = _model(dtype=torch.bfloat16)
    frozen = _base_snapshot(model)
    before = _weights(model)
    assert all(v.dtype == torch.bfloat16 for v in before.values())  # adapters follow the model's dtype
    AdapterTrainer(model=model, args=_args(tmp_path, max_steps=2, bf16=True), train_dataset=tiny_dataset(8)).train()
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16, name
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    for b in model.buffers():
        assert not b.is_floating_point() or b.dtype in (torch.bfloat16, torch.float32)
    after = _weights(model)
    assert all(v.dtype == torch.bfloat16 for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_torch_compile_trains_and_checkpoints(tmp_path):
    model = _model()
    before = _weights(model)
    trainer = AdapterTrainer(model=model, args=_args(tmp_path, max_steps=2, torch_compile=True,
                                                     torch_compile_backend="aot_eager", save_strategy="steps",
                                                     save_steps=2), train_dataset=tiny_dataset(8))
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    after = _weights(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    saved = load_file(str(tmp_path / "checkpoint-2" / "a" / "adapter.safetensors"))
    assert set(saved) == set(after)
    for k in after:
        assert torch.equal(saved[k], after[k])


@pytest.mark.skipif(not HAS_BOTTLENECK, reason="AdapterFusion needs adapters-bottleneck")
def test_fusion_training_checkpoints_and_restores_fusion(tmp_path):
    model = tiny_model("qwen3", "causal_lm")
    adapters.init(model)
    model.add_adapter("x", "seq_bn")
    model.add_adapter("y", "seq_bn")
    fusion = model.add_adapter_fusion(["x", "y"])
    model.train_adapter_fusion(adapters.Fuse("x", "y"))
    model.lm_head.weight.requires_grad_(False)
    AdapterTrainer(model=model, args=_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
                   train_dataset=tiny_dataset(8)).train()
    manifest = json.loads((tmp_path / "checkpoint-2" / "adapter_trainer.json").read_text())
    assert list(manifest["fusions"]) == [fusion] and manifest["trainable"] == [fusion]
    state = model._adapters_state
    live = [p.detach().clone() for p in state.fusion_parameters(fusion)]
    with torch.no_grad():
        for p in state.fusion_parameters(fusion):
            p.zero_()
    AdapterTrainer(model=model, args=_args(tmp_path / "r"))._load_from_checkpoint(str(tmp_path / "checkpoint-2"))
    for p, q in zip(state.fusion_parameters(fusion), live):
        assert torch.equal(p, q)
