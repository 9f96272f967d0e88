"""The conformance suite: every installed method on every architecture behaves like an adapter should.

For each installed config string and architecture (tiny random models from ``adapters.testing``):

* add -> outputs change (every adapter parameter is first perturbed with seeded noise, so methods
  whose adapters start as the identity -- LoRA's zero ``B``, IA3's ones -- really act),
* deactivate -> outputs equal the base model exactly,
* save -> load into a fresh identical model -> bit-identical outputs,
* merge (when the method can merge) -> equal within 1e-5; reset -> base weights exact; a method that
  cannot merge refuses and changes nothing,
* delete -> state-dict keys and module types back to the original,
* train a few SGD steps -> only adapter weights move,
* ``model.to(torch.float64)`` -> the forward pass works and agrees with float32,
* ``adapter_summary`` counts equal the real number of parameters the adapter added.

Config strings whose plugin is not installed are skipped (slim installs are tested in their own nox
sessions). The core architectures must support every method; for the extra ones a method may refuse
with a clear ``AdapterError`` that leaves the model unchanged.
"""

from __future__ import annotations

import pytest
import torch

import adapters
from adapters.errors import AdapterError
from adapters.plugins import registry
from adapters.testing import tiny_inputs, tiny_model

METHODS = ["lora", "ia3", "dora", "seq_bn", "par_bn", "double_seq_bn", "loreft", "vera"]
CORE_ARCHS = ["qwen3", "llama", "gpt2", "bert", "t5"]
EXTRA_ARCHS = ["phi3", "gpt_neox", "bart"]
ARCHS = CORE_ARCHS + EXTRA_ARCHS


def _installed(config: str) -> bool:
    return registry.has_config_string(config)


CASES = [
    pytest.param(m, a, id=f"{m}-{a}", marks=[] if _installed(m) else [pytest.mark.skip(reason=f"{m}: not installed")])
    for m in METHODS
    for a in ARCHS
]


def _build(arch: str):
    model = tiny_model(arch, "base")
    return model


def _forward(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)[0]


@pytest.fixture(scope="module")
def base_outputs():
    """Inputs and base outputs per architecture, computed once per module."""
    cache: dict[str, tuple[dict, torch.Tensor]] = {}

    def get(arch: str):
        if arch not in cache:
            model = _build(arch)
            inputs = tiny_inputs(model, batch=2, seq=8)
            cache[arch] = (inputs, _forward(model, inputs))
        return cache[arch]

    return get


