"""Train a LoRA adapter on a tiny random Qwen3 with AdapterTrainer, in one process or under ``torchrun``.

Used by ``tests/test_distributed.py`` (CPU, gloo) and handy as a smoke test of data-parallel training::

    torchrun --standalone --nproc_per_node=2 examples/ddp_tiny_train.py --output-dir /tmp/ddp --per-device-batch 2
    python examples/ddp_tiny_train.py --output-dir /tmp/single --per-device-batch 4   # same global batch

Every rank writes ``rank<R>.safetensors`` (its final adapter weights) and ``rank<R>.json`` (how many
times it wrote an adapter checkpoint) into ``--output-dir``; checkpoints go to ``--output-dir/ckpt``.
Samples are taken in order (``train_sampling_strategy="sequential"``) and every label is a real token,
so one step of 2 ranks x 2 rows sees the same 4 rows, and the same loss, as one process with 4 rows.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

import torch

SEQ = 12


def dataset(n: int = 32, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` fixed-length rows of random tokens, labelled with themselves (causal LM)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(4, 128, (SEQ,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": ids.clone()})
    return rows


def run(output_dir: str, per_device_batch: int, steps: int = 4, save_steps: int = 2) -> dict[str, torch.Tensor]:
    """Train adapter ``a`` for ``steps`` steps; return its final weights (and write the per-rank files)."""
    from safetensors.torch import save_file
    from transformers import TrainingArguments

    import adapters
    import adapters.trainer as adapter_trainer
    from adapters import AdapterTrainer, LoRAConfig
    from adapters.checkpoint import adapter_tensors
    from adapters.testing import tiny_model

    model = tiny_model("qwen3", "causal_lm")
    adapters.init(model)
    model.add_adapter("a", LoRAConfig(r=4, alpha=8, output_lora=True))
    model.train_adapter("a")
    model.lm_head.weight.requires_grad_(False)

    calls = []
    original = adapter_trainer.save_components

    def counting_save(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    adapter_trainer.save_components = counting_save
    try:
        args = TrainingArguments(
            os.path.join(output_dir, "ckpt"), use_cpu=True, per_device_train_batch_size=per_device_batch,
            max_steps=steps, learning_rate=5e-2, lr_scheduler_type="constant", save_strategy="steps",
            save_steps=save_steps, report_to=[], disable_tqdm=True, seed=0, train_sampling_strategy="sequential",
            dataloader_num_workers=0, ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        )
        trainer = AdapterTrainer(model=model, args=args, train_dataset=dataset())
        trainer.train()
    finally:
        adapter_trainer.save_components = original
    rank = int(os.environ.get("RANK", "0"))
    weights = adapter_tensors(model, "a")
    os.makedirs(output_dir, exist_ok=True)
    save_file(weights, os.path.join(output_dir, f"rank{rank}.safetensors"))
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w", encoding="utf-8") as fh:
        json.dump({"rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", "1")), "save_calls": len(calls),
                   "global_step": trainer.state.global_step}, fh)
    return weights


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--per-device-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--save-steps", type=int, default=2)
    args = parser.parse_args(argv)
    run(args.output_dir, args.per_device_batch, args.steps, args.save_steps)


if __name__ == "__main__":
    main()
