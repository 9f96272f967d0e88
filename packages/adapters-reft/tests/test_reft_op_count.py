"""How many arithmetic operations a ReFT adapter adds (no timing: counted ops; on a GPU each is at least one
kernel launch, and a small-batch training step is bound by launches).

Once a call: the token layout (11: the real-token mask, its stable sort, the lengths, the prefix slots).
Per layer, LoReFT at rank 1 (default positions, no dropout): 9 forward (gather the positions; ``R`` as the
free row over its norm: norm, clamp, divide; ``(W − R)``; one biased GEMM for ``(W − R) h + b``; ``· R``;
zero the slots past a row's length; scatter-add back) and 35 for a training step. Rank 4 costs 46 and 172:
Gram-Schmidt's count grows with r² (``orthonormal_rows`` says why Cholesky QR, a fixed count, was rejected).
DiReFT (no ``R`` to orthonormalise, no ``−Rh``): 5 and 15.
"""

from __future__ import annotations

import pytest

from adapters.testing.layer_ops import ops_per_layer_and_call


@pytest.mark.parametrize("config, forward_ops, training_ops", [
    ("loreft[dropout=0.0]", 9, 35),
    ("loreft[dropout=0.0, r=4]", 46, 172),
    ("direft[dropout=0.0]", 5, 15),
])
def test_reft_operations_per_layer_and_call(config, forward_ops, training_ops) -> None:
    per_layer, per_call = ops_per_layer_and_call(config)
    assert per_layer == (forward_ops, training_ops)
    assert per_call == (11, 11)  # the layout, once a call (the backward adds nothing to it)
