"""The recorded way a method changes a model while adding one adapter (:class:`AttachSite`), and the
picklable undo records that restore the model when an adapter layer becomes empty."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import AdapterError

if TYPE_CHECKING:
    from .method import AdapterConfig, AdapterLayer
    from .points import ModulePoint
    from .state import AdapterState

__all__ = ["AttachSite"]


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


class _PutBackAlias:
    """Undo of :meth:`AttachSite.alias`: the original module back at a second name (hooks stay with the
    layer's main place, whose undo moves them). Picklable."""

    def __init__(self, point: Any, original: nn.Module) -> None:
        self.point, self.original = point, original

    def __call__(self) -> None:
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

    def alias(self, point: ModulePoint, layer: AdapterLayer) -> None:
        """Install ``layer`` also at ``point``: another name of the module it replaced (a module registered
        under several names, like T5's ``shared`` embedding and ``encoder.embed_tokens``). Undone with
        the layer."""
        original = point.module
        if original is layer:
            return
        point.replace(layer)
        layer._detach.insert(0, _PutBackAlias(point, original))

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
