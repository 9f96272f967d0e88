"""Composition blocks: parsing, nesting rules, refusal of unsupported blocks, routing, and thread safety."""

from __future__ import annotations

import threading

import pytest
import torch

import adapters
import adapters.composition as ac
from adapters.errors import CompositionError
from adapters.testing import tiny_inputs, tiny_model


# ------------------------------------------------------------------------------------------ parsing
def test_parse_composition_normalises_setups():
    assert ac.parse_composition(None) is None
    assert ac.parse_composition("a") == "a"
    assert ac.parse_composition("a, b") == ac.Stack("a", "b")
    assert ac.parse_composition(["a"]) == "a"
    assert ac.parse_composition(["a", "b"]) == ac.Stack("a", "b")
    assert ac.parse_composition(("a", ["b", "c"])) == ac.Stack("a", ac.Stack("b", "c"))
    block = ac.Stack("a", ac.Fuse("b", "c"))
    assert ac.parse_composition(block) is block
    assert block.flatten() == ["a", "b", "c"]
    assert ac.Fuse("b", "c").fusion_name == "b,c"
    assert ac.Fuse("b", "c", name="f").fusion_name == "f"
    assert ac.Stack("a", "b") != ac.Parallel("a", "b")
    assert hash(ac.Stack("a", "b")) == hash(ac.Stack("a", "b"))
    assert repr(ac.Split("a", "b", splits=[3])) == "Split('a', 'b', splits=[3, -1])"
    with pytest.raises(CompositionError):
        ac.parse_composition(" , ")
    with pytest.raises(CompositionError):
        ac.parse_composition(42)
    with pytest.raises(CompositionError):
        ac.Stack()
    with pytest.raises(CompositionError):
        ac.Stack("a", 3)


def test_block_arguments():
    assert ac.Average("a", "b", weights=[1, 3]).weights == [0.25, 0.75]
    assert ac.Average("a", "b").weights == [0.5, 0.5]
    assert ac.Average("a", "b", weights=[2, 2], normalize_weights=False).weights == [2.0, 2.0]
    with pytest.raises(CompositionError, match="sum to 0"):
        ac.Average("a", "b", weights=[1, -1])
    with pytest.raises(CompositionError, match="weights"):
        ac.Average("a", "b", weights=[1])
    assert ac.BatchSplit("a", "b", batch_sizes=2).batch_sizes == [2, 2]
    with pytest.raises(CompositionError):
        ac.BatchSplit("a", "b", batch_sizes=[1])
    with pytest.raises(CompositionError):
        ac.BatchSplit("a", "b", batch_sizes=[1, -1])
    assert ac.Split("a", "b", splits=[2, 3]).splits == [2, 3]
    with pytest.raises(CompositionError):
        ac.Split("a", "b", "c", splits=[1])


@pytest.mark.parametrize(
    "setup",
    [
        ac.Stack("a", ac.MultiTask("b", "c")),
        ac.Stack("a", ac.Parallel("b", "c")),
        ac.Fuse("a", ac.Fuse("b", "c")),
        ac.Fuse("a", ac.Split("b", "c", splits=[1])),
        ac.Average("a", ac.Fuse("b", "c")),
        ac.MultiTask("a", ac.BatchSplit("b", "c", batch_sizes=[1, 1])),
        ac.BatchSplit("a", ac.Parallel("b", "c"), batch_sizes=[1, 1]),
    ],
)
def test_nesting_rules_refuse_invalid_setups(setup):
    with pytest.raises(CompositionError) as info:
        ac.parse_composition(setup)
    inner = type(setup.children[1]).__name__
    assert inner in str(info.value)


@pytest.mark.parametrize(
    "setup",
    [
        ac.Stack("a", ac.Fuse("b", "c")),
        ac.Stack("a", ac.Average("b", "c")),
        ac.Parallel("a", ac.Stack("b", "c")),
        ac.MultiTask("a", ac.Average("b", "c")),
        ac.BatchSplit(ac.Split("a", "b", splits=[2]), "c", batch_sizes=[1, 1]),
    ],
)
def test_nesting_rules_accept_valid_setups(setup):
    assert ac.parse_composition(setup) is setup


# ------------------------------------------------------------------------------------------ on a model
@pytest.fixture(scope="module")
def trio(toy):
    """A qwen3 model with three randomised test adapters, and reference outputs per adapter."""
    model = adapters.init(tiny_model("qwen3", "causal_lm"))
    inputs = tiny_inputs(model, batch=4)
    refs = {}
    for seed, name in enumerate(("a", "b", "c")):
        model.add_adapter(name, config=toy.NAME)
        toy.randomize(model, name, seed=seed + 1)
    for name in ("a", "b", "c"):
        model.set_active_adapters(name)
        with torch.no_grad():
            refs[name] = model(**inputs).logits
    model.set_active_adapters(None)
    with torch.no_grad():
        refs[None] = model(**inputs).logits
    return model, inputs, refs


