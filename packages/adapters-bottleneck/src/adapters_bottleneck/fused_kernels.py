"""Triton kernels of the fused bottleneck training path (imported only by :mod:`.fused`, only when selected).

The adapter ``out = res + s·(act(inp Wdᵀ + bd) Wuᵀ + bu)`` with a bottleneck of ``D ≤ 128`` features:

* :func:`bottleneck_fwd`: for ``BM`` rows, ``inp`` (``h + x`` summed while loading, or one tensor) times
  ``Wdᵀ`` in registers, the bias and the activation, then ``z Wuᵀ``, the bias, the scale and the residual
  add per column block: one launch for what the plain path does in five (``add``, ``addmm``, activation,
  ``addmm``, ``add``). Kept for the backward pass: ``pre`` (before the activation), ``s·z`` and, when
  the input is a sum, the sum.
* :func:`bottleneck_bwd`: ``u = s·g Wu``, ``dpre = u ⊙ act'(pre)`` (stored) and the input gradient
  ``dpre Wd`` per column block, written as itself and/or plus ``g`` (the residual's gradient when the
  input includes ``h``): one launch for ``mm``, activation backward, ``mm`` and ``add``.

Activations (``ACT``): 0 identity, 1 relu, 2 silu / swish, 3 gelu (erf), 4 gelu (tanh approximation).
``UPCAST``: the interpreter's ``tl.dot`` is wrong on bfloat16 (see :mod:`adapters_lora.fused_kernels`).
``IEEE``: float32 products in full precision, as torch's float32 ``mm``.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["bottleneck_fwd", "bottleneck_bwd"]

# constexpr: a @jit function may read a global only when it is one (Triton 3.6 refuses plain floats at compile
# time; the interpreter does not check, tests/test_fused_compile.py does)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_INV_SQRT_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _sigmoid(t):
    # written out rather than tl.sigmoid: Triton's own @jit helpers are interpreted only when TRITON_INTERPRET
    # was set before triton was imported; the kernels here use builtins and their own helpers only
    return 1.0 / (1.0 + tl.exp(-t))


@triton.jit
def _act(pre, ACT: tl.constexpr):
    if ACT == 1:
        return tl.maximum(pre, 0.0)
    elif ACT == 2:
        return pre * _sigmoid(pre)
    elif ACT == 3:
        return 0.5 * pre * (1.0 + tl.math.erf(pre * _INV_SQRT_2))
    elif ACT == 4:
        inner = _SQRT_2_OVER_PI * (pre + 0.044715 * pre * pre * pre)
        return 0.5 * pre * (1.0 + (2.0 * _sigmoid(2.0 * inner) - 1.0))
    else:
        return pre


@triton.jit
def _act_grad(pre, ACT: tl.constexpr):
    if ACT == 1:
        return tl.where(pre > 0.0, 1.0, 0.0)
    elif ACT == 2:
        sig = _sigmoid(pre)
        return sig * (1.0 + pre * (1.0 - sig))
    elif ACT == 3:
        return 0.5 * (1.0 + tl.math.erf(pre * _INV_SQRT_2)) + pre * _INV_SQRT_2PI * tl.exp(-0.5 * pre * pre)
    elif ACT == 4:
        inner = _SQRT_2_OVER_PI * (pre + 0.044715 * pre * pre * pre)
        t = 2.0 * _sigmoid(2.0 * inner) - 1.0
        return 0.5 * (1.0 + t) + 0.5 * pre * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * pre * pre)
    else:
        return pre * 0.0 + 1.0


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def bottleneck_fwd(
    in1, in2, res, wd, bd, wu, bu, out, pre_out, zs_out, sum_out,
    M, H, D, n_per_prog, scale,
    s_a0, s_a1, s_b0, s_b1, s_r0, s_r1, s_wd0, s_wd1, s_wu0, s_wu1, s_o0, s_o1,
    BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, ACT: tl.constexpr,
    HAS_IN2: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """``out = res + scale·(act(inp Wdᵀ + bd) Wuᵀ + bu)``, ``inp = in1 (+ in2)``; ``pre_out``, ``zs_out``
    (M × D, row-major) and, with ``HAS_IN2``, ``sum_out`` (M × H, row-major) written by column split 0."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    dtype = out.dtype.element_ty
    rows = pid_m * BM + tl.arange(0, BM)
    feats = tl.arange(0, BD)
    row_ok = rows < M
    feat_ok = feats < D
    acc = tl.full((BM, BD), 0.0, tl.float32)
    for k0 in range(0, H, BK):
        cols = k0 + tl.arange(0, BK)
        mask = row_ok[:, None] & (cols[None, :] < H)
        a = tl.load(in1 + rows[:, None] * s_a0 + cols[None, :] * s_a1, mask=mask, other=0.0)
        if HAS_IN2:
            b = tl.load(in2 + rows[:, None] * s_b0 + cols[None, :] * s_b1, mask=mask, other=0.0)
            a = (a.to(tl.float32) + b.to(tl.float32)).to(dtype)  # rounded like the plain path's add
            if pid_n == 0:
                tl.store(sum_out + rows[:, None] * H + cols[None, :], a, mask=mask)
        w = tl.load(wd + feats[None, :] * s_wd0 + cols[:, None] * s_wd1,
                    mask=feat_ok[None, :] & (cols[:, None] < H), other=0.0)
        acc += _dot(a, w, UPCAST, IEEE)
    pre = (acc + tl.load(bd + feats, mask=feat_ok, other=0.0).to(tl.float32)[None, :]).to(dtype)
    z = _act(pre.to(tl.float32), ACT).to(dtype)
    if pid_n == 0:
        small = rows[:, None] * D + feats[None, :]
        small_ok = row_ok[:, None] & feat_ok[None, :]
        tl.store(pre_out + small, pre, mask=small_ok)
        tl.store(zs_out + small, (z.to(tl.float32) * scale).to(dtype), mask=small_ok)
    for j in range(0, n_per_prog):
        cols = (pid_n * n_per_prog + j) * BN + tl.arange(0, BN)
        col_ok = cols < H
        w = tl.load(wu + cols[None, :] * s_wu0 + feats[:, None] * s_wu1,
                    mask=feat_ok[:, None] & col_ok[None, :], other=0.0)
        up = _dot(z, w, UPCAST, IEEE) + tl.load(bu + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        r = tl.load(res + rows[:, None] * s_r0 + cols[None, :] * s_r1, mask=mask, other=0.0).to(tl.float32)
        tl.store(out + rows[:, None] * s_o0 + cols[None, :] * s_o1, (r + scale * up).to(dtype), mask=mask)


@triton.jit
def bottleneck_bwd(
    g, wu, wd, pre_in, dpre_out, gin, gh,
    M, H, D, n_per_prog, scale,
    s_g0, s_g1, s_wu0, s_wu1, s_wd0, s_wd1,
    BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, ACT: tl.constexpr,
    WRITE_GIN: tl.constexpr, WRITE_GH: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """``dpre = scale·(g Wu) ⊙ act'(pre)`` (``dpre_out``, M × D, by column split 0); per column block
    ``gin = dpre Wd`` (``WRITE_GIN``) and ``gh = g + dpre Wd`` (``WRITE_GH``), both M × H row-major."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    dtype = dpre_out.dtype.element_ty
    rows = pid_m * BM + tl.arange(0, BM)
    feats = tl.arange(0, BD)
    row_ok = rows < M
    feat_ok = feats < D
    acc = tl.full((BM, BD), 0.0, tl.float32)
    for n0 in range(0, H, BN):
        cols = n0 + tl.arange(0, BN)
        gv = tl.load(g + rows[:, None] * s_g0 + cols[None, :] * s_g1, mask=row_ok[:, None] & (cols[None, :] < H),
                     other=0.0)
        w = tl.load(wu + cols[:, None] * s_wu0 + feats[None, :] * s_wu1,
                    mask=(cols[:, None] < H) & feat_ok[None, :], other=0.0)
        acc += _dot(gv, w, UPCAST, IEEE)
    small = rows[:, None] * D + feats[None, :]
    small_ok = row_ok[:, None] & feat_ok[None, :]
    pre = tl.load(pre_in + small, mask=small_ok, other=0.0).to(tl.float32)
    dpre = (acc * scale).to(dtype).to(tl.float32) * _act_grad(pre, ACT)  # rounded like the plain path's mm
    dpre = dpre.to(dtype)
    if pid_n == 0:
        tl.store(dpre_out + small, dpre, mask=small_ok)
    for j in range(0, n_per_prog):
        cols = (pid_n * n_per_prog + j) * BK + tl.arange(0, BK)
        col_ok = cols < H
        mask = row_ok[:, None] & col_ok[None, :]
        w = tl.load(wd + feats[:, None] * s_wd0 + cols[None, :] * s_wd1,
                    mask=feat_ok[:, None] & col_ok[None, :], other=0.0)
        grad = _dot(dpre, w, UPCAST, IEEE)
        if WRITE_GIN:
            tl.store(gin + rows[:, None] * H + cols[None, :], grad.to(dtype), mask=mask)
        if WRITE_GH:
            gv = tl.load(g + rows[:, None] * s_g0 + cols[None, :] * s_g1, mask=mask, other=0.0).to(tl.float32)
            tl.store(gh + rows[:, None] * H + cols[None, :], (gv + grad).to(dtype), mask=mask)
