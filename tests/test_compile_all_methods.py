"""Every installed method traces into one graph under ``torch.compile(fullgraph=True)``.

A graph break would make compiled training fall back to Python per layer. The ``eager`` backend
runs the captured graph as is, so outputs and gradients must equal the uncompiled model's.
"""

from __future__ import annotations

from typing import Any

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
        model = _trained_model(method)
        inputs = tiny_inputs(model, batch=2, seq=8)
        torch._dynamo.reset()
        run = torch.compile(model, fullgraph=True, backend="eager") if compiled else model
        out = run(**inputs).last_hidden_state
        out.pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.detach(), grads))
    _same_step(results[1], results[0])


def _trained_model(method: str, **overrides) -> torch.nn.Module:
    """A tiny Qwen3 with adapter ``a`` (weights moved off their initial values) set to train, in eval mode."""
    model = adapters.init(tiny_model("qwen3", "base", **overrides))
    model.add_adapter("a", config=method)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model._adapters_state.adapter_parameters("a"):
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.train_adapter("a")
    return model.eval()


def _same_step(got: tuple, want: tuple) -> None:
    """Output and every gradient of two steps, to float rounding."""
    (out, grads), (want_out, want_grads) = got, want
    torch.testing.assert_close(out, want_out, atol=1e-6, rtol=1e-5)
    assert grads.keys() == want_grads.keys() and grads
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


REGIONAL = [*METHODS, "mtl_lora", "compacter[reduction_factor=4]", "prefix_tuning", "prompt_tuning"]


def _step(model: torch.nn.Module, inputs: dict, run: Any = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and gradients of one step of ``model`` (called through ``run``, e.g. its compiled wrapper)."""
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(0)  # dropout draws the same masks in both steps
    out = (model if run is None else run)(**inputs, use_cache=False).last_hidden_state
    out.pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", REGIONAL)
def test_regional_compilation_compiles_one_graph_for_every_layer(method) -> None:
    """Each decoder layer compiled on its own (``layer.compile()``, the quick way to compile an LLM): the
    layers share their graphs, so a 4-layer model compiles no more graphs than a 2-layer one (per-layer state
    that dynamo guards on, such as an int index or a dict keyed by devices, would make every layer a new
    graph, and past the recompile limit run eagerly), and the step equals the eager one."""
    from torch._dynamo.utils import counters

    graphs = []
    for depth in (2, 4):
        model = _trained_model(method, num_hidden_layers=depth)
        inputs = tiny_inputs(model, batch=2, seq=8)
        eager = _step(model, inputs)
        torch._dynamo.reset()
        counters.clear()
        for layer in model.layers:
            layer.compile(fullgraph=True, backend="eager")
        try:
            compiled = _step(model, inputs)
            _step(model, inputs)  # a second step compiles nothing new
            graphs.append(counters["stats"]["unique_graphs"])
        finally:
            torch._dynamo.reset()
        _same_step(compiled, eager)
    assert graphs[0] == graphs[1], f"{method}: {graphs[0]} graphs for 2 layers, {graphs[1]} for 4"


@pytest.mark.parametrize("method", METHODS)
def test_compiled_training_step_after_eager_steps(method) -> None:
    """Train mode, as a training loop runs: an eager step first (it installs the layer frames that let gradient
    checkpointing find a call's context again), then the whole model compiled (``fullgraph=True``): the step
    equals the eager one (was: LoReFT's traced frame bookkeeping exhausted memory, and the frame hooks'
    handles broke the graph). With gradient checkpointing a frozen base model alone cannot compile whole
    (transformers makes the input embeddings require grad, which dynamo cannot return from a graph)."""
    model = _trained_model(method).train()
    inputs = tiny_inputs(model, batch=2, seq=8)
    eager = _step(model, inputs)
    torch._dynamo.reset()
    try:
        compiled = _step(model, inputs, torch.compile(model, fullgraph=True, backend="eager"))
    finally:
        torch._dynamo.reset()
    _same_step(compiled, eager)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("method", METHODS)
def test_regional_compilation_with_gradient_checkpointing(method, reentrant) -> None:
    """Gradient checkpointing and each layer compiled, from the first step (no eager step before): every
    adapter gradient equals the eager checkpointed step's (was, for bottleneck adapters: no gradient at all
    with reentrant checkpointing, a CheckpointError without, when the traced frame hook skipped wrapping the
    layer's checkpointing function)."""
    results = []
    for compiled in (False, True):
        model = _trained_model(method).train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        inputs = tiny_inputs(model, batch=2, seq=8)
        torch._dynamo.reset()
        try:
            if compiled:
                for layer in model.layers:
                    layer.compile(backend="eager")
            results.append(_step(model, inputs))
        finally:
            torch._dynamo.reset()
    _same_step(results[1], results[0])
