"""Arithmetic operations each method adds per adapted site, forward and training step (counted, not timed).

On a GPU every counted ATen op is at least one kernel launch, and where the host sets the pace
(small batches) the launch count is what an adapter costs. Counted on a 2-layer Qwen3-shaped model
with ``adapters.testing.count_kernel_ops``; ``peft`` alongside where installed. Usage::

    python benchmarks/op_counts.py            # markdown table on stdout

Columns: sites (adapted projections or locations), ops added per site in an inference forward and
in a training step (forward + backward), and the same for peft's equivalent config.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import METHODS, _randomise_adapter, adapter_copy, build_base, peft_model

from adapters.testing import count_step_ops

#: adapted sites per layer of each benchmark method on a Qwen3 layer
SITES_PER_LAYER = {"lora_qv_r8": 2, "lora_all_r16": 6, "ia3": 3, "dora": 2, "vera": 2, "seq_bn": 1, "par_bn": 1,
                   "loreft": 1}


def _per_site(model: torch.nn.Module, embeds: torch.Tensor, base: dict[bool, int], sites: int) -> Callable:
    return lambda train: (count_step_ops(model, embeds, train) - base[train]) / sites


def main() -> None:
    import adapters

    base = build_base("tiny", torch.float32, "cpu")
    layers = base.config.num_hidden_layers
    embeds = torch.randn(2, 16, base.config.hidden_size, generator=torch.Generator().manual_seed(0))
    base_ops = {train: count_step_ops(base, embeds, train) for train in (False, True)}
    print(f"Qwen3-shaped model, {layers} layers; base: {base_ops[False]} ops forward, {base_ops[True]} ops "
          f"per training step (forward + backward with input gradients).\n")
    print("| method | sites | forward ops / site | training ops / site | peft forward | peft training |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (config, peft_key) in METHODS.items():
        if name not in SITES_PER_LAYER or not adapters.registry.has_config_string(config.split("[")[0]):
            continue  # (prompt and prefix tuning lengthen the sequence: no per-site count)
        sites = SITES_PER_LAYER[name] * layers
        model = adapter_copy(base, config, "a")
        ours = _per_site(model, embeds, base_ops, sites)
        theirs = peft_model(base, peft_key) if peft_key else None
        cells = ["–", "–"]
        if theirs is not None:
            theirs.eval()
            _randomise_adapter(theirs)
            other = _per_site(theirs, embeds, base_ops, sites)
            cells = [f"{other(False):g}", f"{other(True):g}"]
        print(f"| {name} | {sites} | {ours(False):g} | {ours(True):g} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
