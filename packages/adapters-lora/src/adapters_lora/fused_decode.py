"""LoRA inference at few rows in one kernel launch: ``generate()``'s decode steps (issue #17).

A decode step (a few rows, one token each) is bound by the host enqueueing kernels, not by the GPU: on the
H200 machine each ATen launch costs about 15 µs of host time and the GPU is busy a sixth of the step
(``benchmarks/generate_profile.py``). The plain straight-line path (:meth:`.layer.LoRALinear._straight_line`)
makes three launches per adapted projection (the base GEMM, ``x Aᵀ``, the ``addmm_`` of ``· Bᵀ``), two more
than the base model; :func:`.fused_kernels.lora_decode` computes ``y = x Wᵀ + b + s·(x Aᵀ) Bᵀ`` in one.

Selected by the same switch as the training kernels (``ADAPTERS_FUSED``, :mod:`adapters.fused_switch`):
off by default until a GPU measurement shows the one Triton launch costing less host time than the two
ATen launches it replaces. :func:`lora_decode` returns ``None`` for what it does not cover (gradients
enabled, more than :data:`MAX_ROWS` rows, mixed or integer dtypes, rank above 128, strided tensors (the
kernel takes no strides: fewer arguments, a cheaper launch), tensor subclasses,
``torch.func`` transforms, ``torch.compile``, where inductor fuses the plain path itself), and the caller
runs the plain path. Its first use per device and dtype is checked against torch (:func:`kernels_pass`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from adapters.plugin import fused_selected, kernels_pass

from . import fused

__all__ = ["MAX_ROWS", "lora_decode", "launch_decode", "LAUNCHES"]

#: rows (batch × new tokens) up to which the one-launch kernel is used; more rows make the GPU, not the host,
#: the bound, and cuBLAS's GEMM is the faster one there
MAX_ROWS = 64
#: whether mode ``"compiled"`` uses the kernel inside ``torch.compile`` graphs: yes, it measured
#: faster there than inductor's code for the plain path (README, "Serving": transformers' compiled decode step)
COMPILED_DEFAULT = True
#: decode kernel launches since import (tests, benchmarks)
LAUNCHES = [0]


def launch_decode(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                  lora_b: torch.Tensor, scaling: float, out: torch.Tensor) -> None:
    """One :func:`.fused_kernels.lora_decode` launch: ``out = x Wᵀ + b + s·(x Aᵀ) Bᵀ``. Contiguous ``x`` M × K,
    ``weight`` N × K, ``bias`` N or ``None``, ``lora_a`` r × K, ``lora_b`` N × r, ``out`` M × N; one device and
    floating dtype."""
    m, k = x.shape
    n, r = weight.shape[0], lora_a.shape[0]
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    # benchmarks/decode_configs.py on an H200 (bf16, 1 and 16 rows, 1024 -> 1024 / 2048, rank 8): 16 columns a
    # program, 256 deep, 2 warps, 3 stages: 4.1-4.3 us against 5.6-8.6 us for 32 / 128 / 4 warps, cuBLAS's base
    # GEMM alone 3.7 us, the plain path's three launches 9.4-9.8 us
    fused._kernels().lora_decode[(-(-n // 16), -(-m // bm))](
        x, weight, bias if bias is not None else weight, lora_a, lora_b, out, m, n, k, r, float(scaling),
        BM=bm, BN=16, BK=256 if bm <= 32 else 128, BR=16 if r <= 16 else fused._next_pow2(r),
        HAS_BIAS=bias is not None, UPCAST=fused._INTERPRETED, IEEE=x.dtype == torch.float32,
        num_warps=2 if bm <= 32 else 4, num_stages=3,
    )
    LAUNCHES[0] += 1


def _decode_ok(t: torch.Tensor) -> bool:
    """Whether the kernel passed its first-use check for ``t``'s device and dtype (checked once)."""
    return kernels_pass("LoRA decode", t, _decode_pairs)


def _decode_pairs(device: torch.device, dtype: torch.dtype, rand: Callable[..., torch.Tensor]) -> list[tuple[Any, Any]]:
    """Launches on small tensors (with and without a bias, each row-block size, row counts off the block sizes)
    and torch's results."""
    pairs = []
    for rows, bias in ((5, True), (17, False), (40, True)):
        x, w, a, b = rand(rows, 72), rand(40, 72), rand(6, 72), rand(40, 6)
        bvec = rand(40) if bias else None
        out = torch.empty(rows, 40, device=device, dtype=dtype)
        launch_decode(x, w, bvec, a, b, 0.5, out)
        want = x.float() @ w.float().t() + 0.5 * (x.float() @ a.float().t()) @ b.float().t()
        pairs.append((out, want if bvec is None else want + bvec.float()))
    return pairs


def _decode(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
            lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The kernel's result, or the plain path's operations where its first-use check failed."""
    if not _decode_ok(x):
        y = x.mm(weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
        return y.addmm_(x.mm(lora_a.t()), lora_b.t(), alpha=scaling)
    out = torch.empty(x.shape[0], weight.shape[0], device=x.device, dtype=x.dtype)
    launch_decode(x, weight, bias, lora_a, lora_b, scaling, out)
    return out


@torch.library.custom_op("adapters_lora::lora_decode", mutates_args=())
def _op_decode(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
               lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    return _decode(x, weight, bias, lora_a, lora_b, scaling)


@_op_decode.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
      lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def lora_decode(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float) -> torch.Tensor | None:
    """``x Wᵀ + b + s·(x Aᵀ) Bᵀ`` for 2-D ``x`` (M × K, M ≤ :data:`MAX_ROWS`) in one kernel launch, without
    gradients, or ``None`` where the kernel does not apply (see the module docstring): the caller's plain
    path computes the same to rounding (float32 exactly; half precision rounded at the same points).
    Under ``torch.compile`` the kernel is the custom op ``adapters_lora::lora_decode`` (one graph node)."""
    if (not fused_selected(x, compiled_default=COMPILED_DEFAULT) or torch.is_grad_enabled()
            or x.shape[0] > MAX_ROWS or x.dim() != 2):
        return None
    dtype = x.dtype
    if (dtype not in fused._DTYPES or weight.dtype != dtype or lora_a.dtype != dtype or lora_b.dtype != dtype
            or lora_a.shape[0] > fused._MAX_RANK or (bias is not None and bias.dtype != dtype)
            or weight.numel() >= fused._INT32):
        return None
    if (torch._C._are_functorch_transforms_active() or type(x) not in fused._PLAIN
            or not all(type(t) in fused._PLAIN for t in (weight, lora_a, lora_b))
            or not (x.is_contiguous() and weight.is_contiguous() and lora_a.is_contiguous()
                    and lora_b.is_contiguous())):
        return None
    if torch.compiler.is_compiling():
        return torch.ops.adapters_lora.lora_decode(x, weight, bias, lora_a, lora_b, scaling)
    if not _decode_ok(x):
        return None
    return _decode(x, weight, bias, lora_a, lora_b, scaling)
