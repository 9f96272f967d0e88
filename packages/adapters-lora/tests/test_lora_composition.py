"""Composition blocks on LoRA adapters: Stack, Average, BatchSplit, MultiTask, Parallel; Fuse/Split refused."""

from __future__ import annotations

import pytest
import torch

import adapters.composition as ac
from adapters.errors import CompositionError
from adapters_lora import LoRAConfig

CFG = LoRAConfig(r=4, alpha=8, attn_matrices=["q", "k", "v", "o"], intermediate_lora=True)


@pytest.fixture(scope="module")
def model():
    """A tiny llama with three LoRA adapters a, b (random B) and c (= [a | b] concatenated, rank 8)."""
    import adapters
    from adapters.testing import tiny_model

    m = adapters.init(tiny_model("llama"))
    gen = torch.Generator().manual_seed(3)
    for name in ("a", "b"):
        m.add_adapter(name, CFG)
        with torch.no_grad():
            for layer in m._adapters_state.layers(name):
                layer.adapters[name].lora_B.copy_(torch.randn(layer.adapters[name].lora_B.shape, generator=gen) * 0.2)
    return m


def _concat(model, name: str, wa: float, wb: float) -> None:
    """Adapter ``name`` of rank 8 whose delta is ``wa·Δa + wb·Δb`` (same scaling 2.0 as a and b)."""
    model.add_adapter(name, LoRAConfig(r=8, alpha=16, attn_matrices=["q", "k", "v", "o"], intermediate_lora=True),
                      overwrite_ok=True)
    with torch.no_grad():
        for layer in model._adapters_state.layers(name):
            a, b, c = (layer.adapters[n] for n in ("a", "b", name))
            c.lora_A.copy_(torch.cat([a.lora_A, b.lora_A]))
            c.lora_B.copy_(torch.cat([wa * a.lora_B, wb * b.lora_B], dim=1))


def _run(model, setup, inputs, **kw):
    model.set_active_adapters(setup)
    with torch.no_grad():
        return model(**inputs, **kw).last_hidden_state


def test_stack_adds_deltas(model, helpers) -> None:
    inputs = helpers.tiny_inputs(model)
    _concat(model, "ab", 1.0, 1.0)
    stacked = _run(model, ac.Stack("a", "b"), inputs)
    torch.testing.assert_close(stacked, _run(model, "ab", inputs), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(stacked, _run(model, "a", inputs), atol=1e-4)
    # list form is a Stack, too
    torch.testing.assert_close(_run(model, ["a", "b"], inputs), stacked, atol=0, rtol=0)


def test_average(model, helpers) -> None:
    inputs = helpers.tiny_inputs(model)
    alone = _run(model, "a", inputs)
    torch.testing.assert_close(_run(model, ac.Average("a", "a"), inputs), alone, atol=1e-6, rtol=1e-6)
    _concat(model, "avg", 2 / 3, 1 / 3)
    averaged = _run(model, ac.Average("a", "b", weights=[2, 1]), inputs)  # normalised to 2/3, 1/3
    torch.testing.assert_close(averaged, _run(model, "avg", inputs), atol=1e-5, rtol=1e-5)


def test_batch_split(model, helpers) -> None:
    inputs = helpers.tiny_inputs(model, batch=3)
    out = _run(model, ac.BatchSplit("a", "b", batch_sizes=[1, 2]), inputs)
    first = _run(model, "a", {k: v[:1] for k, v in inputs.items()})
    rest = _run(model, "b", {k: v[1:] for k, v in inputs.items()})
    torch.testing.assert_close(out, torch.cat([first, rest]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["ints", "names", "tensor"])
def test_multitask(model, helpers, kind: str) -> None:
    inputs = helpers.tiny_inputs(model, batch=3)
    ids = {"ints": [1, 0, 1], "names": ["b", "a", "b"], "tensor": torch.tensor([1, 0, 1])}[kind]
    out = _run(model, ac.MultiTask("a", "b"), inputs, task_ids=ids)
    only_a, only_b = _run(model, "a", inputs), _run(model, "b", inputs)
    torch.testing.assert_close(out[1], only_a[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[[0, 2]], only_b[[0, 2]], atol=1e-5, rtol=1e-5)


def test_multitask_needs_task_ids(model, helpers) -> None:
    model.set_active_adapters(ac.MultiTask("a", "b"))
    with pytest.raises(ValueError, match="task_ids"), torch.no_grad():
        model(**helpers.tiny_inputs(model))


def test_parallel(model, helpers) -> None:
    inputs = helpers.tiny_inputs(model, batch=2)
    out = _run(model, ac.Parallel("a", "b"), inputs)
    assert out.shape[0] == 4
    torch.testing.assert_close(out[:2], _run(model, "a", inputs), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[2:], _run(model, "b", inputs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block", [ac.Fuse("a", "b"), ac.Split("a", "b", splits=[4])])
def test_fuse_and_split_refused(model, block) -> None:
    model.set_active_adapters("a")
    name = type(block).__name__
    with pytest.raises(CompositionError, match=rf"method 'lora'.*{name}"):
        model.set_active_adapters(block)
    assert model.active_adapters == ac.Stack("a")  # unchanged


def test_failed_multitask_forward_leaves_no_state_behind() -> None:
    """A forward that fails in the pre-hook (bad or missing task ids) must not leave a context or a
    pending call entry behind: the next forward passes behave exactly as before."""
    import adapters
    import adapters.composition as ac
    from adapters import forward as forward_module
    from adapters.context import current_context
    from adapters.testing import tiny_inputs, tiny_model

    model = tiny_model("qwen3")
    adapters.init(model)
    model.add_adapter("a", "lora[init_weights='bert']")
    model.add_adapter("b", "lora[init_weights='bert']")
    inputs = tiny_inputs(model)
    with torch.no_grad():
        model.set_active_adapters("a")
        only_a = model(**inputs).last_hidden_state
        model.set_active_adapters(ac.MultiTask("a", "b"))
        for bad in ({"task_ids": [0, 7]}, {}):
            with pytest.raises(ValueError, match="task_ids"):
                model(**inputs, **bad)
            assert forward_module._calls() == [] and current_context() is None
        with adapters.AdapterSetup("a"):
            assert torch.equal(model(**inputs).last_hidden_state, only_a)
        assert model.active_adapters == ac.MultiTask("a", "b")
        # an AdapterSetup swapped in for the call is swapped out again when the call fails
        model.set_active_adapters("a")
        for bad_ids in (None, [0, 7]):
            with adapters.AdapterSetup(ac.MultiTask("a", "b"), task_ids=bad_ids), \
                    pytest.raises(ValueError, match="task_ids"):
                model(**inputs)
        assert model.active_adapters == ac.Stack("a")
        assert torch.equal(model(**inputs).last_hidden_state, only_a)
