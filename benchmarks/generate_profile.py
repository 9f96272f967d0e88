"""Where generate() time goes with one LoRA against the base model (``--device cuda``): decode-step time and
the operators launched per step, from torch.profiler. ``python benchmarks/generate_profile.py --device cuda``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve import LORA, build_lm  # benchmarks/ is not a package


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="0.6b")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    from torch.profiler import ProfilerActivity, profile

    import adapters

    model = build_lm(args.size, torch.bfloat16 if args.device == "cuda" else torch.float32, args.device)
    adapters.init(model)
    model.add_adapter("a", config=LORA)
    ids = torch.randint(4, 1000, (16, 128), device=args.device)

    def run() -> None:
        model.generate(input_ids=ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                       do_sample=False)

    for setup in (None, "a", None, "a"):
        model.set_active_adapters(setup)
        with torch.no_grad():
            run()
            _sync(args.device)
            start = time.perf_counter()
            run()
            _sync(args.device)
        print(f"{setup or 'base'}: {1000 * (time.perf_counter() - start) / args.new_tokens:.2f} ms per new token")
    for setup in (None, "a"):
        model.set_active_adapters(setup)
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run()
            _sync(args.device)
        events = prof.key_averages()
        counts = Counter({e.key: e.count for e in events if e.key.startswith("aten::")})
        print(f"== {setup or 'base'}: aten ops {sum(counts.values())}, self CPU "
              f"{sum(e.self_cpu_time_total for e in events) / 1000:.1f} ms, self CUDA "
              f"{sum(e.self_device_time_total for e in events) / 1000:.1f} ms")
        print(events.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=40))


if __name__ == "__main__":
    main()
