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
import torch

import adapters
from adapters.testing import count_step_ops, tiny_model


def _added(config: str, layers: int) -> tuple[int, int]:
    """Operations a ReFT adapter adds to a forward call and to a training step of a ``layers``-layer Qwen3."""
    base = tiny_model("qwen3", num_hidden_layers=layers)
    for p in base.parameters():
        p.requires_grad_(False)
    embeds = torch.randn(2, 8, base.config.hidden_size, generator=torch.Generator().manual_seed(0))
    model = adapters.init(tiny_model("qwen3", num_hidden_layers=layers))
    model.add_adapter("r", config=config)
    model.train_adapter("r")
    return (count_step_ops(model, embeds, False) - count_step_ops(base, embeds, False),
            count_step_ops(model, embeds, True) - count_step_ops(base, embeds, True))


@pytest.mark.parametrize("config, forward_ops, training_ops", [
    ("loreft[dropout=0.0]", 9, 35),
    ("loreft[dropout=0.0, r=4]", 46, 172),
    ("direft[dropout=0.0]", 5, 15),
])
def test_reft_operations_per_layer_and_call(config, forward_ops, training_ops) -> None:
    two, four = _added(config, 2), _added(config, 4)
    per_layer = tuple((b - a) // 2 for a, b in zip(two, four))
    per_call = tuple(a - 2 * p for a, p in zip(two, per_layer))
    assert per_layer == (forward_ops, training_ops)
    assert per_call == (11, 11)  # the layout, once a call (the backward adds nothing to it)