def _perturb(model, name: str, seed: int = 0, std: float = 0.1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model._adapters_state.adapter_parameters(name):
            if p.is_floating_point():
                p.add_((std * torch.randn(p.shape, generator=gen)).to(p.dtype))


def _unique_count(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _add(model, method: str, arch: str, name: str = "x") -> bool:
    """Add adapter ``name``; for extra architectures a clean refusal is accepted (returns False)."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(n, type(m)) for n, m in model.named_modules()]
    try:
        model.add_adapter(name, config=method)
    except AdapterError:
        if arch in CORE_ARCHS:
            raise
        assert [(n, type(m)) for n, m in model.named_modules()] == modules
        assert list(model.state_dict()) == list(before)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        return False
    return True


@pytest.mark.parametrize(("method", "arch"), CASES)
def test_lifecycle(method, arch, base_outputs, tmp_path):
    inputs, base = base_outputs(arch)
    model = adapters.init(_build(arch))
    assert torch.equal(_forward(model, inputs), base)
    keys = list(model.state_dict())
    module_types = [(n, type(m)) for n, m in model.named_modules()]
    if not _add(model, method, arch):
        return
    _perturb(model, "x")
    # added but not active: the base model, exactly
    assert torch.equal(_forward(model, inputs), base)
    # base state-dict keys keep their names and order
    adapter_ids = {id(p) for p in model._adapters_state.adapter_parameters("x")}
    base_keys = [k for k, v in model.state_dict(keep_vars=True).items() if id(v) not in adapter_ids]
    assert [k for k in base_keys if k in keys] == keys
    # activation leaves the module tree alone (fast-path caches are not submodules)
    added_keys = list(model.state_dict())
    added_modules = [n for n, _ in model.named_modules()]
    model.set_active_adapters("x")
    assert list(model.state_dict()) == added_keys
    assert [n for n, _ in model.named_modules()] == added_modules
    # active: outputs change
    out = _forward(model, inputs)
    assert out.shape == base.shape
    assert not torch.equal(out, base), f"{method} on {arch}: the active adapter does not change the outputs"
    assert torch.isfinite(out).all()
    # deactivate: exactly the base
    model.set_active_adapters(None)
    assert torch.equal(_forward(model, inputs), base)
    model.set_active_adapters("x")
    # save -> load into a fresh identical model: bit-identical
    model.save_adapter(str(tmp_path / "x"), "x")
    fresh = adapters.init(_build(arch))
    assert fresh.load_adapter(str(tmp_path / "x"), set_active=True) == "x"
    assert torch.equal(_forward(fresh, inputs), out)
    assert fresh.adapters_config["x"].to_dict() == model.adapters_config["x"].to_dict()
    # merge -> equal within 1e-5; reset -> base weights exact
    weights = {k: v.detach().clone() for k, v in model.state_dict().items() if k in set(keys)}
    can_merge = all(m.can_merge for m in model._adapters_state.record("x").methods)
    if can_merge:
        model.merge_adapter("x")
        torch.testing.assert_close(_forward(model, inputs), out, rtol=0, atol=1e-5)
        model.reset_adapter()
        for key, value in weights.items():
            assert torch.equal(model.state_dict()[key], value), key
        assert torch.equal(_forward(model, inputs), out)
    else:
        with pytest.raises(AdapterError, match="merge"):
            model.merge_adapter("x")
        assert torch.equal(_forward(model, inputs), out)
    # delete -> the original model
    model.delete_adapter("x")
    assert list(model.state_dict()) == keys
    assert [(n, type(m)) for n, m in model.named_modules()] == module_types
    assert torch.equal(_forward(model, inputs), base)
    for key, value in weights.items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize(("method", "arch"), CASES)
def test_training_summary_and_dtype(method, arch, base_outputs):
    inputs, base = base_outputs(arch)
    model = adapters.init(_build(arch))
    count_before = _unique_count(model)
    if not _add(model, method, arch):
        return
    model.add_adapter("other", config=method)
    # summary numbers equal the parameters really added
    added = _unique_count(model) - count_before
    rows = {r["name"]: r for r in model.adapter_summary(as_dict=True)}
    assert rows["x"]["#params"] + rows["other"]["#params"] == added
    assert rows["x"]["#params"] == sum(p.numel() for p in model._adapters_state.adapter_parameters("x")) > 0
    assert rows["Full model"]["#params"] == count_before
    assert rows["x"]["%params"] == pytest.approx(100.0 * rows["x"]["#params"] / count_before)
    # train a few steps: only adapter "x" moves
    model.train_adapter("x")
    state = model._adapters_state
    x_ids = {id(p) for p in state.adapter_parameters("x")}
    assert rows["x"]["active"] is False
    assert model.adapter_summary(as_dict=True)[0]["train"] is True
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = {n: id(p) for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(id(p) in x_ids for p in trainable)
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(base.shape, generator=gen)
    for _ in range(3):
        optimizer.zero_grad()
        out = model(**inputs)[0]
        loss = (out.float() - target).pow(2).mean()
        loss.backward()
        optimizer.step()
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert moved, f"{method} on {arch}: training moved no weight"
    assert all(ids[n] in x_ids for n in moved), [n for n in moved if ids[n] not in x_ids]
    # float64: the forward pass works and agrees with float32
    model.eval()
    with torch.no_grad():
        out32 = model(**inputs)[0]
    model.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in state.adapter_parameters("x") if p.is_floating_point())
    with torch.no_grad():
        out64 = model(**inputs)[0]
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), out32, rtol=1e-4, atol=1e-4)
