"""Probe: LoRA under torch.compile(fullgraph=True) with inductor on the GPU (a gpu_checks case alone, with the
traceback's frames from this repository), for debugging: ``python scripts/compile_probe.py``."""

from __future__ import annotations

import sys
import traceback

import torch

import adapters
from adapters.testing import tiny_inputs, tiny_model

device = "cuda" if torch.cuda.is_available() else "cpu"
model = tiny_model("qwen3", "causal_lm", hidden_size=64, intermediate_size=128, head_dim=16)
model = model.to(device=device, dtype=torch.bfloat16)
adapters.init(model)
model.add_adapter("l", config="lora[r=8, init_weights='bert']", set_active=True)
inputs = {k: v.to(device) for k, v in tiny_inputs(model, batch=4, seq=32).items()}
sys.setrecursionlimit(3000)
for grad in (False, True):
    try:
        with torch.set_grad_enabled(grad):
            compiled = torch.compile(model, fullgraph=True)
            compiled(**inputs)
        print("ok", grad)
    except Exception:  # noqa: BLE001 - a probe prints what failed
        lines = traceback.format_exc().splitlines()
        ours = [i for i, line in enumerate(lines) if "/packages/" in line]
        print("\n".join(lines[-12:]))
        for i in ours[:6] + ours[-6:]:
            print(lines[i], lines[i + 1] if i + 1 < len(lines) else "")
