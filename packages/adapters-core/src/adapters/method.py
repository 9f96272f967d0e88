"""What a method plugin implements: the method object and the layers it places (configs:
:mod:`adapters.config`; the attach site: :mod:`adapters.attach_site`; both re-exported here).

A method package provides

* one or more :class:`AdapterConfig` dataclasses (``LoRAConfig`` ...),
* one :class:`AdapterMethod` subclass instance, registered through the
  ``adapters_register_methods`` hook, that declares the config strings, the hook points used,
  the composition blocks supported and merge support, and whose :meth:`AdapterMethod.attach`
  places the adapter on a model through an :class:`AttachSite`,
* :class:`AdapterLayer` subclasses: modules that host every adapter of that method at one hook
  point. Core talks to them only through the methods defined here (add, delete, plan, merge,
  state dict), and they read their per-forward plan from ``self.plan``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from . import context as _context
from .attach_site import AttachSite
from .config import AdapterConfig, ConfigUnion, parse_config_string
from .errors import AdapterError
from .interface import PATH_FIELDS
from .plan import Leaf, PlanOps, execute

if TYPE_CHECKING:
    from .plan import PlanNode
    from .points import ModelPoints
    from .state import AdapterState

__all__ = ["ALL_BLOCKS", "AdapterConfig", "ConfigUnion", "AdapterMethod", "AdapterLayer", "AttachSite",
           "parse_config_string"]

ALL_BLOCKS = frozenset({"Stack", "Fuse", "Split", "BatchSplit", "Parallel", "Average", "MultiTask"})


# ---------------------------------------------------------------------------------------------- method
class AdapterMethod:
    """A method family, as registered by a plugin.

    Subclasses set the class attributes and implement :meth:`attach`. Core calls nothing else
    inside ``forward``: everything here runs when adapters are added, activated or saved.
    """

    #: Method family name (``"lora"``), matched by ``AdapterModelInterface.adapter_methods``.
    name: ClassVar[str] = ""
    #: Config classes implemented by this method; exported as ``adapters.<ClassName>``.
    config_classes: ClassVar[tuple[type[AdapterConfig], ...]] = ()
    #: Config strings accepted by ``add_adapter(name, config="...")`` mapped to a factory
    #: (a config class or any callable returning a config) taking keyword overrides.
    presets: ClassVar[Mapping[str, Callable[..., AdapterConfig]]] = {}
    #: Further names exported as ``adapters.<name>``.
    extra_exports: ClassVar[Mapping[str, Any]] = {}
    #: Composition blocks this method supports (names of :mod:`adapters.composition` blocks).
    supported_blocks: ClassVar[frozenset[str]] = frozenset({"Stack"})
    #: Interface fields this method may attach to (documentation, and checked at registration).
    hook_points: ClassVar[frozenset[str]] = frozenset()
    #: Whether adapters of this method can be merged into the base weights.
    can_merge: ClassVar[bool] = False
    #: Whether forward passes need the per-forward context (attention mask, positions).
    needs_context: ClassVar[bool] = False
    #: Foreign checkpoint formats this method reads / writes: ``{format: (reader, writer)}`` with
    #: ``format`` as :func:`adapters.plugin.detect_format` names it (``"peft"``, ``"adapterhub"``);
    #: ``reader(directory) -> LoadedCheckpoint | None`` (``None``: not this method's), ``writer(model,
    #: directory, name)``. Declare an ``adapters.formats`` entry point ``"<format>:<method>"`` so core
    #: finds the plugin without importing it.
    formats: ClassVar[Mapping[str, tuple[Callable[..., Any] | None, Callable[..., Any] | None]]] = {}

    distribution: str = "<in-process>"

    # -- declaration ----------------------------------------------------------------------------
    def check_declaration(self) -> None:
        """Validate the class attributes (called when the method is registered)."""
        if not self.name or not isinstance(self.name, str):
            raise TypeError(f"{type(self).__name__}.name must be a non-empty string.")
        unknown_blocks = set(self.supported_blocks) - ALL_BLOCKS
        if unknown_blocks:
            raise TypeError(f"{type(self).__name__}.supported_blocks has unknown blocks {sorted(unknown_blocks)}.")
        unknown_points = set(self.hook_points) - set(PATH_FIELDS)
        if unknown_points:
            raise TypeError(f"{type(self).__name__}.hook_points has unknown interface fields {sorted(unknown_points)}.")
        for cls in self.config_classes:
            if not (isinstance(cls, type) and issubclass(cls, AdapterConfig)) or cls.method != self.name:
                raise TypeError(f"{cls!r} must be an AdapterConfig subclass with method = {self.name!r}.")

    def config_strings(self) -> dict[str, Callable[..., AdapterConfig]]:
        """Config strings registered for this method."""
        return dict(self.presets)

    def exports(self) -> dict[str, Any]:
        """Names this method adds to the ``adapters`` namespace."""
        return {**{cls.__name__: cls for cls in self.config_classes}, **self.extra_exports}

    def config_class_named(self, class_name: str | None) -> type[AdapterConfig]:
        """The config class called ``class_name`` (the first one when ``None``)."""
        for cls in self.config_classes:
            if class_name is None or cls.__name__ == class_name:
                return cls
        raise AdapterError(
            f"Method '{self.name}' ({self.distribution}) has no config class {class_name!r}; "
            f"it has {[c.__name__ for c in self.config_classes]}. Upgrade the method's package?"
        )

    # -- lifecycle ------------------------------------------------------------------------------
    def validate(self, config: AdapterConfig, points: ModelPoints) -> None:
        """Raise :class:`~adapters.errors.AdapterError` if ``config`` cannot be placed on this model
        (for example a hook point it needs is missing). Called before anything changes."""

    def attach(self, site: AttachSite, name: str, config: AdapterConfig) -> None:
        """Place adapter ``name`` on the model through ``site`` (required)."""
        raise NotImplementedError

    def average_config(self, config: AdapterConfig, combine_strategy: str, **kwargs: Any) -> AdapterConfig:
        """The config of an adapter made by ``average_adapter(..., combine_strategy, **kwargs)`` from
        adapters of ``config`` (optional). The default takes no arguments and keeps the config.

        :raises AdapterError: an argument the strategy does not take."""
        if kwargs:
            raise AdapterError(f"average_adapter: method '{self.name}' takes no arguments {sorted(kwargs)} for "
                               f"combine_strategy={combine_strategy!r}.")
        return config

    def after_delete(self, state: AdapterState, name: str) -> None:
        """Clean model-level resources of a deleted adapter (optional)."""

    def share_parameters(self, state: AdapterState, adapter_names: list[str], name: str,
                         reference: str | None) -> None:
        """Tie parameters of several adapters of this method (optional)."""
        raise AdapterError(f"Method '{self.name}' does not support share_parameters.")

    def unshare_parameters(self, state: AdapterState, adapter_names: list[str]) -> None:
        """Give each adapter its own copy of previously shared parameters (optional)."""
        raise AdapterError(f"Method '{self.name}' does not support unshare_parameters.")

    # -- fusion (optional) ----------------------------------------------------------------------
    def add_fusion(self, state: AdapterState, fusion_name: str, adapter_names: list[str], config: Any) -> None:
        """Create a fusion layer over ``adapter_names`` (AdapterFusion)."""
        raise AdapterError(f"Method '{self.name}' does not support AdapterFusion.")

    def delete_fusion(self, state: AdapterState, fusion_name: str) -> None:
        raise AdapterError(f"Method '{self.name}' does not support AdapterFusion.")

    def fusion_modules(self, state: AdapterState, fusion_name: str) -> dict[str, nn.Module]:
        """Modules holding a fusion's parameters, keyed by a portable location (for save / train)."""
        raise AdapterError(f"Method '{self.name}' does not support AdapterFusion.")


