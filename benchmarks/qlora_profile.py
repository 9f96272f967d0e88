"""Profile one QLoRA training step (ours, peft, the frozen base) on the 0.6B shape: where the time goes.

``python benchmarks/qlora_profile.py --device cuda [--checkpointing on|off]`` prints, for each run, the
step time and the operators with the most self CPU time and kernel time (torch.profiler), so the cost an
adapter adds over the frozen 4-bit base can be traced to operators.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qlora import VARIANTS, load_4bit, save_random_model  # benchmarks/ is not a package


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", default="0.6b")
    parser.add_argument("--checkpointing", choices=["on", "off"], default="on")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--runs", nargs="+", default=["base", "ours", "peft"])
    parser.add_argument("--top", type=int, default=18)
    args = parser.parse_args()
    from torch.profiler import ProfilerActivity, profile

    directory = tempfile.mkdtemp()
    save_random_model(args.shape, args.device, directory)
    batch = torch.randint(4, 1000, (args.batch, args.seq), device=args.device)
    for name in args.runs:
        model = VARIANTS[name](load_4bit(directory, args.device), args.checkpointing == "on", 16)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params or [torch.zeros(1, requires_grad=True)], lr=1e-4)

        def step(model: torch.nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        print(f"== {name}: {1000 * (time.perf_counter() - start) / 5:.1f} ms/step", flush=True)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        events = prof.key_averages()
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=48))
        print(events.table(sort_by="self_cuda_time_total", row_limit=10, max_name_column_width=48))
        del model, opt
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
