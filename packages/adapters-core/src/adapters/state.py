"""Per-model adapter bookkeeping and activation: the registry of adapters on one model, and the
compiler that turns an active setup into per-layer plans.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from . import composition as ac
from .errors import AdapterError, AdapterNotFoundError, CompositionError
from .frames import install_layer_frames, remove_layer_frames
from .interface import AdapterModelInterface
from .method import AdapterConfig, AdapterLayer, AdapterMethod
from .plan_compile import PlanTable, compile_table, setup_adapter_names
from .points import ModelPoints

__all__ = ["AdapterRecord", "AdapterState", "PlanTable", "TrainingSetup", "SHARED_ATTR"]

#: Attribute of the model root that holds model-level adapter modules (``nn.ModuleDict``).
SHARED_ATTR = "adapters_shared"
_TOKENS = itertools.count()
_NAME_RE = re.compile(r"^[A-Za-z0-9_\-+]+$")


@dataclass
class AdapterRecord:
    """One adapter on a model: its name, config and the methods implementing it."""

    name: str
    config: AdapterConfig
    methods: list[AdapterMethod]

    @property
    def method_names(self) -> list[str]:
        return [m.name for m in self.methods]


@dataclass
class FusionRecord:
    """One AdapterFusion layer set: its name, the fused adapters and the method that owns it."""

    name: str
    adapter_names: list[str]
    method: AdapterMethod
    config: Any = None


@dataclass(frozen=True)
class TrainingSetup:
    """What :meth:`train_adapter` / ``train_adapter_fusion`` made trainable (``state.training``)."""

    adapters: frozenset[str]
    fusions: frozenset[str]
    embeddings: bool


@dataclass
class AdapterState:
    """Everything ``adapters.init`` attaches to a model (``model._adapters_state``).

    Method plugins receive it in the optional :class:`~adapters.method.AdapterMethod` hooks:
    ``state.model``, ``state.points`` (resolved hook points) and :meth:`layers` are public.
    """

    model: nn.Module
    interface: AdapterModelInterface
    points: ModelPoints
    adapters: dict[str, AdapterRecord] = field(default_factory=dict)
    fusions: dict[str, FusionRecord] = field(default_factory=dict)
    active: ac.AdapterCompositionBlock | str | None = None
    #: adapters merged into the base weights, in merge order (see adapters.merging)
    merged: list[str] = field(default_factory=list)
    pre_merge_active: Any = None
    merge_active: Any = None
    hook_handles: list[Any] = field(default_factory=list)
    forward_params: list[str] = field(default_factory=list)
    frame_handles: list[Any] = field(default_factory=list)
    #: whether core's frame hooks are on every layer (a bool: a compiled forward reads it without a graph break)
    frames_installed: bool = False
    default: PlanTable | None = None
    training: TrainingSetup | None = None
    token: int = field(default_factory=lambda: next(_TOKENS))
    _layers: list[AdapterLayer] | None = None
    _plan_cache: dict[Any, PlanTable] = field(default_factory=dict)

    # ------------------------------------------------------------------ lookups
    def layers(self, name: str | None = None) -> list[AdapterLayer]:
        """Every adapter layer in the model, or those hosting adapter ``name``."""
        if self._layers is None:
            self._layers = [m for m in self.model.modules() if isinstance(m, AdapterLayer)]
            for slot, layer in enumerate(self._layers):  # plain ints: replicas and copies keep them
                layer.bind_slot(self.token, slot)
        if name is None:
            return list(self._layers)
        return [layer for layer in self._layers if name in layer.adapters]

    def invalidate(self) -> None:
        """Forget cached layer lists and plans (after layers were added or removed)."""
        self._layers = None
        self._plan_cache.clear()

    def record(self, name: str) -> AdapterRecord:
        """The adapter called ``name``, or a clear error listing the existing ones."""
        if name not in self.adapters:
            have = ", ".join(sorted(self.adapters)) or "none"
            raise AdapterNotFoundError(f"No adapter named '{name}' on this model (adapters: {have}).")
        return self.adapters[name]

    def shared_container(self, create: bool = False) -> nn.ModuleDict | None:
        container = getattr(self.model, SHARED_ATTR, None)
        if container is None and create:
            container = nn.ModuleDict()
            self.model.add_module(SHARED_ATTR, container)
        return container

    def shared_module(self, name: str, key: str, factory: Callable[[], nn.Module], created: list[str]) -> nn.Module:
        """The model-level module ``key`` of adapter ``name`` (created by ``factory`` on first use)."""
        container = self.shared_container(create=True)
        if name not in container:
            container[name] = nn.ModuleDict()
        per_adapter = container[name]
        if key not in per_adapter:
            per_adapter[key] = factory()
            created.append(key)
        return per_adapter[key]

    def remove_modules(self, name: str, layers: list[AdapterLayer]) -> None:
        """Take adapter ``name`` out of ``layers`` and the shared container; layers left empty, and an
        empty shared container, are removed so the module tree is exactly as before the adapter."""
        for layer in layers:
            layer.delete_adapter(name)
            if layer.is_empty():
                layer.detach_from_model()
        container = self.shared_container()
        if container is not None and name in container:
            del container[name]
            if len(container) == 0:
                delattr(self.model, SHARED_ATTR)
        self.invalidate()

    def shared_modules(self, name: str) -> dict[str, nn.Module]:
        """Model-level modules of adapter ``name`` by key."""
        container = self.shared_container()
        if container is None or name not in container:
            return {}
        return dict(container[name].items())

    def adapter_modules(self, name: str) -> Iterator[tuple[str, nn.Module]]:
        """``(location, module)`` for every module that owns parameters of adapter ``name``."""
        for layer in self.layers(name):
            yield layer.location, layer.adapters[name]
        for key, module in self.shared_modules(name).items():
            yield f"shared.{key}", module

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """Every parameter of adapter ``name`` (each once)."""
        seen: dict[int, nn.Parameter] = {}
        for layer in self.layers(name):
            for p in layer.adapter_parameters(name):
                seen.setdefault(id(p), p)
        for module in self.shared_modules(name).values():
            for p in module.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    def owned_parameter_ids(self) -> set[int]:
        """``id`` of every parameter of every adapter and fusion on the model (what is not the base's)."""
        ids = {id(p) for name in self.adapters for p in self.adapter_parameters(name)}
        ids |= {id(p) for fusion in self.fusions for p in self.fusion_parameters(fusion)}
        return ids

    def fusion_parameters(self, fusion_name: str) -> list[nn.Parameter]:
        fusion = self.fusions[fusion_name]
        seen: dict[int, nn.Parameter] = {}
        for module in fusion.method.fusion_modules(self, fusion_name).values():
            for p in module.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    @staticmethod
    def check_name(name: str) -> None:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise AdapterError(
                f"Invalid adapter name {name!r}: use letters, digits, '_', '-' or '+' (no dots, commas or spaces)."
            )
        if hasattr(nn.ModuleDict, name):
            raise AdapterError(
                f"Invalid adapter name {name!r}: it is the name of a torch.nn.Module attribute; choose another name."
            )

    # ------------------------------------------------------------------ activation
    def validate_setup(self, setup: ac.AdapterCompositionBlock | str | None) -> None:
        """Check names, method support for every enclosing block, and the merge rule."""

        def visit(node: ac.AdapterCompositionBlock | str, ancestors: list[type]) -> None:
            if isinstance(node, str):
                record = self.record(node)
                for method in record.methods:
                    for block in ancestors:
                        if block.__name__ not in method.supported_blocks:
                            supported = ", ".join(sorted(method.supported_blocks)) or "none"
                            raise CompositionError(
                                f"Adapter '{node}' uses method '{method.name}', which does not support the "
                                f"{block.__name__} block (it supports: {supported})."
                            )
                return
            for child in node.children:  # children first: a method that cannot Fuse is the clearer error
                visit(child, [*ancestors, type(node)])
            if isinstance(node, ac.Fuse) and node.fusion_name not in self.fusions:
                raise CompositionError(
                    f"No AdapterFusion '{node.fusion_name}' on this model; add it with "
                    f"model.add_adapter_fusion({node.flatten()!r}) first."
                )

        if setup is None:
            if self.merged:
                raise CompositionError(
                    f"Adapter(s) {self.merged} are merged into the base weights, so the bare base model is not "
                    "available (set_active_adapters(None) and AdapterSetup(None) alike); call "
                    "model.reset_adapter() first."
                )
            return
        visit(setup, [])
        if self.merged:
            top = setup.children if isinstance(setup, ac.Stack) else [setup]
            missing = [n for n in self.merged if n not in top]
            if missing:
                raise CompositionError(
                    f"Adapter(s) {missing} are merged into the base weights, so every setup must include them "
                    "(in a top-level Stack). Call model.reset_adapter() first to use another setup."
                )

    def table(self, setup: ac.AdapterCompositionBlock | str | None) -> PlanTable:
        """The validated, immutable per-layer plans of a parsed ``setup``, cached under its value.

        Composition blocks are hashable and equal by value (names and fusion names included), so
        two setups share a table exactly when they compute the same thing. The cache is emptied
        whenever adapters, fusions or merges change.
        """
        cached = self._plan_cache.get(setup)
        if cached is None:
            self.validate_setup(setup)
            names = setup_adapter_names(setup) if setup is not None else []
            needs_context = any(m.needs_context for n in names for m in self.adapters[n].methods)
            cached = compile_table(setup, self.layers(), self.merged, needs_context)
            self._plan_cache[setup] = cached
        return cached

    def apply_setup(self, setup: ac.AdapterCompositionBlock | str | None) -> None:
        """Make the table of an already parsed ``setup`` the model's default (read by calls that bring
        no setup of their own). The only place that writes plans to layers."""
        table = self.table(setup)
        for layer, plan in zip(self.layers(), table.plans):
            layer.set_plan(plan)
        self.default = table

    def activate(self, setup: Any) -> None:
        """Parse, validate and install ``setup`` as the model's default (``None`` deactivates everything)."""
        parsed = ac.parse_composition(setup)
        self.apply_setup(parsed)
        self.active = parsed

    def refresh(self) -> None:
        """Recompile the current setup (after adapters were added, deleted or merged)."""
        self.invalidate()
        self.apply_setup(self.active)

    def ensure_layer_frames(self) -> None:
        """Install core's frame hooks on every Transformer layer (see :mod:`adapters.frames`), once."""
        if self.frames_installed:
            return
        for lp in self.points.layers:
            self.frame_handles.extend(install_layer_frames(lp.module.module))
        self.frames_installed = True

    def remove_layer_frames(self) -> None:
        remove_layer_frames([lp.module.module for lp in self.points.layers], self.frame_handles)
        self.frame_handles.clear()
        self.frames_installed = False
