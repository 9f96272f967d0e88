"""Composition of prompt and prefix adapters: Stack, row routing where the lengths allow, clear refusals."""

from __future__ import annotations

import pytest
import torch

import adapters
import adapters.composition as ac
from adapters import AdapterError
from adapters.errors import CompositionError
from adapters.testing import tiny_inputs
from adapters.testing.conformance import perturb

CONFIGS = {"prompt": "prompt_tuning[prompt_length={n}]",
           "prefix": "prefix_tuning[prefix_length={n}, bottleneck_size=8]"}


def _model(helpers, kind: str, lengths: dict[str, int]):
    names = list(lengths)
    model = helpers.prepared("qwen3", "base", CONFIGS[kind].format(n=lengths[names[0]]), name=names[0])
    for i, name in enumerate(names[1:], start=1):
        model.add_adapter(name, config=CONFIGS[kind].format(n=lengths[name]))
        perturb(model, name, seed=i, std=0.5)
    return model


def _run(model, setup, inputs, **kw):
    with adapters.AdapterSetup(setup), torch.no_grad():
        return model(**inputs, **kw).last_hidden_state


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_batch_split_and_multi_task_give_each_row_its_adapter(kind, helpers):
    model = _model(helpers, kind, {"a": 3, "b": 3})
    inputs = tiny_inputs(model, batch=3)
    alone = {n: _run(model, n, inputs) for n in ("a", "b")}
    split = _run(model, ac.BatchSplit("a", "b", batch_sizes=[1, 2]), inputs)
    torch.testing.assert_close(split, torch.cat([alone["a"][:1], alone["b"][1:]]), rtol=0, atol=1e-6)
    tasks = _run(model, ac.MultiTask("a", "b"), inputs, task_ids=["b", "a", "b"])
    torch.testing.assert_close(tasks, torch.stack([alone["b"][0], alone["a"][1], alone["b"][2]]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_parallel_runs_each_adapter_on_a_copy_of_the_batch(kind, helpers):
    model = _model(helpers, kind, {"a": 2, "b": 2})
    inputs = tiny_inputs(model)
    out = _run(model, ac.Parallel("a", "b"), inputs)
    torch.testing.assert_close(out, torch.cat([_run(model, "a", inputs), _run(model, "b", inputs)]), rtol=0,
                               atol=1e-6)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_rows_of_different_lengths_are_refused_naming_the_block(kind, helpers):
    model = _model(helpers, kind, {"a": 2, "b": 4})
    inputs = tiny_inputs(model)
    with pytest.raises(AdapterError, match=r"BatchSplit: its rows would get .*a: 2, b: 4"):
        _run(model, ac.BatchSplit("a", "b", batch_sizes=[1, 1]), inputs)
    with pytest.raises(AdapterError, match="MultiTask"):
        _run(model, ac.MultiTask("a", "b"), inputs, task_ids=[0, 1])


@pytest.mark.parametrize("block", [ac.Average("a", "b"), ac.Fuse("a", "b"), ac.Split("a", "b", splits=[4, 4])])
def test_blocks_without_a_meaning_for_prompts_are_refused_by_name(block, helpers):
    model = _model(helpers, "prefix", {"a": 2, "b": 2})
    with pytest.raises(CompositionError, match=type(block).__name__):
        model.set_active_adapters(block)


def test_stack_of_two_prefixes_concatenates_them(helpers):
    """``Stack(a, b)`` of prefixes = one prefix made of ``a``'s then ``b``'s keys (a flat adapter holding both)."""
    model = _model(helpers, "prefix", {"a": 2, "b": 3})
    inputs = tiny_inputs(model)
    stacked = _run(model, ac.Stack("a", "b"), inputs)
    model.add_adapter("ab", config="prefix_tuning_flat[prefix_length=5]")
    with torch.no_grad():
        for layer in model._adapters_state.layers("ab"):
            kv = torch.cat([layer.adapters["a"].kv(), layer.adapters["b"].kv()], dim=2)  # 2 × H × 5 × D
            pool = layer.adapters["ab"].pool.module
            block = kv.permute(2, 0, 1, 3).reshape(5, -1)
            pool.control_trans[:, layer.adapters["ab"].index * pool.width:][:, :pool.width] = block
    torch.testing.assert_close(stacked, _run(model, "ab", inputs), rtol=0, atol=1e-6)
    assert not torch.allclose(stacked, _run(model, "a", inputs), atol=1e-3)


def test_average_adapter_averages_prompts_and_refuses_prefix_pools(helpers):
    model = _model(helpers, "prompt", {"a": 2, "b": 2})
    model.average_adapter("avg", ["a", "b"], weights=[0.25, 0.75])
    layer = model._adapters_state.layers("a")[0]
    expected = 0.25 * layer.adapters["a"].embedding + 0.75 * layer.adapters["b"].embedding
    torch.testing.assert_close(layer.adapters["avg"].embedding, expected.detach())
    model = _model(helpers, "prefix", {"a": 2, "b": 2})
    with pytest.raises(AdapterError, match="average_adapter is not supported for prefix tuning"):
        model.average_adapter("avg", ["a", "b"])
    assert "avg" not in model.adapters_config
