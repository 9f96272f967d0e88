"""The conformance checks: what every adapter method must do, on any architecture, for any plugin.

A plugin package runs them on its own method (the example third-party plugin does)::

    from adapters.testing.conformance import check_method

    def test_my_method_conforms(tmp_path):
        check_method("my_method", "qwen3", tmp_path)

:func:`check_method` runs, on a tiny random model of ``arch`` (every adapter parameter first
perturbed with seeded noise, so adapters that start as the identity really act):

* :func:`check_lifecycle`: add -> inactive is exactly the base; active changes the outputs; base
  state-dict keys and module tree unchanged by activation; deactivate -> exactly the base;
  save -> load into a fresh model -> bit-identical; merge -> equal within 1e-5 and reset -> base weights
  exact (or a clear refusal for methods that cannot merge); delete -> the original model;
* :func:`check_training`: ``adapter_summary`` counts the parameters really added; ``train_adapter``
  trains exactly the adapter and a few SGD steps move only its weights; float64 agrees with float32;
* :func:`check_call_state`: two threads in their own ``AdapterSetup`` get single-threaded results;
  ``nn.DataParallel``-style replicas (emulated on CPU) compute with their own weights; deep copies
  and pickles compute the same.

``required=False`` accepts a clean :class:`~adapters.errors.AdapterError` refusal at ``add_adapter``
(the model then must be unchanged) for architectures a method does not support.
"""

from __future__ import annotations

import copy
import os
import pickle
import threading
from typing import Any

import torch

from ..errors import AdapterError
from . import replicate_on_cpu, tiny_inputs, tiny_model

__all__ = ["check_method", "check_lifecycle", "check_training", "check_call_state", "perturb"]


