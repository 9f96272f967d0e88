"""How many arithmetic operations a bottleneck adapter adds per location (no timing: counted ops).

On a GPU every counted ATen op is at least one kernel launch, and at small batches training steps
are bound by launches, so the count is what a regression would cost. ``seq_bn`` on a pre-norm model
(Pfeiffer: adapter input ``h + x``, output ``h + up(relu(down(h + x)))``) needs 5 forward: the input
sum, the two biased projections, the activation and the residual add. Backward adds 9: 4 GEMMs for
the two weight gradients and the two input gradients, 2 bias-gradient sums, the activation's
backward, and 2 sums of gradients of tensors used twice. ``par_bn`` (input ``x``, output
``h + s·up(relu(down(x)))``) needs as many: the scaling multiplication takes the input sum's place.
"""

from __future__ import annotations

import pytest

import adapters
from adapters.testing import count_step_ops, frozen_base_step_ops, tiny_model


@pytest.mark.parametrize("config, forward_ops, training_ops", [("seq_bn", 5, 14), ("par_bn", 5, 14)])
def test_bottleneck_operations_per_location(config, forward_ops, training_ops) -> None:
    embeds, base_infer, base_train = frozen_base_step_ops("qwen3")
    model = adapters.init(tiny_model("qwen3"))
    model.add_adapter("a", config=config)  # one location per layer (after the FFN)
    model.train_adapter("a")
    locations = model.config.num_hidden_layers
    assert count_step_ops(model, embeds, False) - base_infer == forward_ops * locations
    assert count_step_ops(model, embeds, True) - base_train == training_ops * locations
    model.set_active_adapters(None)
    assert count_step_ops(model, embeds, False) == base_infer  # inactive: exactly the base's operations
