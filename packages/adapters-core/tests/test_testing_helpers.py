"""The helpers ``adapters.testing`` gives plugin authors."""

from __future__ import annotations

import torch

from adapters.testing import count_kernel_ops


def test_count_kernel_ops_counts_arithmetic_forward_and_backward_but_not_views() -> None:
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(2, 5, 3)

    def step() -> None:
        y = x.reshape(-1, 3).mm(w.t()).view(2, 5, 4)  # reshape, t, view: no kernels
        (y * 2).sum().backward()

    # forward: mm, mul, sum; backward: the seed gradient (ones_like), the sum's expand (a view), mul,
    # and mm for w's gradient (x needs none)
    assert count_kernel_ops(step) == {"aten.mm": 2, "aten.mul": 2, "aten.sum": 1, "aten.ones_like": 1}
