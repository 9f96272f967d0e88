"""Every installed method traces into one graph under ``torch.compile(fullgraph=True)``.

A graph break would make compiled training fall back to Python per layer. The ``eager`` backend
runs the captured graph as is, so outputs and gradients must equal the uncompiled model's.
"""

from __future__ import annotations

import pytest
import torch

import adapters
from adapters.plugins import registry
from adapters.testing import tiny_inputs, tiny_model

METHODS = ["lora", "dora", "ia3", "vera", "seq_bn", "par_bn", "double_seq_bn", "loreft"]


@pytest.mark.parametrize(
    "method",
    [pytest.param(m, marks=[] if registry.has_config_string(m) else [pytest.mark.skip(reason=f"{m}: not installed")])
     for m in METHODS],
)
def test_fullgraph_training_step_matches_eager(method) -> None:
    results = []
    for compiled in (False, True):
        model = adapters.init(tiny_model("qwen3", "base"))
        model.add_adapter("a", config=method)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model._adapters_state.adapter_parameters("a"):
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        model.train_adapter("a")
        model.eval()
        inputs = tiny_inputs(model, batch=2, seq=8)
        torch._dynamo.reset()
        run = torch.compile(model, fullgraph=True, backend="eager") if compiled else model
        out = run(**inputs).last_hidden_state
        out.pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.detach(), grads))
    (eager_out, eager_grads), (out, grads) = results
    torch.testing.assert_close(out, eager_out, atol=1e-6, rtol=1e-5)
    assert grads.keys() == eager_grads.keys() and grads
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
