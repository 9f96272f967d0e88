"""DoRA on the fused training path (issue #23): ``out = m ⊙ (x Wᵀ + s·x Aᵀ Bᵀ) / ‖W + s·BA‖_row + b``.

The plain path (:class:`.deltas.DoRADelta`) adds 19 operations forward and 9 backward to each projection's
GEMMs, most of them for the row norms. Here (kernels in :mod:`.fused_kernels`):

* forward, 3 launches: :func:`~.fused_kernels.dora_norm` (``‖W‖²``, ``W Aᵀ`` and ``A Aᵀ`` in one pass over
  ``W``, then the norms and ``f = m / norm``), ``x Wᵀ`` (cuBLAS), and the LoRA kernel with DoRA's epilogue
  (``z = x Wᵀ + s·x Aᵀ Bᵀ`` kept for backward, ``out = z ⊙ f + b``);
* backward, 6 launches (7 when the magnitude is not float32: its gradient's cast): a zeroed accumulator,
  :func:`~.fused_kernels.dora_grad` (``g ⊙ f`` and the magnitude's gradient ``Σ g ⊙ z / norm``) and LoRA's
  four (:func:`.fused.backward_impl` on ``g ⊙ f``).

As in the DoRA paper and the plain path, the norm is a constant for the backward pass. ``‖W‖²`` is
recomputed in the same pass that reads ``W`` for ``W Aᵀ`` (the plain path caches it; reading ``W`` once
either way). Selection, the first-use check and the fallbacks are those of :mod:`.fused`; covered: a
whole ``nn.Linear`` projection (no fused-projection part), no dropout while training, no gate, no
quantized base, no autocast, one dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.autograd.function import once_differentiable

from adapters.plugin import fused_selected, kernels_pass

from . import fused

if TYPE_CHECKING:
    from .deltas import DoRADelta
    from .layer import LoRALinear

__all__ = ["dora_layer", "dora_linear", "forward_impl", "backward_impl", "COMPILED_DEFAULT"]

#: whether mode ``"compiled"`` uses the DoRA kernels inside ``torch.compile`` graphs (README,
#: "Fused training kernels")
COMPILED_DEFAULT = False


def launch_dora_norm(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, magnitude: torch.Tensor,
                     scaling: float, factor: torch.Tensor, norm: torch.Tensor) -> None:
    """:func:`.fused_kernels.dora_norm`: ``factor`` and ``norm`` (float32, N) from ``W`` (N × K), ``A``, ``B``,
    ``m``."""
    n, k = weight.shape
    r = lora_a.shape[0]
    kernels = fused._kernels()  # first: sets fused._INTERPRETED
    kernels.dora_norm[(-(-n // 32),)](  # 32 rows a program: 64 programs for a 2048-row projection
        weight, lora_a, lora_b, magnitude, factor, norm, n, k, r, float(scaling),
        weight.stride(0), weight.stride(1), lora_a.stride(0), lora_a.stride(1), lora_b.stride(0), lora_b.stride(1),
        BN=32, BK=64, BR=max(16, fused._next_pow2(r)), UPCAST=fused._INTERPRETED, IEEE=weight.dtype == torch.float32)
    fused.LAUNCHES[0] += 1


def launch_dora_grad(g: torch.Tensor, z: torch.Tensor, factor: torch.Tensor, norm: torch.Tensor, gp: torch.Tensor,
                     gm_acc: torch.Tensor) -> None:
    """:func:`.fused_kernels.dora_grad`: ``gp = g ⊙ factor`` and ``gm_acc += Σ_rows g ⊙ z / norm``."""
    m, n = g.shape
    fused._kernels().dora_grad[(-(-m // 64), -(-n // 64))](
        g, z, factor, norm, gp, gm_acc, m, n, g.stride(0), g.stride(1), BM=64, BN=64)
    fused.LAUNCHES[0] += 1


def _torch_norm(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, magnitude: torch.Tensor,
                scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    w, a, b = weight.float(), lora_a.float(), lora_b.float()
    sq = (w * w).sum(1) + 2 * scaling * (b * (w @ a.t())).sum(1) + scaling**2 * ((b @ (a @ a.t())) * b).sum(1)
    norm = sq.clamp_min(1e-12).sqrt()
    return magnitude.float() / norm, norm


def forward_impl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                 lora_b: torch.Tensor, magnitude: torch.Tensor, scaling: float) -> tuple[torch.Tensor, ...]:
    """``(out, z, hs, factor, norm)`` for 2-D ``x`` (M × K): ``out`` and ``z`` M × N, ``hs = s·x Aᵀ`` M × r,
    ``factor = m / norm`` and ``norm`` float32 (N)."""
    n = weight.shape[0]
    z = x.mm(weight.t())
    hs = torch.empty(x.shape[0], lora_a.shape[0], device=x.device, dtype=x.dtype)
    out = torch.empty(x.shape[0], n, device=x.device, dtype=x.dtype)
    if fused._kernels_ok(x) and _dora_ok(x):
        factor = torch.empty(n, device=x.device, dtype=torch.float32)
        norm = torch.empty(n, device=x.device, dtype=torch.float32)
        launch_dora_norm(weight, lora_a, lora_b, magnitude, scaling, factor, norm)
        fused.launch_low_rank(x, lora_a.t(), lora_b.t(), z, hs, scaling, dora=(factor, bias, out))
        return out, z, hs, factor, norm
    factor, norm = _torch_norm(weight, lora_a, lora_b, magnitude, scaling)
    torch.mm(x, lora_a.t(), out=hs).mul_(scaling)
    z.addmm_(hs, lora_b.t())
    torch.mul(z, factor.to(z.dtype), out=out)
    if bias is not None:
        out.add_(bias)
    return out, z, hs, factor, norm


def backward_impl(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                  lora_b: torch.Tensor, hs: torch.Tensor, z: torch.Tensor, factor: torch.Tensor, norm: torch.Tensor,
                  scaling: float, magnitude_dtype: torch.dtype, need: tuple[bool, bool, bool, bool]
                  ) -> tuple[torch.Tensor | None, ...]:
    """``(∂x, ∂A, ∂B, ∂m)`` from the output gradient ``g``; ``need`` says which (``None`` where not)."""
    if fused._kernels_ok(g) and _dora_ok(g):
        gm_acc = torch.zeros(factor.shape, device=g.device, dtype=torch.float32)
        gp = torch.empty(z.shape, device=g.device, dtype=g.dtype)
        launch_dora_grad(g, z, factor, norm, gp, gm_acc)
    else:
        gp = g * factor.to(g.dtype)
        gm_acc = (g.float() * z.float()).sum(0) / norm
    gx, ga, gb = fused.backward_impl(gp, x, weight, lora_a, lora_b, hs, scaling, need[0], need[1], need[2])
    return gx, ga, gb, (gm_acc.to(magnitude_dtype) if need[3] else None)


def _dora_ok(t: torch.Tensor) -> bool:
    """Whether DoRA's kernels passed their first-use check for ``t``'s device and dtype."""
    return kernels_pass("DoRA", t, _check_once)


def _check_once(device: torch.device, dtype: torch.dtype, rand: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(kernel result, torch result)`` pairs of the DoRA kernels on small tensors (for ``kernels_pass``)."""
    w, a, b, mag, g = rand(40, 48), rand(8, 48), rand(40, 8), rand(40).abs() + 1, rand(80, 40)
    factor = torch.empty(40, device=device, dtype=torch.float32)
    norm = torch.empty(40, device=device, dtype=torch.float32)
    launch_dora_norm(w, a, b, mag, 0.5, factor, norm)
    want_f, want_n = _torch_norm(w, a, b, mag, 0.5)
    z = rand(80, 40)
    gm_acc = torch.zeros(40, device=device, dtype=torch.float32)
    gp = torch.empty(80, 40, device=device, dtype=dtype)
    launch_dora_grad(g, z, want_f, want_n, gp, gm_acc)
    want_gm = (g.float() * z.float()).sum(0) / want_n
    return [(factor, want_f), (norm, want_n), (gp, g.float() * want_f), (gm_acc, want_gm)]


