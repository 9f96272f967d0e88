"""Training step of LoRA (q, v, r=8) and seq_bn against the frozen base, both under ``torch.compile``.

In eager mode a 0.6B model's step at 8 × 512 is bound by kernel launches from the host (see the README's
benchmark notes). Compiling base and adapter model alike (default mode: inductor fusions; or
``--mode reduce-overhead``: CUDA graphs, which remove the launch cost) shows the ratio without it.
Interleaved medians, as in ``run.py``. Usage::

    python benchmarks/compiled_step.py --device cuda --mode reduce-overhead
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import METHODS, adapter_copy, adapter_train_step, base_train_step, build_base, interleaved


def main() -> None:

    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", default=None)
    parser.add_argument("--mode", default="default", choices=["default", "reduce-overhead"])
    parser.add_argument("--shape", default=None)
    parser.add_argument("--methods", nargs="+", default=["lora_qv_r8", "seq_bn"])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    dtype = torch.bfloat16 if gpu else torch.float32
    base = build_base(args.size or ("0.6b" if gpu else "tiny"), dtype, args.device)
    b, t = map(int, (args.shape or ("8x512" if gpu else "2x64")).split("x"))
    embeds = torch.randn(b, t, base.config.hidden_size, device=args.device, dtype=dtype)
    mode = None if args.mode == "default" else args.mode
    fns = {"base": base_train_step(torch.compile(base, mode=mode), embeds)}
    for name in args.methods:
        model = adapter_copy(base, METHODS[name][0], "p")
        fns[name] = adapter_train_step(torch.compile(model, mode=mode), embeds)
    for key, fn in fns.items():  # compile and warm up (CUDA graphs record after a few runs)
        start = time.perf_counter()
        for _ in range(4):
            fn()
        print(f"{key}: compiled and warmed up in {time.perf_counter() - start:.0f} s", flush=True)
    med = interleaved(fns, args.device, warmup=0, repeats=args.repeats)
    ratios = ", ".join(f"{k} {med[k] / med['base']:.3f}x" for k in fns if k != "base")
    print(f"torch.compile mode={args.mode}, {b}x{t}: base {1e3 * med['base']:.1f} ms; {ratios}")


if __name__ == "__main__":
    main()
