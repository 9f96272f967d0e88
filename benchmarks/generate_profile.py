"""Where ``generate()`` time goes with one LoRA against the base model (issue #17's decode goal).

Three measurements, ``python benchmarks/generate_profile.py --device cuda``:

* ``ops``: host and device microseconds per call of the operations a LoRA site adds at decode shapes
  (16 rows, the 0.6B model's q projection): the enqueue cost a host-bound decode step pays per launch,
  and what a Triton launch from Python costs (a trivial kernel, the fused LoRA kernel);
* ``generate``: ``generate()`` time against the base model, interleaved, for a plain copy of it
  (``base_copy``: every other variant is a copy too), our LoRA, the merged LoRA, peft's LoRA, and two
  *floors* that replace q and v by a bare module (``linear``: the same ``F.linear``
  through one extra module call; ``lora``: ``F.linear`` + the two rank-r GEMMs, no adapter machinery),
  which separate the cost of the extra operations from the cost of our code around them; with Triton on
  CUDA also ours with ``ADAPTERS_FUSED=auto`` (``ours_fused``: the one-launch decode kernel);
* ``profile``: per variant, the kernels launched per decode step and the device time they take (does the
  GPU or the host bound the step?), and the kernels the adapter adds.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve import LORA, build_lm, generate, ours, theirs  # benchmarks/ is not a package


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class _FloorLinear(nn.Module):
    """``F.linear`` behind one module call (``rank == 0``), or with a rank-r LoRA delta in 2 more GEMMs."""

    def __init__(self, base: nn.Linear, rank: int) -> None:
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.rank = rank
        if rank:
            w = base.weight
            self.lora_a = torch.randn(rank, w.shape[1], device=w.device, dtype=w.dtype) * 1e-2
            self.lora_b = torch.randn(w.shape[0], rank, device=w.device, dtype=w.dtype) * 1e-2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.rank:
            return F.linear(x, self.weight, self.bias)
        x2 = x.reshape(-1, x.shape[-1])
        y2 = x2.mm(self.weight.t())
        y2.addmm_(x2.mm(self.lora_a.t()), self.lora_b.t(), alpha=2.0)
        return y2.view(*x.shape[:-1], y2.shape[-1])


def floor(base: nn.Module, rank: int) -> nn.Module:
    model = copy.deepcopy(base)
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.q_proj, attn.v_proj = _FloorLinear(attn.q_proj, rank), _FloorLinear(attn.v_proj, rank)
    return model


def op_costs(device: str, dtype: torch.dtype, rows: int = 16, n: int = 2000) -> None:
    x = torch.randn(rows, 1024, device=device, dtype=dtype)
    w = torch.randn(2048, 1024, device=device, dtype=dtype)
    a = torch.randn(8, 1024, device=device, dtype=dtype)
    b = torch.randn(2048, 8, device=device, dtype=dtype)
    y = x.mm(w.t())
    h = x.mm(a.t())
    cases: dict[str, Callable[[], object]] = {
        "F.linear(x, W)": lambda: F.linear(x, w),
        "x.mm(W.t())": lambda: x.mm(w.t()),
        "x.mm(A.t())": lambda: x.mm(a.t()),
        "y.addmm_(h, B.t(), alpha)": lambda: y.addmm_(h, b.t(), alpha=2.0),
        "torch.addmm(y, h, B.t())": lambda: torch.addmm(y, h, b.t(), alpha=2.0),
        "h @ B.t() then y += ": lambda: y.add_(h.mm(b.t())),
        "y.add_(y)": lambda: y.add_(y),
    }
    cases.update(_triton_cases(x, a, b, y))
    print(f"== per-op cost at {rows} rows ({dtype}): host us/call (enqueue), device us/call (synchronised)")
    for name, fn in cases.items():
        for _ in range(50):
            fn()
        _sync(device)
        start = time.perf_counter()
        for _ in range(n):
            fn()
        host = (time.perf_counter() - start) / n
        _sync(device)
        total = (time.perf_counter() - start) / n
        print(f"  {name:28s} host {1e6 * host:7.1f}  total {1e6 * total:7.1f}")


try:  # optional: the Triton launch costs are measured where it is installed
    import triton
    import triton.language as tl

    @triton.jit
    def _copy_kernel(src, dst, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(dst + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)
except ImportError:
    triton = None


def _triton_cases(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> dict[str, Callable]:
    """Host cost of a Triton launch from Python: a 4-argument copy kernel and the fused LoRA kernel
    (``adapters_lora.fused.launch_low_rank``: 20 runtime arguments); CUDA with Triton only."""
    if triton is None or not x.is_cuda:
        return {}
    from adapters_lora import fused

    flat, out = x.reshape(-1), torch.empty_like(x).reshape(-1)
    h = torch.empty(x.shape[0], a.shape[0], device=x.device, dtype=x.dtype)
    return {"triton copy (4 args)": lambda: _copy_kernel[(-(-flat.numel() // 1024),)](flat, out, flat.numel(),
                                                                                       BLOCK=1024),
            "triton LoRA: y += s(xA)B": lambda: fused.launch_low_rank(x, a.t(), b.t(), y, h, 2.0)}


def _in_fused_mode(fn: Callable[[], None], mode: str) -> Callable[[], None]:
    """``fn`` with ``ADAPTERS_FUSED=mode`` while it runs (``auto``: LoRA's decode kernel eagerly too, ``0``: never;
    the default ``compiled`` uses it inside the compiled decode step of ``--static``)."""
    from adapters.plugin import set_fused_mode

    def run() -> None:
        previous = set_fused_mode(mode)
        try:
            fn()
        finally:
            set_fused_mode(previous)

    return run


def kernels_per_step(fn: Callable[[], None], device: str,
                     steps: int) -> tuple[Counter, dict[str, float], float, dict[str, float]]:
    """Kernels launched (by name), their device microseconds, device ms per step, and the host's self
    microseconds by profiler event (CPU side: ATen ops, the compiled region, CUDA-graph replay, runtime calls)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        fn()
        _sync(device)
    counts: Counter = Counter()
    times: dict[str, float] = {}
    host: dict[str, float] = {}
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CPU:
            name = re.sub(r": \d+/\d+$", "", e.key)  # one name for every variant's compiled region
            host[name] = host.get(name, 0.0) + e.self_cpu_time_total
        if e.device_type == torch.autograd.DeviceType.CUDA or (not device.startswith("cuda")
                                                              and e.key.startswith("aten::")):
            counts[e.key] += e.count
            times[e.key] = times.get(e.key, 0.0) + e.self_device_time_total
    return counts, times, sum(times.values()) / 1e3 / steps, host