def perturb(model: torch.nn.Module, name: str, seed: int = 0, std: float = 0.1) -> None:
    """Add seeded noise to every floating-point parameter of adapter ``name`` (global RNG untouched)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model._adapters_state.adapter_parameters(name):
            if p.is_floating_point():
                p.add_((std * torch.randn(p.shape, generator=gen)).to(p.dtype))


def _model(arch: str) -> torch.nn.Module:
    import adapters

    return adapters.init(tiny_model(arch, "base"))


def _forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)[0]


def _add(model: torch.nn.Module, config: str, name: str, required: bool) -> bool:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(n, type(m)) for n, m in model.named_modules()]
    try:
        model.add_adapter(name, config=config)
    except AdapterError:
        if required:
            raise
        assert [(n, type(m)) for n, m in model.named_modules()] == modules, "a refused add_adapter changed modules"
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "a refused add changed weights"
        return False
    return True


def check_lifecycle(config: str, arch: str, directory: str | os.PathLike, required: bool = True) -> bool:
    """Add, activate, deactivate, save / load, merge / reset, delete (see the module docstring).
    Returns ``False`` when a non-required architecture refused the method cleanly."""

    model = _model(arch)
    inputs = tiny_inputs(model, batch=2, seq=8)
    base = _forward(model, inputs)
    keys = list(model.state_dict())
    module_types = [(n, type(m)) for n, m in model.named_modules()]
    if not _add(model, config, "x", required):
        return False
    perturb(model, "x")
    assert torch.equal(_forward(model, inputs), base), "an inactive adapter changed the outputs"
    adapter_ids = {id(p) for p in model._adapters_state.adapter_parameters("x")}
    base_keys = [k for k, v in model.state_dict(keep_vars=True).items() if id(v) not in adapter_ids]
    assert [k for k in base_keys if k in keys] == keys, "the base model's state-dict keys changed"
    added_keys, added_modules = list(model.state_dict()), [n for n, _ in model.named_modules()]
    model.set_active_adapters("x")
    assert list(model.state_dict()) == added_keys and [n for n, _ in model.named_modules()] == added_modules, \
        "activation changed the module tree"
    out = _forward(model, inputs)
    assert out.shape == base.shape and torch.isfinite(out).all()
    assert not torch.equal(out, base), f"{config} on {arch}: the active adapter does not change the outputs"
    model.set_active_adapters(None)
    assert torch.equal(_forward(model, inputs), base), "deactivated, the model is not exactly the base"
    model.set_active_adapters("x")
    path = os.path.join(os.fspath(directory), f"conformance-{arch}")
    model.save_adapter(path, "x")
    fresh = _model(arch)
    assert fresh.load_adapter(path, set_active=True) == "x"
    assert torch.equal(_forward(fresh, inputs), out), "save -> load does not reproduce the outputs"
    assert fresh.adapters_config["x"].to_dict() == model.adapters_config["x"].to_dict()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items() if k in set(keys)}
    if all(m.can_merge for m in model._adapters_state.record("x").methods):
        model.merge_adapter("x")
        torch.testing.assert_close(_forward(model, inputs), out, rtol=0, atol=1e-5)
        model.reset_adapter()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items()), "reset is not exact"
        assert torch.equal(_forward(model, inputs), out)
    else:
        try:
            model.merge_adapter("x")
        except AdapterError as exc:
            assert "merge" in str(exc)
        else:
            raise AssertionError("a method that cannot merge accepted merge_adapter")
    model.delete_adapter("x")
    assert list(model.state_dict()) == keys and [(n, type(m)) for n, m in model.named_modules()] == module_types
    assert torch.equal(_forward(model, inputs), base), "after delete_adapter the model is not the original"
    return True


def check_training(config: str, arch: str, required: bool = True) -> bool:
    """Summary counts, exact trainability, a few SGD steps, float64 (see the module docstring)."""
    model = _model(arch)
    inputs = tiny_inputs(model, batch=2, seq=8)
    count_before = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    if not _add(model, config, "x", required):
        return False
    model.add_adapter("other", config=config)
    state = model._adapters_state
    added = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) - count_before
    rows = {r["name"]: r for r in model.adapter_summary(as_dict=True)}
    assert rows["x"]["#params"] + rows["other"]["#params"] == added, "adapter_summary miscounts"
    assert rows["x"]["#params"] == sum(p.numel() for p in state.adapter_parameters("x")) > 0
    assert rows["Full model"]["#params"] == count_before
    model.train_adapter("x")
    x_ids = {id(p) for p in state.adapter_parameters("x")}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(id(p) in x_ids for p in trainable), "train_adapter trains more than the adapter"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = {n: id(p) for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    base = _forward(model, inputs)
    target = torch.randn(base.shape, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        optimizer.zero_grad()
        (model(**inputs)[0].float() - target).pow(2).mean().backward()
        optimizer.step()
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert moved, f"{config} on {arch}: training moved no weight"
    assert all(ids[n] in x_ids for n in moved), f"weights outside the adapter moved: {moved}"
    model.eval()
    out32 = _forward(model, inputs)
    model.to(torch.float64)
    out64 = _forward(model, inputs)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), out32, rtol=1e-4, atol=1e-4)
    return True


def check_call_state(config: str, arch: str, required: bool = True) -> bool:
    """Threads, replicas, copies (see the module docstring)."""
    import adapters

    model = _model(arch)
    inputs = tiny_inputs(model, batch=2, seq=8)
    if not _add(model, config, "a", required):
        return False
    model.add_adapter("b", config=config)
    perturb(model, "a", seed=1)
    perturb(model, "b", seed=2)
    model.eval()
    model.set_active_adapters("b")
    expected: dict[Any, torch.Tensor] = {}
    for setup in ("a", "b"):
        with adapters.AdapterSetup(setup):
            expected[setup] = _forward(model, inputs)
    assert not torch.equal(expected["a"], expected["b"])
    wrong: list[str] = []
    barrier = threading.Barrier(2)

    def run(setup: str) -> None:
        barrier.wait()
        for _ in range(5):
            with adapters.AdapterSetup(setup):
                if not torch.equal(_forward(model, inputs), expected[setup]):
                    wrong.append(setup)

    threads = [threading.Thread(target=run, args=(s,)) for s in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong, f"threads ran each other's setups: {wrong}"
    adapter_ids = {id(p) for p in model._adapters_state.adapter_parameters("b")}

    def halve(index: int, original: torch.Tensor, copy_: torch.Tensor) -> torch.Tensor:
        return copy_ * 0.5 if index == 1 and id(original) in adapter_ids else copy_

    with torch.no_grad():
        replicas = replicate_on_cpu(model, 2, transform=halve)
        torch.testing.assert_close(replicas[0](**inputs)[0], expected["b"], rtol=1e-6, atol=1e-6)
        for p in model._adapters_state.adapter_parameters("b"):
            p.mul_(0.5)
        halved = _forward(model, inputs)
        for p in model._adapters_state.adapter_parameters("b"):
            p.mul_(2.0)
        torch.testing.assert_close(replicas[1](**inputs)[0], halved, rtol=1e-6, atol=1e-6,
                                   msg="a replica computed with the original's adapter weights")
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(_forward(clone, inputs), expected["b"]), "a copy computes differently"
    return True


def check_method(config: str, arch: str, directory: str | os.PathLike, required: bool = True) -> bool:
    """Every conformance check of ``config`` (a config string) on tiny ``arch``; ``False`` when a
    non-required architecture refused the method cleanly."""
    if not check_lifecycle(config, arch, directory, required):
        return False
    check_training(config, arch, required)
    check_call_state(config, arch, required)
    return True