# ---------------------------------------------------------------------------------------------- layers
class AdapterLayer(nn.Module, PlanOps):
    """A module hosting every adapter of one method at one hook point.

    The layer is its own :class:`~adapters.plan.PlanOps`: a method implements :meth:`leaf` (one
    adapter on the routed inputs) and, where its blocks mean something special, ``stack`` /
    ``average`` / ``fuse``; :meth:`run_plan` does the dispatch (no plan, one adapter, a composition).

    ``self.adapters`` maps adapter names to per-adapter modules that own their parameters;
    core derives training, summaries and checkpoints from it. ``self.location`` is a portable key
    (``layers.3.self_attn.q``) used in checkpoints.

    In ``forward`` a layer reads its plan as ``self.plan`` (or :meth:`active_plan`; ``None``: no
    adapter active here: run as the base model): the plan of the running call's setup when the call
    brought one (``AdapterSetup``, ``generate``), else the model's default, which only
    :meth:`set_plan` writes. A layer never writes
    per-call state to itself and never holds a reference to another module outside its own
    submodules: ``nn.DataParallel`` replicas, deep copies and pickles of the model must work.
    """

    def __init__(self, location: str) -> None:
        super().__init__()
        self.location = location
        self.adapters = nn.ModuleDict()
        self._default_plan: PlanNode | None = None
        self._adapters_token = -1
        self._adapters_slot = -1
        self._detach: list[Callable[[], None]] = []

    def bind_slot(self, token: int, slot: int) -> None:
        """Record the model (``token``) and the index of this layer in the model's plan tables (core)."""
        self._adapters_token = token
        self._adapters_slot = slot

    def active_plan(self) -> PlanNode | None:
        """The plan this forward call runs at this layer (see the class docstring)."""
        if _context.CALL_PLANS:
            ctx = _context.call_context(self._adapters_token)
            if ctx is not None and ctx.plans is not None:
                return ctx.plans[self._adapters_slot]
        return self._default_plan

    def run_plan(self, plan: PlanNode | None, inputs: tuple[torch.Tensor, ...],
                 ops: PlanOps | None = None) -> torch.Tensor:
        """``inputs[0]`` adapted by ``plan``: unchanged for ``None``, ``ops.leaf`` for one adapter,
        :func:`adapters.plan.execute` (row / position routing, then ``ops``) for a composition.

        ``ops`` defaults to the layer itself; pass a per-call object when the leaves need per-call
        values (never store one on the layer: replicas would share it)."""
        if plan is None:
            return inputs[0]
        ops = self if ops is None else ops
        if type(plan) is Leaf:
            return ops.leaf(plan.name, inputs)
        return execute(plan, inputs, ops)

    @property
    def plan(self) -> PlanNode | None:
        """The plan of the running call (:meth:`active_plan`); assigning sets the model's default."""
        return self.active_plan()

    @plan.setter
    def plan(self, plan: PlanNode | None) -> None:
        self.__dict__["_default_plan"] = plan

    def add_adapter(self, name: str, config: AdapterConfig, site: AttachSite) -> None:
        """A conventional place to create adapter ``name``'s module in ``self.adapters``. Core never calls
        it: your :meth:`AdapterMethod.attach` places adapters however it likes (all core needs is
        ``self.adapters[name]``)."""
        raise NotImplementedError(f"{type(self).__name__}.add_adapter is not implemented; create the adapter's "
                                  "module in self.adapters from your method's attach().")

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` from this layer."""
        if name in self.adapters:
            del self.adapters[name]

    def set_plan(self, plan: PlanNode | None) -> None:
        """Install the model's default plan (called on activation; never in ``forward``)."""
        self._default_plan = plan

    def merge_adapter(self, name: str) -> None:
        """Fold adapter ``name`` into the base weights (mergeable methods)."""
        raise AdapterError(f"{type(self).__name__} cannot merge adapters.")

    def unmerge_adapter(self, name: str) -> None:
        """Undo :meth:`merge_adapter` exactly."""
        raise AdapterError(f"{type(self).__name__} cannot merge adapters.")

    def keep_merged(self) -> None:
        """Make what is merged the base weights for good (``merge_and_unload``): drop restore points."""

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """Tensors to save for adapter ``name``, with keys local to this layer."""
        return dict(self.adapters[name].state_dict())

    def load_adapter_state_dict(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        """Load tensors saved by :meth:`adapter_state_dict` (shapes already checked by core)."""
        self.adapters[name].load_state_dict(dict(state), strict=True)

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        """Trainable parameters of adapter ``name`` at this layer."""
        return self.adapters[name].parameters()

    def average_adapter(self, name: str, sources: list[tuple[str, float]], combine_strategy: str,
                        **kwargs: Any) -> None:
        """Fill the (already added) adapter ``name`` with a combination of ``sources``.

        The default ``linear`` strategy averages every tensor with the given weights.
        """
        if combine_strategy != "linear":
            raise AdapterError(
                f"{type(self).__name__} supports only combine_strategy='linear', not {combine_strategy!r}."
            )
        target = self.adapters[name].state_dict()
        with torch.no_grad():
            for key, tensor in target.items():
                mixed = sum(w * self.adapters[src].state_dict()[key].float() for src, w in sources)
                tensor.copy_(mixed.to(tensor.dtype))

    def is_empty(self) -> bool:
        return len(self.adapters) == 0

    def detach_from_model(self) -> None:
        """Undo what the site did to install this layer (restore the original module, remove hooks)."""
        for fn in reversed(self._detach):
            fn()
        self._detach.clear()
