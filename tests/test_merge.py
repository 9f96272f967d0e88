"""Merging is algebra with one rule: merged adapters add to the base weights in merge order.

For every mergeable method on tiny architectures (GQA, fused GPT-2 Conv1D, encoder): several merges
equal the unmerged ``Stack``; ``reset_adapter`` restores the weights bit for bit and the setup that was
active before; the bare base model is refused alike however it is asked for while merged;
``merge_and_unload`` gives a plain transformers model whose ``save_pretrained`` loads in plain
transformers with the merged outputs; ``average_adapter`` honours every argument or refuses it; every
mergeable method compiles with ``fullgraph=True`` after eager use.
"""

from __future__ import annotations

import pytest
import torch

import adapters
import adapters.composition as ac
from adapters.errors import AdapterError, CompositionError
from adapters.testing import tiny_inputs, tiny_model

MERGEABLE = ["lora", "ia3", "vera", "mtl_lora"]
ARCHS = ["qwen3", "gpt2", "bert"]


def _model(arch: str, method: str, names=("a", "b", "c"), task: str = "base"):
    torch.manual_seed(0)
    model = adapters.init(tiny_model(arch, task))
    for i, name in enumerate(names):
        model.add_adapter(name, config=method)
        gen = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in model._adapters_state.adapter_parameters(name):
                p.add_((0.1 * torch.randn(p.shape, generator=gen)).to(p.dtype))
    model.eval()
    return model


def _out(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", MERGEABLE)
def test_merges_add_up_and_reset_restores_everything(method, arch) -> None:
    model = _model(arch, method)
    inputs = tiny_inputs(model, batch=2, seq=6)
    base_weights = _weights(model)
    model.set_active_adapters("c")
    only_c = _out(model, inputs)
    model.set_active_adapters(ac.Stack("a", "b", "c"))
    stacked = _out(model, inputs)
    model.set_active_adapters("c")
    model.merge_adapter("a")
    model.merge_adapter("b")
    assert model.active_adapters == ac.Stack("a", "b", "c")  # merged first, then what was active
    torch.testing.assert_close(_out(model, inputs), stacked, rtol=1e-4, atol=1e-5)
    summary = {row["name"]: row["merged"] for row in model.adapter_summary(as_dict=True) if row["name"] in "abc"}
    assert summary == {"a": True, "b": True, "c": False}
    for ask in (lambda: model.set_active_adapters(None), lambda: _out_in_setup(model, inputs, None),
                lambda: model.set_active_adapters("c"), lambda: _out_in_setup(model, inputs, "c")):
        with pytest.raises(CompositionError, match="merged"):
            ask()
    model.reset_adapter()
    assert model.active_adapters == ac.Stack("c")
    assert all(torch.equal(v, base_weights[k]) for k, v in model.state_dict().items())
    assert torch.equal(_out(model, inputs), only_c)


def _out_in_setup(model, inputs, setup):
    with adapters.AdapterSetup(setup):
        return _out(model, inputs)


@pytest.mark.parametrize("method", MERGEABLE)
def test_merge_while_another_setup_is_active_then_reset_restores_it(method) -> None:
    model = _model("qwen3", method)
    inputs = tiny_inputs(model, batch=2, seq=6)
    model.set_active_adapters("b")
    only_b = _out(model, inputs)
    model.merge_adapter("a")
    model.reset_adapter()
    assert model.active_adapters == ac.Stack("b")
    assert torch.equal(_out(model, inputs), only_b)
    model.set_active_adapters(ac.Parallel("a", "b"))
    with pytest.raises(CompositionError, match="Parallel"):
        model.merge_adapter("c")
    assert model._adapters_state.merged == []


def test_dora_merges_only_alone() -> None:
    model = _model("qwen3", "dora", names=("a", "b"))
    inputs = tiny_inputs(model, batch=2, seq=6)
    model.set_active_adapters("a")
    unmerged = _out(model, inputs)
    model.merge_adapter("a")
    torch.testing.assert_close(_out(model, inputs), unmerged, rtol=1e-4, atol=1e-5)
    weights = _weights(model)
    with pytest.raises(AdapterError, match="DoRA"):
        model.merge_adapter("b")
    assert model._adapters_state.merged == ["a"]
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())  # nothing changed


