"""Launch configurations of LoRA's one-launch decode kernel (``adapters_lora.fused_kernels.lora_decode``), timed.

For decode shapes of the 0.6B benchmark model (1, 16 and 64 rows; the q projection 1024 -> 2048 and the
v projection 1024 -> 1024; rank 8) every configuration of column block ``BN``, depth block ``BK``, warps and
pipeline stages is timed on the device alone (``triton.testing.do_bench_cudagraph``: replays of a CUDA graph,
no host cost), beside cuBLAS's ``F.linear`` (the base projection) and the plain path's three operations.
The launcher (``adapters_lora.fused_decode.launch_decode``) uses the configuration this table picks.

Usage (CUDA with Triton only)::

    python benchmarks/decode_configs.py
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import torch
import torch.nn.functional as F


def sweep(kernel: Any, m: int, n: int, k: int = 1024, r: int = 8) -> None:
    """Time every configuration at ``m`` rows, ``k`` -> ``n`` features, rank ``r``; print the best five."""
    import triton.testing
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    dtype = torch.bfloat16
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = torch.randn(n, k, device="cuda", dtype=dtype) * k ** -0.5
    a = torch.randn(r, k, device="cuda", dtype=dtype) * k ** -0.5
    b = torch.randn(n, r, device="cuda", dtype=dtype)
    y = torch.empty(m, n, device="cuda", dtype=dtype)
    want = (x @ w.t() + 2.0 * (x @ a.t()) @ b.t()).float()
    bm = 16 if m <= 16 else 32 if m <= 32 else 64

    def plain() -> None:
        x.mm(w.t()).addmm_(x.mm(a.t()), b.t(), alpha=2.0)

    ref = {"F.linear": triton.testing.do_bench_cudagraph(lambda: F.linear(x, w), rep=30),
           "plain 3 ops": triton.testing.do_bench_cudagraph(plain, rep=30)}
    times: dict[tuple[int, ...], float] = {}
    for config in itertools.product((16, 32, 64), (64, 128, 256), (2, 4, 8), (2, 3, 4)):
        bn, bk, warps, stages = config
        run = functools.partial(kernel[(-(-n // bn), -(-m // bm))], x, w, w, a, b, y, m, n, k, r, 2.0, BM=bm,
                                BN=bn, BK=bk, BR=16, HAS_BIAS=False, UPCAST=False, IEEE=False, num_warps=warps,
                                num_stages=stages)
        try:
            run()
        except (RuntimeError, CompilationError, OutOfResources) as exc:  # does not fit (shared memory, registers)
            print(f"  {config}: {type(exc).__name__}")
            continue
        err = float((y.float() - want).abs().max() / want.abs().max())
        if err > 2e-2:
            print(f"  {config}: wrong result, {err:.1e}")
            continue
        times[config] = triton.testing.do_bench_cudagraph(run, rep=30)
    now = times.get((32, 128 if bm <= 32 else 64, 4, 3))
    print(f"M={m} N={n}: " + ", ".join(f"{key} {1e3 * v:.1f} us" for key, v in ref.items())
          + (f", current {1e3 * now:.1f} us" if now else ""), flush=True)
    for (bn, bk, warps, stages), v in sorted(times.items(), key=lambda kv: kv[1])[:5]:
        print(f"    BN={bn:3d} BK={bk:3d} warps={warps} stages={stages}: {1e3 * v:.1f} us")


def main() -> None:
    from adapters_lora import fused

    kernel = fused._kernels().lora_decode
    for m, n in itertools.product((1, 16, 64), (2048, 1024)):
        sweep(kernel, m, n)


if __name__ == "__main__":
    main()
