"""What you train is what you save: every method x tiny architectures (tied and untied LM heads,
classifier heads, trained embeddings).

* after ``train_adapter`` the trainable parameters are exactly the adapters of the setup, the task
  heads outside the base model (never the output embeddings) and, when asked, the input embeddings;
  training moves exactly those;
* adding or loading an adapter while another trains leaves the new one frozen;
* ``save_adapter`` with its defaults, then ``load_adapter`` into a freshly built model, reproduces the
  trained model's outputs bit for bit on CPU; a trainable weight it cannot save is refused by name.
"""

from __future__ import annotations

import pytest
import torch

import adapters
from adapters.errors import AdapterError
from adapters.testing import tiny_inputs, tiny_model

METHODS = ["lora", "ia3", "dora", "seq_bn", "par_bn", "loreft", "vera"]
MODELS = [("qwen3", "causal_lm"), ("gpt2", "causal_lm"), ("bert", "seq_cls")]  # untied, tied, classifier


def _fresh(arch: str, task: str):
    torch.manual_seed(0)
    return adapters.init(tiny_model(arch, task))


def _expected_trainable(model, names: set[str], embeddings: bool) -> set[int]:
    state = model._adapters_state
    expected = {id(p) for n in names for p in state.adapter_parameters(n)}
    base = {id(p) for p in state.points.base_model.parameters()}
    adapters_ = {id(p) for n in state.adapters for p in state.adapter_parameters(n)}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    output_ids = {id(p) for p in output.parameters()} if output is not None else set()
    expected |= {id(p) for p in model.parameters() if id(p) not in base | adapters_ | output_ids}
    if embeddings:
        expected |= {id(p) for p in state.points.embeddings.module.parameters()}
    return expected


def _train(model, inputs, steps: int = 3) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        out = model(**inputs)
        out[0].float().square().mean().backward()
        opt.step()


@pytest.mark.parametrize("arch, task", MODELS, ids=[f"{a}-{t}" for a, t in MODELS])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("train_embeddings", [False, True], ids=["", "embeddings"])
def test_train_then_save_and_reload_reproduces_the_trained_model(method, arch, task, train_embeddings, tmp_path):
    model = _fresh(arch, task)
    inputs = tiny_inputs(model, batch=2, seq=6)
    model.add_adapter("a", config=method)
    model.train_adapter("a", train_embeddings=train_embeddings)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == _expected_trainable(model, {"a"}, train_embeddings)
    model.add_adapter("late", config=method)  # added during training: frozen
    assert not any(p.requires_grad for p in model._adapters_state.adapter_parameters("late"))
    model.delete_adapter("late")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, inputs)
    moved = {id(p) for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= trainable
    model.eval()
    with torch.no_grad():
        trained = model(**inputs)[0]
    model.save_adapter(str(tmp_path), "a")
    fresh = _fresh(arch, task)
    fresh.load_adapter(str(tmp_path), set_active=True)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(**inputs)[0], trained)


@pytest.mark.parametrize("method", METHODS)
def test_loading_an_adapter_while_another_trains_leaves_it_frozen(method, tmp_path):
    donor = _fresh("qwen3", "base")
    donor.add_adapter("b", config=method)
    donor.train_adapter("b")
    donor.save_adapter(str(tmp_path), "b")
    model = _fresh("qwen3", "base")
    model.add_adapter("a", config=method)
    model.train_adapter("a")
    model.load_adapter(str(tmp_path))
    assert not any(p.requires_grad for p in model._adapters_state.adapter_parameters("b"))
    assert all(p.requires_grad for p in model._adapters_state.adapter_parameters("a"))
    summary = {row["name"]: row for row in model.adapter_summary(as_dict=True)}
    assert summary["a"]["train"] and not summary["b"]["train"] and not summary["Full model"]["train"]


def test_output_embeddings_are_frozen_and_not_saved(tmp_path):
    model = _fresh("qwen3", "causal_lm")
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # untied
    model.add_adapter("a", config="lora")
    model.train_adapter("a")
    assert not model.lm_head.weight.requires_grad
    model.save_adapter(str(tmp_path), "a")
    assert not (tmp_path / "head.safetensors").exists()  # nothing trainable outside the base model


def test_save_refuses_a_trainable_weight_it_would_drop(tmp_path):
    model = _fresh("qwen3", "causal_lm")
    model.add_adapter("a", config="lora")
    model.train_adapter("a")
    model.model.norm.weight.requires_grad_(True)
    with pytest.raises(AdapterError, match=r"norm\.weight"):
        model.save_adapter(str(tmp_path), "a")
    assert not any(tmp_path.iterdir())
    model.model.norm.weight.requires_grad_(False)
    model.save_adapter(str(tmp_path), "a")


def test_model_api_calls_leave_the_setup_a_user_expects():
    model = _fresh("qwen3", "base")
    for name in ("a", "b", "c"):
        model.add_adapter(name, config="lora")
    model.set_active_adapters(adapters.Stack("a", "b"))
    model.add_adapter("a", config="lora[r=4]", overwrite_ok=True)  # replacing an active adapter keeps it active
    assert model.active_adapters == adapters.Stack("a", "b")
    model.delete_adapter("b")  # deleting one adapter of a Stack keeps the rest active
    assert model.active_adapters == adapters.Stack("a")
    model.set_active_adapters(adapters.Parallel("a", "c"))
    model.delete_adapter("c")
    assert model.active_adapters is None


@pytest.mark.parametrize("method", ["lora", "seq_bn", "loreft", "vera"])
def test_adapters_on_a_model_built_without_memory(method):
    """Built on the meta device, adapters added there, then materialised (``to_empty``) and loaded:
    the outputs of the model built normally."""
    import transformers

    real = _fresh("qwen3", "causal_lm")
    real.add_adapter("a", config=method, set_active=True)
    real.eval()
    inputs = tiny_inputs(real, batch=2, seq=6)
    with torch.no_grad():
        expected = real(**inputs).logits
    with torch.device("meta"):
        model = adapters.init(transformers.Qwen3ForCausalLM(real.config))
        model.add_adapter("a", config=method, set_active=True)
    model.to_empty(device="cpu")
    model.load_state_dict(real.state_dict(), strict=True)
    for name, buffer in real.named_buffers():  # non-persistent buffers (rotary frequencies) are not in it
        model.get_buffer(name).copy_(buffer)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)


def test_without_train_adapter_the_lm_head_is_not_saved(tmp_path):
    model = _fresh("qwen3", "causal_lm")
    model.add_adapter("a", config="lora")
    with pytest.warns(UserWarning, match="not saved"):
        model.save_adapter(str(tmp_path), "a")
    assert not (tmp_path / "head.safetensors").exists()
