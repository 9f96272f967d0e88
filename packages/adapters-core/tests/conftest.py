"""Shared fixtures of core's tests: an in-process test method plugin and model snapshots.

The test method (``core_test_scale``) is a learned per-channel scaling of every layer's FFN output
projection: ``y = s ⊙ (Wx + b)`` with ``s`` initialised to ones. It uses only core's public plugin
API, supports a limited set of composition blocks (so refusals can be tested) and can merge.
It is registered once, in-process, with the global registry (no entry point, no installed package).

``--import-mode=importlib`` means test modules cannot import this file; they get its objects through
the ``toy`` fixture.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

import adapters
from adapters.errors import AdapterError
from adapters.linear import AdapterLinear
from adapters.method import AdapterConfig, AdapterMethod, AttachSite

TOY_NAME = "core_test_scale"


@dataclasses.dataclass
class ToyScaleConfig(AdapterConfig):
    """Per-channel scaling of the FFN output projection.

    :param init_scale: initial value of every scale entry.
    :param fail_at_layer: raise while attaching at this layer index (tests roll-back of a failed add).
    :param leave_out: layer indices to skip.
    """

    method: ClassVar[str] = TOY_NAME
    init_scale: float = 1.0
    fail_at_layer: int | None = None
    leave_out: list[int] = dataclasses.field(default_factory=list)


class _ToyAdapter(nn.Module):
    def __init__(self, width: int, init: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((width,), float(init), dtype=dtype, device=device))


class ToyScaleLayer(AdapterLinear):
    """Wraps a linear projection (``nn.Linear`` or GPT-2 ``Conv1D``), sharing its parameters."""

    def add_adapter(self, name: str, config: ToyScaleConfig, site: AttachSite) -> None:
        weight = self.weight
        self.adapters[name] = _ToyAdapter(self.out_features, config.init_scale, site.dtype_for(weight, config),
                                          weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run_plan(self.plan, (self.base_forward(x),))

    def leaf(self, name: str, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return inputs[0] * self.adapters[name].scale

    def merge_adapter(self, name: str) -> None:
        self.begin_merge()
        s = self.adapters[name].scale.detach()
        with torch.no_grad():
            if not self.is_conv1d:
                self.weight.mul_(s.unsqueeze(1))
            else:  # Conv1D: weight is in x out
                self.weight.mul_(s.unsqueeze(0))
            if self.bias is not None:
                self.bias.mul_(s)


class ToyScaleMethod(AdapterMethod):
    """The test method: scaling of ``layer_output_proj``; Stack, BatchSplit, Average, MultiTask only."""

    name: ClassVar[str] = TOY_NAME
    config_classes = (ToyScaleConfig,)
    presets = {TOY_NAME: ToyScaleConfig}
    supported_blocks = frozenset({"Stack", "BatchSplit", "Average", "MultiTask"})
    hook_points = frozenset({"layer_output_proj"})
    can_merge = True

    def validate(self, config: ToyScaleConfig, points: Any) -> None:
        if not points.interface.layer_output_proj:
            raise AdapterError(f"{TOY_NAME} needs layer_output_proj in the interface.")

    def attach(self, site: AttachSite, name: str, config: ToyScaleConfig) -> None:
        for lp in site.points.layers:
            if lp.index in config.leave_out or lp.output is None:
                continue
            if config.fail_at_layer is not None and lp.index == config.fail_at_layer:
                raise AdapterError(f"{TOY_NAME}: asked to fail at layer {lp.index}")
            point = lp.output
            layer = site.replace(point, ToyScaleLayer, lambda original, p=point: ToyScaleLayer(original, p.location))
            layer.add_adapter(name, config, site)


class ToyPlugin:
    """The plugin object registered in-process (a class with a ``@hookimpl`` method)."""

    @adapters.hookimpl
    def adapters_register_methods(self, register: Callable) -> None:
        register(ToyScaleMethod())


_PLUGIN = ToyPlugin()


def _register() -> None:
    adapters.register_plugin(_PLUGIN, distribution="core-tests")


def randomize_adapter(model: nn.Module, name: str, seed: int = 0, std: float = 0.3) -> None:
    """Set every parameter of adapter ``name`` to ``1 + std·N(0, 1)`` (seeded, global RNG untouched)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model._adapters_state.adapter_parameters(name):
            p.copy_((1.0 + std * torch.randn(p.shape, generator=gen)).to(p.dtype))


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything a failed operation must leave as it was."""
    state = model._adapters_state
    return {
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modules": [(n, type(m)) for n, m in model.named_modules()],
        "adapters": list(state.adapters),
        "active": state.active,
        "merged": list(state.merged),
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    """Assert ``model`` matches a :func:`snapshot` exactly."""
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["adapters"] == before["adapters"]
    assert after["active"] == before["active"]
    assert after["merged"] == before["merged"]
    assert after["requires_grad"] == before["requires_grad"]
    assert list(after["state_dict"]) == list(before["state_dict"])
    for key, value in before["state_dict"].items():
        assert torch.equal(after["state_dict"][key], value), key


@pytest.fixture(scope="session")
def toy() -> types.SimpleNamespace:
    """The in-process test method, registered with the global registry, and test helpers."""
    _register()
    return types.SimpleNamespace(
        NAME=TOY_NAME,
        Config=ToyScaleConfig,
        Layer=ToyScaleLayer,
        Method=ToyScaleMethod,
        Plugin=ToyPlugin,
        randomize=randomize_adapter,
        snapshot=snapshot,
        assert_unchanged=assert_unchanged,
    )
