"""Triton kernels of LoRA's fused training path (imported only by :mod:`.fused`, only when it is selected).

One kernel serves the forward and the backward pass of ``y = x Wᵀ + b + s·(x Aᵀ) Bᵀ``: for a block of
``BM`` rows of ``inp`` (M × K) it computes the rank-``r`` product ``h = s·(inp @ D)`` (D: K × r) in
registers, optionally stores it (M × r), and adds ``h @ U`` (U: r × N) into ``out`` (M × N) in place.

* forward: ``inp = x``, ``D = Aᵀ``, ``U = Bᵀ``, ``out = addmm(b, x, Wᵀ)`` (cuBLAS): the down projection,
  the scale, the up projection and the add in one launch (the plain path: ``mm`` + ``addmm``);
* backward: ``inp = g``, ``D = B``, ``U = A``, ``out = g W`` (cuBLAS): ``s·(g B)`` and the input
  gradient's LoRA term accumulated in one launch (the plain path: ``mm``, ``mul``, ``mm``, ``add``).

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

__all__ = ["low_rank_add"]


@triton.jit
def low_rank_add(
    inp, down, up, out, h_out,
    M, N, K, R, n_per_prog, scale,
    s_im, s_ik, s_dk, s_dr, s_ur, s_un, s_om, s_on, s_hm, s_hr,
    BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
    WRITE_OUT: tl.constexpr, STORE_H: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """``h = scale·(inp @ down)``; ``h_out = h`` (``STORE_H``); ``out += h @ up`` (``WRITE_OUT``).

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
        if UPCAST:
            x = x.to(tl.float32)
            d = d.to(tl.float32)
        if IEEE:
            acc += tl.dot(x, d, input_precision="ieee")
        else:
            acc += tl.dot(x, d)
    h = (acc * scale).to(out.dtype.element_ty)
    if STORE_H:
        if pid_n == 0:
            tl.store(h_out + rows[:, None] * s_hm + ranks[None, :] * s_hr, h,
                     mask=row_ok[:, None] & rank_ok[None, :])
    if WRITE_OUT:
        if UPCAST:
            h = h.to(tl.float32)
        for j in range(0, n_per_prog):
            cols = (pid_n * n_per_prog + j) * BN + tl.arange(0, BN)
            col_ok = cols < N
            u = tl.load(up + ranks[:, None] * s_ur + cols[None, :] * s_un,
                        mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:
                u = u.to(tl.float32)
            if IEEE:
                delta = tl.dot(h, u, input_precision="ieee")
            else:
                delta = tl.dot(h, u)
            ptrs = out + rows[:, None] * s_om + cols[None, :] * s_on
            mask = row_ok[:, None] & col_ok[None, :]
            y = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            tl.store(ptrs, (y + delta).to(out.dtype.element_ty), mask=mask)