def _out(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


@pytest.mark.parametrize(
    ("setup", "block"),
    [(ac.Parallel("a", "b"), "Parallel"), (ac.Split("a", "b", splits=[3]), "Split"),
     (ac.Stack("a", ac.Split("b", "c", splits=[2])), "Split")],
)
def test_unsupported_block_is_refused_at_activation_naming_method_and_block(toy, trio, setup, block):
    model, inputs, refs = trio
    before = toy.snapshot(model)
    with pytest.raises(CompositionError) as info:
        model.set_active_adapters(setup)
    message = str(info.value)
    assert toy.NAME in message and block in message and "supports" in message
    toy.assert_unchanged(model, before)
    with pytest.raises(CompositionError, match=block), adapters.AdapterSetup(setup):
        _out(model, inputs)
    assert torch.equal(_out(model, inputs), refs[None])


def test_fuse_is_refused_for_a_method_without_fusion(toy, trio):
    model, _, _ = trio
    with pytest.raises(CompositionError, match=f"'{toy.NAME}'.*Fuse block"):
        model.set_active_adapters(ac.Fuse("a", "b"))


def test_batch_split_routes_rows(trio):
    model, inputs, refs = trio
    model.set_active_adapters(ac.BatchSplit("a", "b", batch_sizes=[1, 3]))
    out = _out(model, inputs)
    model.set_active_adapters(None)
    torch.testing.assert_close(out[:1], refs["a"][:1], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1:], refs["b"][1:], rtol=0, atol=1e-6)


def test_average_of_the_same_adapter_equals_it(trio):
    model, inputs, refs = trio
    model.set_active_adapters(ac.Average("a", "a"))
    out = _out(model, inputs)
    model.set_active_adapters(None)
    torch.testing.assert_close(out, refs["a"], rtol=0, atol=1e-6)


def test_multitask_routes_rows_by_task_ids(trio):
    model, inputs, refs = trio
    model.set_active_adapters(ac.MultiTask("a", "b", "c"))
    with pytest.raises(ValueError, match="task_ids"):
        _out(model, inputs)
    out = _out(model, inputs, task_ids=[2, 0, 1, 0])
    by_name = _out(model, inputs, task_ids=["c", "a", "b", "a"])
    model.set_active_adapters(None)
    assert torch.equal(out, by_name)
    for row, name in enumerate(["c", "a", "b", "a"]):
        torch.testing.assert_close(out[row], refs[name][row], rtol=0, atol=1e-6)
    # task_ids are accepted (and ignored) without a MultiTask setup
    assert torch.equal(_out(model, inputs, task_ids=[0, 1, 2, 0]), refs[None])


def test_adapter_setup_with_task_ids(trio):
    model, inputs, refs = trio
    with adapters.AdapterSetup(ac.MultiTask("a", "b"), task_ids=[1, 1, 0, 0]):
        out = _out(model, inputs)
    torch.testing.assert_close(out[:2], refs["b"][:2], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[2:], refs["a"][2:], rtol=0, atol=1e-6)
    assert model.active_adapters is None


def test_failed_forward_inside_a_setup_restores_the_model(trio):
    model, inputs, refs = trio
    model.set_active_adapters("c")
    with pytest.raises(ValueError, match="task_ids"), adapters.AdapterSetup(ac.MultiTask("a", "b")):
        _out(model, inputs)
    assert model.active_adapters == ac.Stack("c")
    assert torch.equal(_out(model, inputs), refs["c"])
    model.set_active_adapters(None)
    assert torch.equal(_out(model, inputs), refs[None])


def test_forward_context_is_per_thread(toy):
    """Two threads run MultiTask forward passes on two models at once; each keeps its own routing."""
    models, inputs, expected = [], [], []
    for model_type, seed in (("qwen3", 0), ("gpt2", 1)):
        model = adapters.init(tiny_model(model_type, "causal_lm"))
        x = tiny_inputs(model, batch=4, seed=seed)
        for i, name in enumerate(("p", "q")):
            model.add_adapter(name, config=toy.NAME)
            toy.randomize(model, name, seed=10 * seed + i)
        model.set_active_adapters(ac.MultiTask("p", "q"))
        task_ids = [[0, 1, 1, 0], [1, 0, 0, 1]][seed]
        with torch.no_grad():
            ref = model(**x, task_ids=task_ids).logits
        models.append(model)
        inputs.append((x, task_ids))
        expected.append(ref)
    # sanity: the routing matters (a different task_ids gives a different output)
    with torch.no_grad():
        assert not torch.equal(models[0](**inputs[0][0], task_ids=[1, 0, 0, 1]).logits, expected[0])

    barrier = threading.Barrier(2)
    errors: list[BaseException] = []
    results: list[list[torch.Tensor]] = [[], []]

    def worker(i: int) -> None:
        try:
            x, task_ids = inputs[i]
            barrier.wait()
            for _ in range(15):
                with torch.no_grad():
                    results[i].append(models[i](**x, task_ids=task_ids).logits)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(2):
        assert len(results[i]) == 15
        for out in results[i]:
            assert torch.equal(out, expected[i])
