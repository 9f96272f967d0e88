"""Profile one training step (or inference pass) of a method against the frozen base model.

Prints torch.profiler tables (by self device time and by CPU time) for the base step and the
adapter step, and the number of host-device synchronisations seen, so per-forward Python work
and syncs show up. Usage::

    python benchmarks/profile_step.py --device cuda --method lora_qv_r8 [--mode infer] [--compile]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import METHODS, adapter_copy, adapter_train_step, base_train_step, build_base, infer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", default=None)
    parser.add_argument("--method", default="lora_qv_r8", choices=list(METHODS))
    parser.add_argument("--mode", choices=["train", "infer"], default="train")
    parser.add_argument("--rows", type=int, default=18)
    parser.add_argument("--sort", choices=["device", "host"], default="device",
                        help="order the table by self device time (default on CUDA) or self host time")
    parser.add_argument("--compile", action="store_true",
                        help="compile each decoder layer of both models (fused.py's regional compilation)")
    args = parser.parse_args()

    gpu = args.device.startswith("cuda")
    size = args.size or ("0.6b" if gpu else "tiny")
    dtype = torch.bfloat16 if gpu else torch.float32
    base = build_base(size, dtype, args.device)
    model = adapter_copy(base, METHODS[args.method][0], "p")
    if args.compile:
        from fused import compiled_copy

        base, model = compiled_copy(base, None, "layers"), compiled_copy(model, None, "layers")
    shape = (8, 512) if gpu else (2, 64)
    if args.mode == "train":
        x = torch.randn(*shape, base.config.hidden_size, device=args.device, dtype=dtype)
        fns = {"base": base_train_step(base, x), args.method: adapter_train_step(model, x)}
    else:
        ids = torch.randint(0, base.config.vocab_size, (1, 128), device=args.device)
        fns = {"base": infer(base, ids), args.method: infer(model, ids)}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    for name, fn in fns.items():
        for _ in range(3):
            fn()
        if gpu:
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            for _ in range(5):
                fn()
            if gpu:
                torch.cuda.synchronize()
        events = prof.key_averages()
        # device syncs (the one explicit synchronize after the loop included); .item() on CPU tensors
        # (e.g. the optimizer's step counters) is not a device sync and is not counted
        syncs = sum(e.count for e in events if "synchronize" in e.key.lower())
        # kernel launches per step: on a launch-bound step, an adapter's cost is mostly its launches
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC",
                                                            "cuLaunchKernel", "cuLaunchKernelEx"))
        ops = sum(e.count for e in events if e.key.startswith("aten::"))
        print(f"\n===== {name} ({args.mode}), 5 iterations; device synchronisations: {syncs}; "
              f"per step: {launches / 5:.0f} kernel launches, {ops / 5:.0f} aten ops")
        sort = "self_cuda_time_total" if gpu and args.sort == "device" else "self_cpu_time_total"
        print(events.table(sort_by=sort, row_limit=args.rows))


if __name__ == "__main__":
    main()
