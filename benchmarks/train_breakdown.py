"""Where an adapter's training-step cost comes from: forward + backward alone, the optimizer step, the scaling.

Interleaved in one process against the frozen base model's forward + backward (inputs requiring
gradients), on the Qwen3-shaped model of ``run.py``: each adapter config measured as forward +
backward only (``fb``) and as the full step with fused AdamW (``step``); LoRA with scaling 2
(``alpha=16``, the table's config) and scaling 1 (``alpha=8``, the default ``alpha == r``); peft's
LoRA alongside when installed. Usage::

    python benchmarks/train_breakdown.py --device cuda --shape 8 512
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import _randomise_adapter, adapter_copy, adapter_train_step, base_train_step, build_base, interleaved

CONFIGS = {"lora_a16": "lora[r=8, alpha=16]", "lora_a8": "lora[r=8, alpha=8]", "seq_bn": "seq_bn"}


def _fwd_bwd(model: torch.nn.Module, embeds: torch.Tensor) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        base_train_step(model, embeds)()
        for p in params:
            p.grad = None

    return step


def main() -> None:

    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", type=int, nargs=2, default=None, metavar=("BATCH", "SEQ"))
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    dtype = torch.bfloat16 if gpu else torch.float32
    base = build_base("0.6b" if gpu else "small", dtype, args.device)
    batch, seq = args.shape or ((8, 512) if gpu else (4, 128))
    embeds = torch.randn(batch, seq, base.config.hidden_size, device=args.device, dtype=dtype)
    fns: dict[str, Callable[[], None]] = {"base": base_train_step(base, embeds)}
    for key, config in CONFIGS.items():
        model = adapter_copy(base, config, "a", randomise=True)
        fns[f"{key} fb"] = _fwd_bwd(model, embeds)
        fns[f"{key} step"] = adapter_train_step(model, embeds)
    try:
        import peft

        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16,
                                                                          target_modules=["q_proj", "v_proj"]))
        theirs.eval()
        _randomise_adapter(theirs)
        fns["peft_lora_a16 fb"] = _fwd_bwd(theirs, embeds)
        fns["peft_lora_a16 step"] = adapter_train_step(theirs, embeds)
    except ImportError:
        pass
    med = interleaved(fns, args.device, warmup=5, repeats=args.repeats)
    device = torch.cuda.get_device_name() if gpu else "cpu"
    print(f"{device}, {dtype}, batch {batch}x{seq}; base fwd+bwd {1e3 * med['base']:.1f} ms")
    for key, value in med.items():
        if key != "base":
            print(f"  {key:20s} {value / med['base']:.3f}x")


if __name__ == "__main__":
    main()
