"""Multi-GPU adapter training with ``AdapterTrainer``: data parallel (DDP) or fully sharded (FSDP2).

Not run in CI (it needs GPUs); ``tests/test_distributed.py`` covers the same code path with two CPU
processes. Trains one adapter on a GSM8K-format JSONL file (default: ``examples/data/gsm8k_mini.jsonl``)
with the loss on the answer tokens, using the collator and tokenizers of ``examples/qwen3_walkthrough.py``.

Usage (one process per GPU; the global batch is ``nproc x --per-device-batch x --grad-accum``)::

    # DDP on 2 GPUs, a real checkpoint, LoRA, bf16 autocast
    torchrun --standalone --nproc_per_node=2 scripts/train_multi_gpu.py \\
        --model /path/to/Qwen3-0.6B --method lora --strategy ddp --bf16 --max-steps 200 --output-dir out/ddp

    # FSDP2 (parameters, gradients and optimizer state sharded per decoder layer)
    torchrun --standalone --nproc_per_node=4 scripts/train_multi_gpu.py \\
        --model /path/to/Qwen3-8B --method lora --strategy fsdp --bf16 --gradient-checkpointing --output-dir out/fsdp

    # the same through accelerate (it reads the torchrun-style environment it sets up)
    accelerate launch --num_processes 2 scripts/train_multi_gpu.py --strategy ddp --output-dir out/acc

    # no --model: a tiny random Qwen3 with a character tokenizer (a smoke test, no downloads)
    torchrun --standalone --nproc_per_node=2 scripts/train_multi_gpu.py --strategy fsdp --max-steps 20

Notes:

* Call ``model.train_adapter(name)`` before the trainer is built (done here): the base model is frozen
  and DDP then only all-reduces the adapter gradients. FSDP2 shards frozen and trainable weights alike;
  the optimizer holds only the trainable shards.
* Checkpoints hold only the adapter (native format, written by rank 0). With FSDP the trainer gathers a
  ``FULL_STATE_DICT`` and takes the adapter values from it; resuming and ``load_best_model_at_end``
  copy them back into the sharded parameters.
* ``--bf16`` is autocast over the model's own dtype. Loading the model with ``--dtype bfloat16`` puts
  base and adapters in bf16 (adapters follow the base model's dtype).
* At the end rank 0 saves the adapter to ``--output-dir/<name>`` and every rank prints a checksum of
  its adapter weights, which must agree across ranks.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WALKTHROUGH = os.path.join(ROOT, "examples", "qwen3_walkthrough.py")


def _walkthrough():
    spec = importlib.util.spec_from_file_location("qwen3_walkthrough", WALKTHROUGH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: Sequence[str] | None = None) -> None:
    """Parse arguments, build the model and adapter, train, save and report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="path or id of a causal LM checkpoint (default: tiny Qwen3)")
    parser.add_argument("--method", choices=["bottleneck", "lora"], default="lora")
    parser.add_argument("--adapter-name", default="gsm8k")
    parser.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--data", default=None, help="GSM8K-format JSONL (question / answer with ####)")
    parser.add_argument("--max-steps", type=int, default=50)
    parser.add_argument("--per-device-batch", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--dtype", default=None, choices=[None, "bfloat16", "float16", "float32"],
                        help="load the model (and so the adapters) in this dtype")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--save-steps", type=int, default=0, help="0: no intermediate checkpoints")
    parser.add_argument("--resume", default=None, help="checkpoint directory to resume from")
    parser.add_argument("--output-dir", default="multi_gpu_out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from transformers import TrainingArguments

    import adapters
    from adapters import AdapterTrainer

    wt = _walkthrough()
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model, tokenizer = wt.build(args.model, args.seed)
    if args.dtype:
        model.to(getattr(torch, args.dtype))
    adapters.init(model, interface=wt.qwen3_interface() if model.config.model_type == "qwen3" else None)
    model.add_adapter(args.adapter_name, config=wt.adapter_config(args.method))
    model.train_adapter(args.adapter_name)
    if rank == 0:
        print(model.adapter_summary())

    rows = wt.load_problems(args.data) if args.data else wt.load_problems()
    train_set = [wt.encode_example(r, tokenizer, args.max_length) for r in rows]
    fsdp_kwargs = {}
    if args.strategy == "fsdp":
        fsdp_kwargs = {"fsdp": True,
                       "fsdp_config": {"version": 2, "state_dict_type": "FULL_STATE_DICT",
                                       "reshard_after_forward": True}}
    lr = args.learning_rate if args.learning_rate is not None else (1e-2 if args.model is None else 2e-4)
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.per_device_batch,
        gradient_accumulation_steps=args.grad_accum, learning_rate=lr, bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing, logging_steps=max(1, args.max_steps // 10),
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500, report_to=[],
        seed=args.seed, remove_unused_columns=False, disable_tqdm=rank != 0,
        ddp_find_unused_parameters=False, use_cpu=not torch.cuda.is_available(), **fsdp_kwargs,
    )
    trainer = AdapterTrainer(model=model, args=training_args, train_dataset=train_set,
                             data_collator=wt.AnswerOnlyCollator(tokenizer.pad_token_id))
    out = trainer.train(resume_from_checkpoint=args.resume)
    trainer.save_model(os.path.join(args.output_dir, "final"))  # adapter-only, rank 0 writes

    # every rank: a checksum of the full adapter values (gathered from shards under FSDP)
    total = torch.zeros((), dtype=torch.float64)
    for p in model._adapters_state.adapter_parameters(args.adapter_name):
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        total += full.detach().double().abs().sum().cpu()
    print(f"[rank {rank}/{world}] fsdp={trainer.is_fsdp_enabled} steps={trainer.state.global_step} "
          f"train_loss={out.training_loss:.4f} "
          f"adapter_checksum={total.item():.10e}", flush=True)
    if rank == 0:
        print(f"saved adapter checkpoint to {os.path.join(args.output_dir, 'final', args.adapter_name)}")


if __name__ == "__main__":
    sys.exit(main())
