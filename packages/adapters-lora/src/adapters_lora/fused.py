"""LoRA's optional fused training path: ``y = x Wᵀ + b + s·(x Aᵀ) Bᵀ`` in fewer kernel launches (issue #23).

The plain straight-line path (:meth:`.layer.LoRALinear._straight_line`) records ``addmm``, ``mm`` and
``addmm`` forward and eight operations backward (five ``mm``, two ``mul`` for the scaling, one ``add``).
This path runs the base GEMM on cuBLAS and everything rank-``r`` in one Triton kernel
(:func:`.fused_kernels.low_rank_add`):

* forward, 2 launches: ``y = addmm(b, x, Wᵀ)``; kernel: ``hs = s·x Aᵀ`` (kept for backward), ``y += hs Bᵀ``;
* backward, 4 launches: ``gx = g W``; kernel: ``us = s·g B``, ``gx += us A``; ``∂A = usᵀ x``; ``∂B = gᵀ hs``.

**Selection.** ``ADAPTERS_FUSED`` (one mode for every package, :mod:`adapters.fused_switch`): ``0`` (default:
on an H200 the fused step measured slower than the plain one, see the README) never; ``auto`` (or ``1``)
uses the path for CUDA tensors when Triton is installed; ``force`` on any device (CPU tensors need
``TRITON_INTERPRET=1``: the tests). Triton is imported on first use only, so ``import adapters`` and
CPU installs never import it. :func:`lora_linear` returns ``None`` for what the path does not cover
(frozen adapter, trainable base weight, mixed or integer dtypes, rank above 128, ``torch.func`` transforms),
and the caller runs the plain path. Before its first use per device and dtype the kernel is checked
against torch on small tensors; if it fails to compile or disagrees, a :class:`FusedPathWarning` is
issued and that device and dtype compute with torch ops from then on.

**Eager and compiled.** Eagerly an ``autograd.Function`` calls the launchers directly (the dispatcher's
overhead is what a host-bound step cannot afford); under ``torch.compile`` the same launchers are the
custom ops ``adapters_lora::lora_linear_fwd`` / ``_bwd`` with fake implementations, so dynamo records one
node and does not break the graph. Gradient checkpointing recomputes the forward like any other op.
Double backward is not supported (``once_differentiable``). DoRA builds on this module
(:mod:`.fused_dora`: :func:`covers`, :func:`eager_ok`, :func:`checked` and the launchers are shared).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from adapters.plugin import (
    FusedPathWarning,
    device_programs,
    fused_mode,
    fused_selected,
    kernels_pass,
    param,
    set_fused_mode,
)

__all__ = ["FusedPathWarning", "fused_mode", "set_fused_mode", "selected", "covers", "eager_ok",
           "lora_linear", "launch_low_rank", "forward_impl", "backward_impl", "LAUNCHES", "param"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_RANK = 128
_INT32 = 2**31
_PLAIN = (torch.Tensor, torch.nn.Parameter)
#: Triton kernel launches since import (a counter for tests and benchmarks; one ``+= 1`` per launch)
LAUNCHES = [0]
_KERNEL: Any = None
#: whether the kernel was built by Triton's CPU interpreter (``TRITON_INTERPRET=1`` when it was imported)
_INTERPRETED = False


#: whether mode ``"compiled"`` uses the LoRA training kernels inside ``torch.compile`` graphs:
#: no, inductor's code for the plain path measured faster there (README, "Fused training kernels")
COMPILED_DEFAULT = False


def selected(x: torch.Tensor) -> bool:
    """Whether the mode selects the fused path for tensors like ``x`` (device, Triton, compiled or eager)."""
    return fused_selected(x, compiled_default=COMPILED_DEFAULT)


# ------------------------------------------------------------------------------------------ launchers
def _kernels() -> Any:
    """The :mod:`.fused_kernels` module (imported, with Triton, on first use)."""
    global _KERNEL, _INTERPRETED
    if _KERNEL is None:
        from . import fused_kernels

        _INTERPRETED = type(fused_kernels.low_rank_add).__name__ == "InterpretedFunction"
        _KERNEL = fused_kernels
    return _KERNEL


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def launch_low_rank(inp: torch.Tensor, down: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None,
                    h_out: torch.Tensor, scale: float, dora: tuple[torch.Tensor, torch.Tensor | None,
                                                                  torch.Tensor] | None = None) -> None:
    """One :func:`.fused_kernels.low_rank_add` launch: ``h_out = scale·(inp @ down)`` and, when ``out`` is
    given, ``out += h_out @ up`` in place. ``inp`` M × K, ``down`` K × r, ``up`` r × N, ``out`` M × N,
    ``h_out`` M × r: any strides, one device, one floating dtype. ``dora``: ``(factor, bias, out2)`` for
    DoRA's epilogue ``out2 = out · factor + bias`` (float32 factor, ``out2`` M × N row-major)."""
    m, k = inp.shape
    r = down.shape[1]
    n = up.shape[1]
    bm, bk, bn, br = 64, 64, 64, max(16, _next_pow2(r))
    grid_m = -(-m // bm)
    blocks = -(-n // bn) if out is not None else 1
    split = min(blocks, max(1, -(-device_programs(inp.device) // grid_m)))
    per_prog = -(-blocks // split)
    split = -(-blocks // per_prog)
    target = out if out is not None else h_out
    o_strides = out.stride() if out is not None else (0, 0)
    kernel = _kernels().low_rank_add
    factor, bias, out2 = dora if dora is not None else (h_out, None, h_out)
    kernel[(grid_m, split)](
        inp, down, up, target, h_out, factor, bias if bias is not None else factor, out2,
        m, n, k, r, per_prog, float(scale),
        inp.stride(0), inp.stride(1), down.stride(0), down.stride(1), up.stride(0), up.stride(1),
        o_strides[0], o_strides[1], h_out.stride(0), h_out.stride(1),
        BM=bm, BK=bk, BN=bn, BR=br, WRITE_OUT=out is not None, STORE_H=True,
        UPCAST=_INTERPRETED, IEEE=inp.dtype == torch.float32, DORA=dora is not None, HAS_BIAS=bias is not None,
    )
    LAUNCHES[0] += 1


def _base(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.mm(weight.t()) if bias is None else torch.addmm(bias, x, weight.t())


def _kernels_ok(t: torch.Tensor) -> bool:
    """Whether the kernel passed its first-use check for ``t``'s device and dtype (checked once)."""
    return kernels_pass("LoRA", t, _lora_pairs)


def _lora_pairs(device: torch.device, dtype: torch.dtype, rand: Callable[..., torch.Tensor]) -> list[tuple[Any, Any]]:
    """The forward and backward launches of :func:`launch_low_rank` on small tensors, with torch's results."""
    x, a, b, g = rand(80, 48), rand(8, 48), rand(40, 8), rand(80, 40)
    y, hs = torch.zeros(80, 40, device=device, dtype=dtype), torch.empty(80, 8, device=device, dtype=dtype)
    launch_low_rank(x, a.t(), b.t(), y, hs, 0.5)
    gx, us = torch.zeros(80, 48, device=device, dtype=dtype), torch.empty(80, 8, device=device, dtype=dtype)
    launch_low_rank(g, b, a, gx, us, 0.5)
    want_h, want_u = (x.float() @ a.float().t()) * 0.5, (g.float() @ b.float()) * 0.5
    return [(hs, want_h), (y, want_h @ b.float().t()), (us, want_u), (gx, want_u @ a.float())]


def forward_impl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                 lora_b: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, hs)``: ``y = x Wᵀ + b + hs Bᵀ`` (M × N) and ``hs = s·x Aᵀ`` (M × r), ``x`` 2-D."""
    y = _base(x, weight, bias)
    hs = torch.empty(x.shape[0], lora_a.shape[0], device=x.device, dtype=x.dtype)
    if _kernels_ok(x):
        launch_low_rank(x, lora_a.t(), lora_b.t(), y, hs, scaling)
    else:
        torch.mm(x, lora_a.t(), out=hs).mul_(scaling)
        y.addmm_(hs, lora_b.t())
    return y, hs


def backward_impl(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                  lora_b: torch.Tensor, hs: torch.Tensor, scaling: float, need_x: bool, need_a: bool,
                  need_b: bool) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(∂x, ∂A, ∂B)`` from the output gradient ``g`` (M × N); ``None`` where not needed."""
    gx = g.mm(weight) if need_x else None
    ga = gb = None
    if need_x or need_a:
        us = torch.empty(g.shape[0], lora_a.shape[0], device=g.device, dtype=g.dtype)
        if _kernels_ok(g):
            launch_low_rank(g, lora_b, lora_a, gx, us, scaling)
        else:
            torch.mm(g, lora_b, out=us).mul_(scaling)
            if gx is not None:
                gx.addmm_(us, lora_a)
        if need_a:
            ga = us.t().mm(x)
    if need_b:
        gb = g.t().mm(hs)
    return gx, ga, gb


# ------------------------------------------------------------------------------------------ autograd
class _FusedLoRA(torch.autograd.Function):
    """The eager path: launchers called directly, only ``y`` returned (``hs`` is saved)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
        y, hs = forward_impl(x, weight, bias, lora_a, lora_b, scaling)
        ctx.save_for_backward(x, weight, lora_a, lora_b, hs)
        ctx.scaling = scaling
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, lora_a, lora_b, hs = ctx.saved_tensors
        need = ctx.needs_input_grad
        gx, ga, gb = backward_impl(g, x, weight, lora_a, lora_b, hs, ctx.scaling, need[0], need[3], need[4])
        return gx, None, None, ga, gb, None


@torch.library.custom_op("adapters_lora::lora_linear_fwd", mutates_args=())
def _op_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
            lora_b: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    return forward_impl(x, weight, bias, lora_a, lora_b, scaling)


@_op_fwd.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
      lora_b: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_a.shape[0])


@torch.library.custom_op("adapters_lora::lora_linear_bwd", mutates_args=())
def _op_bwd(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
            hs: torch.Tensor, scaling: float, need_x: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gx, ga, gb = backward_impl(g, x, weight, lora_a, lora_b, hs, scaling, need_x, True, True)
    return (gx if gx is not None else x.new_empty(0)), ga, gb


@_op_bwd.register_fake
def _(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
      hs: torch.Tensor, scaling: float, need_x: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (x.new_empty(x.shape) if need_x else x.new_empty(0)), torch.empty_like(lora_a), torch.empty_like(lora_b)


def _op_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, weight, _bias, lora_a, lora_b, scaling = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1])
    ctx.scaling = scaling


def _op_backward(ctx: Any, g: torch.Tensor, _g_hs: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    x, weight, lora_a, lora_b, hs = ctx.saved_tensors
    need = ctx.needs_input_grad
    gx, ga, gb = _op_bwd(g, x, weight, lora_a, lora_b, hs, ctx.scaling, need[0])
    return (gx if need[0] else None), None, None, (ga if need[3] else None), (gb if need[4] else None), None


_op_fwd.register_autograd(_op_backward, setup_context=_op_setup)


# ------------------------------------------------------------------------------------------ entry point
def covers(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
           lora_b: torch.Tensor, compiled_default: bool = COMPILED_DEFAULT) -> bool:
    """Whether the fused path is selected for and covers this call (see :func:`lora_linear`);
    ``compiled_default``: the caller's kernels' :data:`COMPILED_DEFAULT` (DoRA has its own)."""
    if not fused_selected(x, compiled_default=compiled_default) or not torch.is_grad_enabled():
        return False
    if not (lora_a.requires_grad or lora_b.requires_grad) or weight.requires_grad:
        return False
    dtype = x.dtype
    if (dtype not in _DTYPES or weight.dtype != dtype or lora_a.dtype != dtype or lora_b.dtype != dtype
            or lora_a.shape[0] > _MAX_RANK or x.dim() != 2 or x.shape[0] * max(x.shape[1], weight.shape[0]) >= _INT32):
        return False  # (offsets inside the kernels are 32-bit)
    return bias is None or (not bias.requires_grad and bias.dtype == dtype)


def eager_ok(x: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Outside ``torch.compile``: no ``torch.func`` transform, plain tensors (no ``DTensor`` or quantized
    subclass), and the kernel passed its first-use check."""
    return (not torch._C._are_functorch_transforms_active() and type(x) in _PLAIN
            and all(type(t) in _PLAIN for t in tensors) and _kernels_ok(x))


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float) -> torch.Tensor | None:
    """``x Wᵀ + b + s·(x Aᵀ) Bᵀ`` for 2-D ``x`` (M × K) on the fused path, or ``None`` where it does not apply.

    Covers a training step (gradients enabled, ``A`` or ``B`` trainable, ``W`` and ``b`` frozen) with every
    tensor on one device in one dtype (float16, bfloat16, float32) and rank ≤ 128, when :func:`selected`.
    """
    if not covers(x, weight, bias, lora_a, lora_b):
        return None
    if torch.compiler.is_compiling():
        return torch.ops.adapters_lora.lora_linear_fwd(x, weight, bias, lora_a, lora_b, scaling)[0]
    if not eager_ok(x, weight, lora_a, lora_b):
        return None  # functorch transforms and tensor subclasses (DTensor, quantized) keep the plain path
    return _FusedLoRA.apply(x, weight, bias, lora_a, lora_b, scaling)