# ------------------------------------------------------------------------------------------ autograd
class _FusedDoRA(torch.autograd.Function):
    """The eager path: launchers called directly, only ``out`` returned."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, magnitude: torch.Tensor, scaling: float) -> torch.Tensor:
        out, z, hs, factor, norm = forward_impl(x, weight, bias, lora_a, lora_b, magnitude, scaling)
        ctx.save_for_backward(x, weight, lora_a, lora_b, hs, z, factor, norm)
        ctx.config = (scaling, magnitude.dtype)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, lora_a, lora_b, hs, z, factor, norm = ctx.saved_tensors
        n = ctx.needs_input_grad
        gx, ga, gb, gm = backward_impl(g, x, weight, lora_a, lora_b, hs, z, factor, norm, *ctx.config,
                                       (n[0], n[3], n[4], n[5]))
        return gx, None, None, ga, gb, gm, None


@torch.library.custom_op("adapters_lora::dora_linear_fwd", mutates_args=())
def _op_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
            lora_b: torch.Tensor, magnitude: torch.Tensor, scaling: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return forward_impl(x, weight, bias, lora_a, lora_b, magnitude, scaling)


@_op_fwd.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor,
      magnitude: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                        torch.Tensor]:
    m, n = x.shape[0], weight.shape[0]
    vec = x.new_empty(n, dtype=torch.float32)
    return x.new_empty(m, n), x.new_empty(m, n), x.new_empty(m, lora_a.shape[0]), vec, torch.empty_like(vec)


@torch.library.custom_op("adapters_lora::dora_linear_bwd", mutates_args=())
def _op_bwd(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
            hs: torch.Tensor, z: torch.Tensor, factor: torch.Tensor, norm: torch.Tensor, scaling: float,
            magnitude: torch.Tensor, need_x: bool) -> list[torch.Tensor]:
    gx, ga, gb, gm = backward_impl(g, x, weight, lora_a, lora_b, hs, z, factor, norm, scaling, magnitude.dtype,
                                   (need_x, True, True, True))
    return [gx if gx is not None else x.new_empty(0), ga, gb, gm]


@_op_bwd.register_fake
def _(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
      hs: torch.Tensor, z: torch.Tensor, factor: torch.Tensor, norm: torch.Tensor, scaling: float,
      magnitude: torch.Tensor, need_x: bool) -> list[torch.Tensor]:
    return [x.new_empty(x.shape) if need_x else x.new_empty(0), torch.empty_like(lora_a), torch.empty_like(lora_b),
            torch.empty_like(magnitude)]


def _op_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    x, weight, _bias, lora_a, lora_b, magnitude, scaling = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, *output[1:], magnitude)
    ctx.scaling = scaling


def _op_backward(ctx: Any, g: torch.Tensor, *_unused: Any) -> tuple[torch.Tensor | None, ...]:
    x, weight, lora_a, lora_b, z, hs, factor, norm, magnitude = ctx.saved_tensors  # forward_impl's order
    n = ctx.needs_input_grad
    gx, ga, gb, gm = _op_bwd(g, x, weight, lora_a, lora_b, hs, z, factor, norm, ctx.scaling, magnitude, n[0])
    return (gx if n[0] else None), None, None, (ga if n[3] else None), (gb if n[4] else None), \
        (gm if n[5] else None), None


_op_fwd.register_autograd(_op_backward, setup_context=_op_setup)


# ------------------------------------------------------------------------------------------ entry points
def dora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, magnitude: torch.Tensor, scaling: float) -> torch.Tensor | None:
    """DoRA's output for 2-D ``x`` (M × K) on the fused path, or ``None`` where it does not apply (the
    conditions of :func:`.fused.lora_linear`, with the magnitude ``m`` (N) in the same dtype)."""
    if (not fused.covers(x, weight, bias, lora_a, lora_b, COMPILED_DEFAULT) or magnitude.dtype != x.dtype
            or magnitude.shape != (weight.shape[0],)):
        return None
    if torch.compiler.is_compiling():
        return torch.ops.adapters_lora.dora_linear_fwd(x, weight, bias, lora_a, lora_b, magnitude, scaling)[0]
    if not fused.eager_ok(x, weight, lora_a, lora_b) or not _dora_ok(x):
        return None
    return _FusedDoRA.apply(x, weight, bias, lora_a, lora_b, magnitude, scaling)


def dora_layer(layer: LoRALinear, module: DoRADelta, x: torch.Tensor) -> torch.Tensor | None:
    """``module.forward(x, layer.base_forward(x), layer)`` on the fused path for a lone DoRA adapter on a
    whole float ``nn.Linear``, or ``None`` (dropout while training, a gate, a fused-projection part, a
    quantized or Conv1D base, autocast: the plain path)."""
    if not fused_selected(x, compiled_default=COMPILED_DEFAULT) or not torch.is_grad_enabled():
        return None
    if (module.row_index is not None or module.gate is not None or (module.dropout is not None and module.training)
            or layer.is_conv1d or layer.quantization is not None or torch.is_autocast_enabled(x.device.type)):
        return None
    weight = fused.param(layer, "weight")
    out = dora_linear(x.reshape(-1, layer.in_features), weight, fused.param(layer, "bias"),
                      fused.param(module, "lora_A"), fused.param(module, "lora_B"), fused.param(module, "magnitude"),
                      module.scaling)
    return None if out is None else out.view(*x.shape[:-1], layer.out_features)
