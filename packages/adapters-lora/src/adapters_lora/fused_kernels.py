"""Triton kernels of LoRA's fused training path (imported only by :mod:`.fused`, only when it is selected).

One kernel serves the forward and the backward pass of ``y = x Wᵀ + b + s·(x Aᵀ) Bᵀ``: for a block of
``BM`` rows of ``inp`` (M × K) it computes the rank-``r`` product ``h = s·(inp @ D)`` (D: K × r) in
registers, optionally stores it (M × r), and adds ``h @ U`` (U: r × N) into ``out`` (M × N) in place.

* forward: ``inp = x``, ``D = Aᵀ``, ``U = Bᵀ``, ``out = addmm(b, x, Wᵀ)`` (cuBLAS): the down projection,
  the scale, the up projection and the add in one launch (the plain path: ``mm`` + ``addmm``);
* backward: ``inp = g``, ``D = B``, ``U = A``, ``out = g W`` (cuBLAS): ``s·(g B)`` and the input
  gradient's LoRA term accumulated in one launch (the plain path: ``mm``, ``mul``, ``mm``, ``add``).

DoRA adds :func:`dora_norm` (its row norms and column factor in one pass over ``W``), an epilogue of
:func:`low_rank_add` (the factor and the bias) and :func:`dora_grad` (the gradient through the factor).
Inference at few rows (``generate()``'s decode steps) has its own kernel, :func:`lora_decode`: the base GEMM
and the LoRA term in one launch (:mod:`.fused_decode`).

Every matrix is passed with its two strides, so transposes are free and the gradient arriving from a
transposed view needs no copy. A program owns one row block and ``n_per_prog`` column blocks of ``out``
(the grid's second axis splits the columns when there are few row blocks, so small batches still
fill the GPU; each such program recomputes its row block's ``h``, reading ``inp`` again from L2).

``UPCAST``: ``tl.dot`` on bfloat16 operands is wrong in Triton's CPU interpreter (3.9: it multiplies
the raw 16-bit patterns), so under ``TRITON_INTERPRET=1`` operands are widened to float32 first, which
computes the same float32-accumulated products. ``IEEE``: float32 operands use full-precision products
(as torch's float32 ``mm`` does by default), not TF32.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["low_rank_add", "dora_norm", "dora_grad", "lora_decode"]


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """``a @ b`` accumulated in float32: operands widened first under the interpreter (``UPCAST``), float32
    products in full precision (``IEEE``)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def low_rank_add(
    inp, down, up, out, h_out, col_scale, col_bias, out2,
    M, N, K, R, n_per_prog, scale,
    s_im, s_ik, s_dk, s_dr, s_ur, s_un, s_om, s_on, s_hm, s_hr,
    BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
    WRITE_OUT: tl.constexpr, STORE_H: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    DORA: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """``h = scale·(inp @ down)``; ``h_out = h`` (``STORE_H``); ``out += h @ up`` (``WRITE_OUT``); with ``DORA``
    also ``out2 = out · col_scale + col_bias`` (M × N row-major; ``col_scale`` float32, the bias only with
    ``HAS_BIAS``): DoRA's output from ``z = x Wᵀ + s·x Aᵀ Bᵀ``, which stays in ``out`` for the backward pass.

    Grid: ``(cdiv(M, BM), column splits)``; program ``(i, j)`` adds into column blocks
    ``j·n_per_prog … (j+1)·n_per_prog − 1`` of row block ``i``; ``h`` is stored by ``j == 0`` only.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    ranks = tl.arange(0, BR)
    row_ok = rows < M
    rank_ok = ranks < R
    acc = tl.full((BM, BR), 0.0, tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        col_ok = cols < K
        x = tl.load(inp + rows[:, None] * s_im + cols[None, :] * s_ik,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        d = tl.load(down + cols[:, None] * s_dk + ranks[None, :] * s_dr,
                    mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
        acc += _dot(x, d, UPCAST, IEEE)
    h = (acc * scale).to(out.dtype.element_ty)
    if STORE_H:
        if pid_n == 0:
            tl.store(h_out + rows[:, None] * s_hm + ranks[None, :] * s_hr, h,
                     mask=row_ok[:, None] & rank_ok[None, :])
    if WRITE_OUT:
        for j in range(0, n_per_prog):
            cols = (pid_n * n_per_prog + j) * BN + tl.arange(0, BN)
            col_ok = cols < N
            u = tl.load(up + ranks[:, None] * s_ur + cols[None, :] * s_un,
                        mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
            delta = _dot(h, u, UPCAST, IEEE)
            ptrs = out + rows[:, None] * s_om + cols[None, :] * s_on
            mask = row_ok[:, None] & col_ok[None, :]
            y = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            z = (y + delta).to(out.dtype.element_ty)
            tl.store(ptrs, z, mask=mask)
            if DORA:
                o = z.to(tl.float32) * tl.load(col_scale + cols, mask=col_ok, other=0.0)[None, :]
                if HAS_BIAS:
                    o += tl.load(col_bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
                tl.store(out2 + rows[:, None] * N + cols[None, :], o.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def dora_norm(
    w, a, b, mag, f_out, norm_out,
    N, K, R, scale,
    s_w0, s_w1, s_a0, s_a1, s_b0, s_b1,
    BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """DoRA's column factor without forming ``W + s·BA``: for ``BN`` output rows, ``‖W‖²``, ``W Aᵀ`` and the
    Gram matrix ``A Aᵀ`` in one pass over ``K``, then ``norm = sqrt(‖W‖² + 2s·B·(W Aᵀ) + s²·(B AAᵀ)·B)``
    (clamped at 1e-12 before the root) and ``f = m / norm``; both float32 (N). Grid: ``cdiv(N, BN)``."""
    pid = tl.program_id(0)
    rows = pid * BN + tl.arange(0, BN)
    ranks = tl.arange(0, BR)
    row_ok = rows < N
    rank_ok = ranks < R
    wa = tl.full((BN, BR), 0.0, tl.float32)
    gram = tl.full((BR, BR), 0.0, tl.float32)
    wsq = tl.full((BN,), 0.0, tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        col_ok = cols < K
        wv = tl.load(w + rows[:, None] * s_w0 + cols[None, :] * s_w1, mask=row_ok[:, None] & col_ok[None, :],
                     other=0.0)
        at = tl.load(a + ranks[None, :] * s_a0 + cols[:, None] * s_a1, mask=col_ok[:, None] & rank_ok[None, :],
                     other=0.0)
        wf = wv.to(tl.float32)
        wsq += tl.reduce(wf * wf, 1, _add)
        atf = at.to(tl.float32)
        wa += _dot(wv, at, UPCAST, IEEE)
        gram += tl.dot(tl.trans(atf), atf, input_precision="ieee")
    bv = tl.load(b + rows[:, None] * s_b0 + ranks[None, :] * s_b1, mask=row_ok[:, None] & rank_ok[None, :],
                 other=0.0).to(tl.float32)
    cross = tl.reduce(bv * wa, 1, _add)
    quad = tl.reduce(tl.dot(bv, gram, input_precision="ieee") * bv, 1, _add)
    norm = tl.sqrt(tl.maximum(wsq + 2.0 * scale * cross + scale * scale * quad, 1e-12))
    m = tl.load(mag + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(norm_out + rows, norm, mask=row_ok)
    tl.store(f_out + rows, m / norm, mask=row_ok)


@triton.jit
def dora_grad(
    g, z, f, norm, gp_out, gm_acc,
    M, N, s_g0, s_g1,
    BM: tl.constexpr, BN: tl.constexpr,
):
    """DoRA's backward through the column factor, one ``BM × BN`` tile per program: ``gp = g ⊙ f`` (the
    gradient of ``z``, M × N row-major) and ``gm_acc += Σ_rows g ⊙ z / norm`` (the magnitude's gradient,
    float32, accumulated atomically over row blocks). Grid: ``(cdiv(M, BM), cdiv(N, BN))``."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    col_ok = cols < N
    mask = (rows < M)[:, None] & col_ok[None, :]
    gv = tl.load(g + rows[:, None] * s_g0 + cols[None, :] * s_g1, mask=mask, other=0.0).to(tl.float32)
    zv = tl.load(z + rows[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    fv = tl.load(f + cols, mask=col_ok, other=0.0)
    tl.store(gp_out + rows[:, None] * N + cols[None, :], (gv * fv[None, :]).to(gp_out.dtype.element_ty), mask=mask)
    part = tl.reduce(gv * zv, 0, _add) / tl.load(norm + cols, mask=col_ok, other=1.0)
    tl.atomic_add(gm_acc + cols, part, mask=col_ok)


@triton.jit
def lora_decode(
    x, w, bias, down, up, y,
    M, N, K, R, scale,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """Inference at few rows (decode): ``y = x Wᵀ + b + s·(x Aᵀ) Bᵀ`` in one launch (the plain path: the base
    GEMM, ``mm``, ``addmm_``). Row-major ``x`` M × K, ``w`` N × K, ``down`` = A (r × K), ``up`` = B (N × r),
    ``y`` M × N: no stride arguments, as few runtime arguments as a launch from Python can take (its host
    cost grows with them, and a decode step is bound by that cost).

    Grid ``(cdiv(N, BN), cdiv(M, BM))``: a program reads its ``BN`` rows of ``W`` once and the whole of ``A``
    (small) while it accumulates ``x Wᵀ`` and ``x Aᵀ`` over ``K``, then adds ``s·h Bᵀ`` for its columns.
    Rounded where the plain path rounds: ``x Wᵀ + b`` and ``h = x Aᵀ`` to the output dtype, then
    ``(x Wᵀ + b) + s·h Bᵀ`` accumulated in float32 and rounded once.
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    dtype = y.dtype.element_ty
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    ranks = tl.arange(0, BR)
    row_ok = rows < M
    col_ok = cols < N
    rank_ok = ranks < R
    acc = tl.full((BM, BN), 0.0, tl.float32)
    hacc = tl.full((BM, BR), 0.0, tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < K
        xv = tl.load(x + rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wv = tl.load(w + cols[None, :] * K + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        dv = tl.load(down + ranks[None, :] * K + ks[:, None], mask=rank_ok[None, :] & k_ok[:, None], other=0.0)
        acc += _dot(xv, wv, UPCAST, IEEE)
        hacc += _dot(xv, dv, UPCAST, IEEE)
    if HAS_BIAS:
        acc += tl.load(bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    base = acc.to(dtype).to(tl.float32)
    h = hacc.to(dtype)
    uv = tl.load(up + cols[None, :] * R + ranks[:, None], mask=col_ok[None, :] & rank_ok[:, None], other=0.0)
    delta = _dot(h, uv, UPCAST, IEEE)
    tl.store(y + rows[:, None] * N + cols[None, :], (base + scale * delta).to(dtype),
             mask=row_ok[:, None] & col_ok[None, :])
