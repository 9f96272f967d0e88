"""How many arithmetic operations prefix tuning adds (no timing: counted ops; on a GPU each is at least one
kernel launch, and a small-batch training step is bound by launches).

Once a call, the layers share one evaluation of the prefix pool: the MLP (``Linear → tanh → Linear``, 3
forward, 11 for a training step), or nothing for flat prefixes (1 in a training step: the ``stack`` that
gathers the layers' gradients). Per layer, 4 forward (the prefix keys and values put in front of the
layer's own, and the attention mask widened: ones and a ``cat``) and 7 for a training step. Each layer used
to evaluate the MLP's first half again and select its columns of the second (18 forward and 55 training
operations on a 2-layer model, against 11 and 25 now; peft's prefix tuning: 8 and 22).
"""

from __future__ import annotations

import pytest

from adapters.testing.layer_ops import ops_per_layer_and_call


@pytest.mark.parametrize("config, per_call", [("prefix_tuning[prefix_length=4]", (3, 11)),
                                              ("prefix_tuning[prefix_length=4, flat=True]", (0, 1))])
def test_prefix_operations_per_layer_and_call(config, per_call) -> None:
    assert ops_per_layer_and_call(config) == ((4, 7), per_call)
