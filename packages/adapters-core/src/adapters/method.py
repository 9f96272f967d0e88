"""What a method plugin implements: configs, the method object and the layers it places.

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

import ast
import dataclasses
import difflib
import re
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from . import context as _context
from .errors import AdapterError
from .plan import Leaf, PlanOps, execute

if TYPE_CHECKING:
    from .model import AdapterState
    from .plan import PlanNode
    from .points import ModelPoints, ModulePoint

__all__ = ["AdapterConfig", "ConfigUnion", "AdapterMethod", "AdapterLayer", "AttachSite", "parse_config_string"]

ALL_BLOCKS = frozenset({"Stack", "Fuse", "Split", "BatchSplit", "Parallel", "Average", "MultiTask"})


# ---------------------------------------------------------------------------------------------- configs
@dataclasses.dataclass
class AdapterConfig:
    """Base class of method configs: a dataclass whose class attribute ``method`` names its method.

    Subclasses are dataclasses too; every field must be JSON-serialisable (numbers, strings,
    booleans, lists, dicts, ``None``) so that it survives ``save_adapter`` / ``load_adapter``.
    """

    method: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """Every field plus ``method`` and ``config_class``, ready for JSON."""
        data: dict[str, Any] = {"method": self.method, "config_class": type(self).__name__}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            data[f.name] = list(value) if isinstance(value, tuple) else value
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdapterConfig:
        """Build the config from :meth:`to_dict` output. Unknown fields are an error."""
        data = {k: v for k, v in data.items() if k not in ("method", "config_class", "architecture")}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AdapterError(
                f"{cls.__name__} has no field(s) {unknown} (known: {sorted(known)}). The config may come from a "
                "newer version of the method's package; upgrade it."
            )
        return cls(**data)

    def replace(self, **changes: Any) -> AdapterConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @property
    def configs(self) -> list[AdapterConfig]:
        """The single configs this config is made of (itself; several for a :class:`ConfigUnion`)."""
        return [self]

    @staticmethod
    def load(config: str | Mapping[str, Any] | AdapterConfig, **overrides: Any) -> AdapterConfig:
        """Resolve a config given as an instance, a dict (as saved) or a string.

        Strings are config names registered by plugins (``"lora"``), with optional parameters
        (``"lora[r=16, alpha=32]"``) and ``|`` to join several into a :class:`ConfigUnion`.
        """
        from .plugins import registry

        if isinstance(config, AdapterConfig):
            result = config
        elif isinstance(config, str):
            result = parse_config_string(config)
        elif isinstance(config, Mapping):
            method = config.get("method") or config.get("architecture")
            if method == "union":
                result = ConfigUnion(*[AdapterConfig.load(c) for c in config["configs"]])
            elif not method:
                raise AdapterError(f"Config dict {dict(config)!r} has no 'method' key.")
            else:
                impl = registry.method(str(method))
                cls = impl.config_class_named(config.get("config_class"))
                result = cls.from_dict(config)
        else:
            raise AdapterError(f"Cannot use {config!r} as an adapter config; pass a config object, dict or string.")
        return result.replace(**overrides) if overrides else result


class ConfigUnion(AdapterConfig):
    """Several configs applied as one adapter (``"lora|seq_bn"``): one name, several methods."""

    method: ClassVar[str] = "union"

    def __init__(self, *configs: AdapterConfig) -> None:
        flat: list[AdapterConfig] = []
        for c in configs:
            flat.extend(c.configs)
        if not flat:
            raise AdapterError("ConfigUnion needs at least one config.")
        self._configs = flat

    @property
    def configs(self) -> list[AdapterConfig]:
        return list(self._configs)

    def to_dict(self) -> dict[str, Any]:
        return {"method": "union", "configs": [c.to_dict() for c in self._configs]}

    def replace(self, **changes: Any) -> AdapterConfig:
        return ConfigUnion(*[c.replace(**{k: v for k, v in changes.items() if hasattr(c, k)}) for c in self._configs])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ConfigUnion) and self._configs == other._configs

    def __repr__(self) -> str:
        return f"ConfigUnion({', '.join(map(repr, self._configs))})"


_CONFIG_RE = re.compile(r"^\s*([^\[\]|]+?)\s*(?:\[(.*)\])?\s*$", re.S)


def _split_top(text: str, sep: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[({":
            depth += 1
        elif ch in "])}":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


def parse_config_string(text: str) -> AdapterConfig:
    """Parse ``"name"``, ``"name[key=value, ...]"`` or ``"a|b"`` into a config through the registry."""
    from .plugins import registry

    pieces = [p for p in _split_top(text, "|")]
    if len(pieces) > 1:
        return ConfigUnion(*[parse_config_string(p) for p in pieces])
    match = _CONFIG_RE.match(text)
    if not match:
        raise AdapterError(f"Cannot parse adapter config string {text!r}; expected 'name' or 'name[key=value, ...]'.")
    name, args = match.group(1), match.group(2)
    _, factory = registry.config_factory(name)
    kwargs: dict[str, Any] = {}
    if args and args.strip():
        for item in _split_top(args, ","):
            if not item.strip():
                continue
            if "=" not in item:
                raise AdapterError(f"Config string {text!r}: '{item.strip()}' is not of the form key=value.")
            key, value = item.split("=", 1)
            try:
                kwargs[key.strip()] = ast.literal_eval(value.strip())
            except (ValueError, SyntaxError):
                kwargs[key.strip()] = value.strip()
    try:
        return factory(**kwargs)
    except TypeError as exc:
        raise AdapterError(_unknown_fields_message(text, factory, kwargs, exc)) from None


def _unknown_fields_message(text: str, factory: Any, kwargs: dict[str, Any], exc: TypeError) -> str:
    """Name the keys of a config string its config class does not have, with the fields it does have."""
    try:
        config = factory()
        fields = sorted(f.name for f in dataclasses.fields(config))
    except Exception:  # noqa: BLE001 - fall back to the original message
        return f"Config string {text!r}: {exc}"
    unknown = [key for key in kwargs if key not in fields]
    if not unknown:
        return f"Config string {text!r}: {exc}"
    named = []
    for key in unknown:
        close = difflib.get_close_matches(key, fields, n=1)
        named.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    return (f"Config string {text!r}: {type(config).__name__} has no field {', '.join(named)}. "
            f"Its fields: {', '.join(fields)}.")


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

    distribution: str = "<in-process>"

    # -- declaration ----------------------------------------------------------------------------
    def check_declaration(self) -> None:
        """Validate the class attributes (called when the method is registered)."""
        from .interface import _PATH_FIELDS

        if not self.name or not isinstance(self.name, str):
            raise TypeError(f"{type(self).__name__}.name must be a non-empty string.")
        unknown_blocks = set(self.supported_blocks) - ALL_BLOCKS
        if unknown_blocks:
            raise TypeError(f"{type(self).__name__}.supported_blocks has unknown blocks {sorted(unknown_blocks)}.")
        unknown_points = set(self.hook_points) - set(_PATH_FIELDS)
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
        if _context._CALL_PLANS:
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
        """Create the module of adapter ``name`` in ``self.adapters`` (required)."""
        raise NotImplementedError

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


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def _move_hooks(src: nn.Module, dst: nn.Module) -> None:
    """Hand the hook dictionaries (the same objects, so existing handles stay valid) to ``dst``."""
    for attr in _HOOK_DICTS:
        if hasattr(src, attr):
            setattr(dst, attr, getattr(src, attr))
            setattr(src, attr, type(getattr(src, attr))())


class _PutBack:
    """Undo of :meth:`AttachSite.replace`: the original module (and its hooks) back at its point.
    A plain object, not a closure, so a model with adapters pickles and deep-copies."""

    def __init__(self, point: Any, original: nn.Module, layer: nn.Module) -> None:
        self.point, self.original, self.layer = point, original, layer

    def __call__(self) -> None:
        _move_hooks(self.layer, self.original)
        self.point.replace(self.original)


class _RemoveChild:
    """Undo of :meth:`AttachSite.add_child` (picklable)."""

    def __init__(self, owner: nn.Module, attr: str) -> None:
        self.owner, self.attr = owner, attr

    def __call__(self) -> None:
        delattr(self.owner, self.attr)


class AttachSite:
    """The model as a method sees it while adding one adapter.

    Every change made through the site is recorded, so core can undo a failed ``add_adapter``
    completely, and so an :class:`AdapterLayer` that loses its last adapter can restore the model.
    """

    def __init__(self, state: AdapterState, name: str) -> None:
        self.state = state
        self.name = name
        self.points = state.points
        self.model = state.model
        self.new_layers: list[AdapterLayer] = []
        self.touched: list[AdapterLayer] = []
        self.new_shared: list[str] = []

    def replace(self, point: ModulePoint, layer_type: type[AdapterLayer],
                factory: Callable[[nn.Module], AdapterLayer]) -> AdapterLayer:
        """Replace the module at ``point`` by an adapter layer (or reuse the one already there).

        ``factory(original)`` builds the layer; the original module is put back when the layer
        becomes empty. Hooks registered on the original move to the layer and back.
        """
        current = point.module
        if isinstance(current, layer_type):
            self._touch(current)
            return current
        layer = factory(current)
        layer.train(current.training)
        _move_hooks(current, layer)
        point.replace(layer)
        layer._detach.append(_PutBack(point, current, layer))
        self._new(layer)
        return layer

    def add_child(self, owner: nn.Module, attr: str, layer_type: type[AdapterLayer],
                  factory: Callable[[], AdapterLayer]) -> AdapterLayer:
        """Install an adapter layer as ``owner.<attr>`` (or reuse the one there); removed when empty."""
        current = getattr(owner, attr, None)
        if isinstance(current, layer_type):
            self._touch(current)
            return current
        if current is not None:
            raise AdapterError(f"Cannot attach {layer_type.__name__}: {type(owner).__name__}.{attr} already exists.")
        layer = factory()
        layer.train(owner.training)
        owner.add_module(attr, layer)
        layer._detach.append(_RemoveChild(owner, attr))
        self._new(layer)
        return layer

    def layer_frames(self) -> None:
        """Ask for core's layer frames (:mod:`adapters.frames`): hooks of a method on modules inside a
        Transformer layer then find their adapter layer with :func:`adapters.frames.frame_child`."""
        self.state.ensure_layer_frames()

    def register_hook(self, layer: AdapterLayer, handle: Any) -> None:
        """Tie a hook handle (from ``register_forward_hook`` etc.) to ``layer``'s lifetime."""
        layer._detach.append(handle.remove)

    def shared(self, key: str, factory: Callable[[], nn.Module]) -> nn.Module:
        """A model-level module of this adapter (e.g. projections shared by all layers), created once."""
        return self.state.shared_module(self.name, key, factory, created=self.new_shared)

    def dtype_for(self, reference: nn.Module | torch.Tensor | None, config: AdapterConfig | None = None) -> torch.dtype:
        """The dtype new adapter weights should use: ``config.dtype`` if set, else the reference's."""
        wanted = getattr(config, "dtype", None) if config is not None else None
        if wanted:
            return getattr(torch, wanted) if isinstance(wanted, str) else wanted
        if isinstance(reference, torch.Tensor):
            return reference.dtype
        if reference is not None:
            for p in reference.parameters():
                if p.is_floating_point():
                    return p.dtype
        return torch.get_default_dtype()

    def _new(self, layer: AdapterLayer) -> None:
        self.new_layers.append(layer)
        self.touched.append(layer)

    def _touch(self, layer: AdapterLayer) -> None:
        if layer not in self.touched:
            self.touched.append(layer)