@pytest.mark.parametrize("arch, task", [("qwen3", "causal_lm"), ("gpt2", "causal_lm"), ("bert", "seq_cls")])
@pytest.mark.parametrize("method", [*MERGEABLE, "dora"])
def test_merge_and_unload_gives_a_plain_transformers_model(method, arch, task, tmp_path) -> None:
    import transformers

    model = _model(arch, method, names=("a",), task=task)
    original_class = type(model)._adapters_original_class
    original_keys = set(original_class(model.config).state_dict())
    inputs = tiny_inputs(model, batch=2, seq=6)
    model.set_active_adapters("a")
    adapted = _out(model, inputs)
    plain = model.merge_and_unload()
    assert plain is model and type(plain) is original_class
    assert not hasattr(plain, "_adapters_state")
    assert set(plain.state_dict()) == original_keys
    for module in plain.modules():
        assert type(module).__module__.startswith(("torch.", "transformers.")), type(module)
    assert not plain._forward_pre_hooks and not plain._forward_hooks
    torch.testing.assert_close(_out(plain, inputs), adapted, rtol=1e-4, atol=1e-5)
    plain.save_pretrained(str(tmp_path))
    reloaded = getattr(transformers, original_class.__name__).from_pretrained(str(tmp_path)).eval()
    torch.testing.assert_close(_out(reloaded, inputs), adapted, rtol=1e-4, atol=1e-5)


def test_merge_and_unload_refuses_to_drop_adapters() -> None:
    model = _model("qwen3", "lora", names=("a", "b"))
    model.add_adapter("bn", config="seq_bn")
    model.set_active_adapters("a")
    with pytest.raises(AdapterError, match=r"drop adapters \['b', 'bn'\]"):
        model.merge_and_unload()
    assert model._adapters_state.merged == [] and set(model._adapters_state.adapters) == {"a", "b", "bn"}
    with pytest.raises(AdapterError, match="cannot be merged"):
        model.merge_and_unload(["a", "b", "bn"])


def test_average_adapter_honours_every_argument() -> None:
    model = _model("qwen3", "lora[r=4]", names=("a", "b"))
    inputs = tiny_inputs(model, batch=2, seq=6)
    state = model._adapters_state
    model.average_adapter("svd2", ["a", "b"], combine_strategy="lora_delta_w_svd", svd_rank=2)
    assert model.adapters_config["svd2"].r == 2
    layer = state.layers("svd2")[0]
    assert layer.adapters["svd2"].lora_A.shape[0] == 2
    mixed = 0.5 * layer.adapters["a"].delta_weight() + 0.5 * layer.adapters["b"].delta_weight()
    u, s, vh = torch.linalg.svd(mixed)
    best = (u[:, :2] * s[:2]) @ vh[:2]
    torch.testing.assert_close(layer.adapters["svd2"].delta_weight(), best, rtol=1e-4, atol=1e-6)
    # a negative weight negates only B: adding "a" and subtracting it again is the base model
    model.average_adapter("none", ["a", "a"], weights=[1.0, -1.0], normalize_weights=False,
                          combine_strategy="lora_linear_only_negate_b")
    for layer in state.layers("none"):
        assert torch.equal(layer.adapters["none"].lora_B, torch.zeros_like(layer.adapters["none"].lora_B))
    model.set_active_adapters("none")
    with adapters.AdapterSetup(None):
        base = _out(model, inputs)
    assert torch.equal(_out(model, inputs), base)
    model.average_adapter("neg", ["a", "b"], weights=[1.0, -0.5], normalize_weights=False,
                          combine_strategy="lora_linear_only_negate_b")
    unit = state.layers("neg")[0].adapters
    torch.testing.assert_close(unit["neg"].lora_A, unit["a"].lora_A + 0.5 * unit["b"].lora_A)
    torch.testing.assert_close(unit["neg"].lora_B, unit["a"].lora_B - 0.5 * unit["b"].lora_B)
    for bad in ({"combine_strategy": "linear", "svd_rank": 2}, {"combine_strategy": "lora_delta_w_svd", "rank": 2},
                {"combine_strategy": "nonsense"}):
        with pytest.raises(AdapterError):
            model.average_adapter("bad", ["a", "b"], **bad)
        assert "bad" not in state.adapters


@pytest.mark.parametrize("method", [*MERGEABLE, "dora"])
def test_every_mergeable_method_compiles_fullgraph_after_eager_use(method) -> None:
    torch._dynamo.reset()
    model = _model("qwen3", method, names=("a",))
    model.set_active_adapters("a")
    inputs = tiny_inputs(model, batch=2, seq=6)
    eager = _out(model, inputs)  # eager first: caches (DoRA's weight norms) must not break the graph
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs)[0], eager, rtol=1e-5, atol=1e-6)


def test_a_merged_adapter_cannot_be_trained_and_save_pretrained_says_what_it_writes(tmp_path) -> None:
    model = _model("qwen3", "lora", names=("a",), task="causal_lm")
    model.set_active_adapters("a")
    model.merge_adapter("a")
    with pytest.raises(AdapterError, match="reset_adapter"):
        model.train_adapter("a")
    with pytest.warns(UserWarning, match="merge_and_unload"):
        model.save_pretrained(str(tmp_path / "with_adapter"))
    with pytest.raises(AdapterError, match=r"bottleneck adapters\); \['a', 'b'\] use \['lora'\]"):
        model.add_adapter("b", config="lora")
        model.add_adapter_fusion(["a", "b"])