def _merged(base: nn.Module) -> nn.Module:
    model = ours(base, 1)
    model.merge_adapter("a0")
    return model


#: the models measured against ``base``, each built from it
VARIANTS: dict[str, Callable[[nn.Module], nn.Module | None]] = {
    "base_copy": copy.deepcopy, "ours": lambda base: ours(base, 1), "merged": _merged,
    "floor_linear": lambda base: floor(base, 0), "floor_lora": lambda base: floor(base, 8),
    "peft": lambda base: theirs(base, 1),
    "ours_fused": lambda base: ours(base, 1),  # run with ADAPTERS_FUSED=auto: the one-launch decode kernel
    "ours_plain": lambda base: ours(base, 1),  # run with ADAPTERS_FUSED=0: no kernel, compiled or not
}


def _static_kwargs(device: str) -> dict[str, object]:
    """``generate()`` arguments for a static cache; transformers compiles the decode step itself on CUDA
    (``CompileConfig()``: ``mode="reduce-overhead"``); elsewhere it is told to compile with the ``eager``
    backend (a smoke run of the same code path)."""
    if device.startswith("cuda"):
        return {"cache_implementation": "static"}
    from transformers.generation import CompileConfig

    config = CompileConfig(backend="eager")
    config._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": config}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="0.6b")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-peft", dest="peft", action="store_false")
    parser.add_argument("--static", action="store_true",
                        help="generate with a static cache: transformers compiles each model's decode step "
                             "(torch.compile, CUDA graphs) on CUDA; on CPU a smoke run (compile backend 'eager')")
    parser.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS),
                        help="models measured besides base (default: all; with --static: base_copy ours merged peft)")
    parser.add_argument("--no-ops", dest="ops", action="store_false", help="skip the per-op host costs")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="skip the kernel profile")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    if args.ops:
        op_costs(args.device, dtype, args.batch)

    base = build_lm(args.size, dtype, args.device)
    variants = args.variants or (["base_copy", "ours", "ours_plain", "merged", "peft"] if args.static
                                 else list(VARIANTS))
    if triton is None or not args.device.startswith("cuda"):
        variants = [v for v in variants if v not in ("ours_fused", "ours_plain")]
    models = {"base": base}
    for key in variants:
        if key == "peft" and not args.peft:
            continue
        model = VARIANTS[key](base)
        if model is not None:  # None: peft not installed
            models[key] = model
    ids = torch.randint(4, base.config.vocab_size, (args.batch, args.prompt), device=args.device)
    kwargs = _static_kwargs(args.device) if args.static else {}
    fns = {k: generate(m, ids, args.new_tokens, **kwargs) for k, m in models.items()}
    if "ours_fused" in fns:
        fns["ours_fused"] = _in_fused_mode(fns["ours_fused"], "auto")
    if "ours_plain" in fns:
        fns["ours_plain"] = _in_fused_mode(fns["ours_plain"], "0")
    start = time.perf_counter()
    for fn in fns.values():
        fn()
        if args.static:  # CUDA graphs are recorded on a later call than the compiling one
            fn()
    print(f"(first calls, compiling where --static: {time.perf_counter() - start:.0f} s)", flush=True)
    if args.static:  # transformers keeps the compiled decode step on the model it compiled
        print("  decode step compiled: " + ", ".join(
            f"{k} {any(hasattr(sub, '_compiled_call') for sub in m.modules())}" for k, m in models.items()))
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for index in range(args.repeats):
        for key in (list(fns) if index % 2 == 0 else list(fns)[::-1]):
            _sync(args.device)
            start = time.perf_counter()
            fns[key]()
            _sync(args.device)
            samples[key].append(time.perf_counter() - start)
    t = {k: statistics.median(v) for k, v in samples.items()}
    print(f"== generate {args.batch} x {args.prompt} + {args.new_tokens} new tokens ({LORA} on q, v): "
          "ms per new token, time vs base")
    for key, v in t.items():
        print(f"  {key:14s} {1e3 * v / args.new_tokens:7.2f} ms   {v / t['base']:.3f}x")

    base_counts: Counter | None = None
    base_host: dict[str, float] = {}
    for key in (fns if args.profile else ()):
        counts, times, device_ms, host = kernels_per_step(fns[key], args.device, args.new_tokens)
        print(f"== {key}: {sum(counts.values()) / args.new_tokens:.0f} kernels per new token, device "
              f"{device_ms:.2f} ms per new token (wall {1e3 * t[key] / args.new_tokens:.2f} ms; profiled host "
              f"self time {sum(host.values()) / 1e3 / args.new_tokens:.2f} ms)")
        if base_counts is None:
            base_counts, base_host = counts, host
            continue
        more = {k: v - base_host.get(k, 0.0) for k, v in host.items()}
        more.update({k: -v for k, v in base_host.items() if k not in host})
        for name, extra in sorted(more.items(), key=lambda kv: -abs(kv[1]))[:6]:
            print(f"    host {extra / args.new_tokens:+8.1f} us per token  {name[:90]}")
        added = {k: (c - base_counts.get(k, 0)) for k, c in counts.items() if c != base_counts.get(k, 0)}
        for name, extra in sorted(added.items(), key=lambda kv: -abs(kv[1]))[:6]:
            mean_us = times.get(name, 0.0) / max(counts[name], 1)
            print(f"    {extra / args.new_tokens:+7.1f} per token  {mean_us:6.1f} us each  {name[:90]}")


if __name__ == "__main__":
    main()
