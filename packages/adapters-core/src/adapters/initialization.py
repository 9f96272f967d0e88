"""``adapters.init``: prepare any model for adapters (interface resolution, class swap, forward hooks),
and ``load_model`` (a model and the adapter saved beside it)."""

from __future__ import annotations

import inspect
from functools import partial
from typing import Any

from torch import nn

from .forward import inner_post_forward, inner_pre_forward, post_forward, pre_forward
from .interface import AdapterModelInterface
from .model import _adapter_class
from .plugins import registry
from .points import InterfaceError, resolve_points
from .state import AdapterState

__all__ = ["init", "load_model"]


def init(model: nn.Module, interface: AdapterModelInterface | str | None = None) -> nn.Module:
    """Prepare ``model`` for adapters and return it (the same object).

    :param model: any ``transformers`` model (base model or one with a task head), or any
        ``nn.Module`` when ``interface`` is given.
    :param interface: how to find the hook points; ``None`` uses the interface registered for
        ``model.config.model_type``. ``"auto"`` does the same when one is registered and otherwise
        infers one from the model's structure (:func:`adapters.infer.infer_interface`).
    :raises InterfaceError: no interface is known for the model type (and none was asked to be
        inferred), inference failed, or a path does not exist.

    Idempotent: a second call returns the model unchanged (with a different ``interface`` it is
    an error, since adapters may already sit on the old hook points).
    """
    auto = isinstance(interface, str) and interface == "auto"
    if isinstance(interface, str) and not auto:
        raise TypeError(f"interface must be an AdapterModelInterface, None or 'auto', got {interface!r}.")
    state = getattr(model, "_adapters_state", None)
    if state is not None:
        if interface is not None and not auto and interface != state.interface:
            raise InterfaceError(
                "This model was already initialised with a different interface; adapters may sit on its hook "
                "points. Build a fresh model to use another interface."
            )
        return model
    if interface is None or auto:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        interface = registry.interface_for_model(model)
        if interface is None and auto:
            from .infer import infer_interface

            interface = infer_interface(model)
        elif interface is None:
            known = ", ".join(registry.interface_types())
            what = (f"model type {model_type!r}" if model_type else
                    f"{type(model).__name__}, which has no config.model_type (not a transformers model)")
            raise InterfaceError(
                f"No model interface is registered for {what}. Pass one: "
                f"adapters.init(model, interface=AdapterModelInterface(...)), or let adapters infer one from the "
                f"model's structure: adapters.init(model, interface=\"auto\") (check it with "
                f"adapters.infer_interface(model)). Model types with an interface: {known}."
            )
    if not isinstance(interface, AdapterModelInterface):
        raise TypeError(f"interface must be an AdapterModelInterface, got {type(interface).__name__}.")
    points = resolve_points(model, interface)
    state = AdapterState(model=model, interface=interface, points=points)
    model.__class__ = _adapter_class(type(model))
    model._adapters_state = state
    try:
        params = list(inspect.signature(type(model).forward).parameters)[1:]
    except (TypeError, ValueError):
        params = []
    state.forward_params = params  # type: ignore[attr-defined]
    state.hook_handles.append(model.register_forward_pre_hook(pre_forward, with_kwargs=True))
    state.hook_handles.append(model.register_forward_hook(post_forward, always_call=True))
    # modules called on their own (generate() calls the encoder before the decoder steps; users call the base
    # model inside a task model for embeddings): such a call must see the open setup and route its rows too
    for inner in _separately_called(model):
        state.hook_handles.append(inner.register_forward_pre_hook(partial(inner_pre_forward, state),
                                                                  with_kwargs=True))
        state.hook_handles.append(inner.register_forward_hook(partial(inner_post_forward, state),
                                                              always_call=True))
    state.apply_setup(None)
    return model


def _separately_called(model: nn.Module) -> list[nn.Module]:
    """The encoder of an encoder-decoder model and the base model inside a task model, where they are modules
    of their own."""
    found: list[nn.Module] = []
    for inner in (_separate_encoder(model), getattr(model, "base_model", None)):
        if isinstance(inner, nn.Module) and inner is not model and all(inner is not m for m in found):
            found.append(inner)
    return found


def _separate_encoder(model: nn.Module) -> nn.Module | None:
    """The encoder of an encoder-decoder model (``get_encoder()``), which ``generate()`` calls on its own."""
    config = getattr(model, "config", None)
    getter = getattr(model, "get_encoder", None)
    if not getattr(config, "is_encoder_decoder", False) or not callable(getter):
        return None
    try:
        encoder = getter()
    except (AttributeError, NotImplementedError, TypeError):
        return None
    return encoder if isinstance(encoder, nn.Module) and encoder is not model else None


def load_model(model_or_path: Any, adapter_path: str, **kwargs: Any) -> nn.Module:
    """Build (or take) a model, ``init`` it with the interface saved beside an adapter, and load it.

    :param model_or_path: a model instance, or a path / model id for ``AutoModel.from_pretrained``.
    :param adapter_path: a directory written by ``save_adapter`` (with ``adapter_interface.json``
        when the model used a custom interface).
    """
    import os

    from .interface import INTERFACE_FILE

    model = model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        from transformers import AutoModel

        model = AutoModel.from_pretrained(model_or_path)
    interface_file = os.path.join(adapter_path, INTERFACE_FILE)
    interface = AdapterModelInterface.load(interface_file) if os.path.exists(interface_file) else None
    init(model, interface=interface)
    model.load_adapter(adapter_path, **kwargs)
    return model
