"""``model.hotswap_adapter(path_or_repo, name)``: new weights for an existing adapter, written in place.

A server that compiled its model (``torch.compile``) swaps the fine-tune behind an adapter name without
recompiling: the adapter keeps its modules, Parameter objects, shapes and Python attributes, and the model
keeps its plan objects, so no guard of a compiled graph changes. Only tensor values change (``copy_``).

How: the checkpoint (native, PEFT or AdapterHub, a directory or a Hub repo id) is loaded as a temporary
adapter with the ordinary all-or-nothing loader, which places it exactly as its config says, with per-module
ranks and scalings. It must land on the same layers as the adapter (same method and placement). Each layer
then says what to write (``layer.hotswap_values(source, target)``, optional: LoRA-family layers pad a
smaller rank and fold the new scaling into ``B``; without it every tensor must have the adapter's shape);
everything is checked before anything is written. The temporary adapter is deleted and the model's plan
tables put back as they were (the same objects).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .checkpoint import _load_embeddings, _load_head, apply_checkpoint, read_checkpoint
from .errors import AdapterError, CheckpointError
from .method import AdapterConfig
from .plugins import registry

__all__ = ["hotswap_adapter"]


def _temporary_name(state: Any, name: str) -> str:
    index = 0
    while f"{name}-hotswap{index}" in state.adapters:
        index += 1
    return f"{name}-hotswap{index}"


def _exact_values(source: nn.Module, target: nn.Module, where: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(target tensor, source tensor)`` for every state-dict tensor; the shapes must be equal."""
    src, dst = source.state_dict(keep_vars=True), target.state_dict(keep_vars=True)
    if set(src) != set(dst) or any(src[k].shape != dst[k].shape for k in dst):
        raise AdapterError(f"hotswap_adapter: the new weights at {where} do not have the adapter's tensors and shapes "
                           f"({ {k: list(v.shape) for k, v in src.items()} } vs "
                           f"{ {k: list(v.shape) for k, v in dst.items()} }).")
    return [(dst[k], src[k]) for k in dst]


def _check_head(model: nn.Module, head: dict[str, torch.Tensor], source: str) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    bad = [k for k in head if k not in params or params[k].shape != head[k].shape]
    if bad:
        raise CheckpointError(f"{source}: head weight '{bad[0]}' does not exist on this model or has another shape.")


def _check_embeddings(state: Any, tensors: dict[str, torch.Tensor], source: str) -> None:
    point = state.points.embeddings
    own = None if point is None else point.module.state_dict()
    if own is None or set(own) != set(tensors) or any(own[k].shape != tensors[k].shape for k in own):
        raise CheckpointError(f"{source}: the saved input embeddings do not fit this model's.")


def _writes(state: Any, target: str, source: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every ``(tensor of target, new value)`` pair, all layers and shared modules checked first."""
    layers, new_layers = state.layers(target), state.layers(source)
    if {id(layer) for layer in layers} != {id(layer) for layer in new_layers}:
        where = sorted({layer.location for layer in layers} ^ {layer.location for layer in new_layers})
        raise AdapterError(f"hotswap_adapter: the new weights are placed differently from adapter '{target}' "
                           f"(they differ at {where[:3]}); a hot swap keeps the adapter's placement.")
    writes: list[tuple[torch.Tensor, torch.Tensor]] = []
    for layer in layers:
        values = getattr(layer, "hotswap_values", None)
        if values is not None:
            writes += values(source, target)
        else:
            writes += _exact_values(layer.adapters[source], layer.adapters[target], layer.location)
    shared, new_shared = state.shared_modules(target), state.shared_modules(source)
    if set(shared) != set(new_shared):
        raise AdapterError(f"hotswap_adapter: the new weights have shared modules {sorted(new_shared)}, adapter "
                           f"'{target}' has {sorted(shared)}.")
    for key, module in shared.items():
        writes += _exact_values(new_shared[key], module, f"shared.{key}")
    return writes


def hotswap_adapter(model: nn.Module, path: str, name: str, *, with_head: bool = True, **hub_kwargs: Any) -> None:
    """Load the weights saved at ``path`` (a directory or Hub repo id, any readable format) into the existing
    adapter ``name``, in place. Nothing changes if any check fails.

    :param with_head: also load a task head the checkpoint holds (in place, same shapes).
    :raises AdapterError: ``name`` is merged (reset first), the checkpoint is of another method, placed
        differently, or has a larger rank (LoRA) / other shapes.
    :raises CheckpointError: the checkpoint cannot be read or does not fit the model.
    """
    state = getattr(model, "_adapters_state", None)
    if state is None:
        raise AdapterError("This model was not prepared for adapters; call adapters.init(model) first.")
    record = state.record(name)
    if name in state.merged:
        raise AdapterError(f"Adapter '{name}' is merged into the base weights; call model.reset_adapter() before "
                           "swapping its weights.")
    loaded = read_checkpoint(path, **hub_kwargs)
    if loaded.resolve is not None:
        loaded = loaded.resolve(model)
    source = loaded.source or path
    try:
        methods = [registry.method_for_config(c).name for c in AdapterConfig.load(loaded.config).configs]
    except (AdapterError, TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{source}: the saved adapter's config cannot be used: {exc}") from None
    if methods != record.method_names:
        raise AdapterError(f"hotswap_adapter: {source} holds a {methods} adapter, '{name}' is {record.method_names}; "
                           "a hot swap keeps the adapter's method.")
    head = loaded.head if with_head else None
    if head:
        _check_head(model, head, source)
    if loaded.embeddings:
        _check_embeddings(state, loaded.embeddings, source)
    tables = dict(state._plan_cache)
    temporary = apply_checkpoint(model, replace(loaded, head=None, embeddings=None, resolve=None),
                                 load_as=_temporary_name(state, name), with_head=False)
    try:
        writes = _writes(state, name, temporary)
    finally:
        model.delete_adapter(temporary)
        # the same adapters as before: put back the very plan objects (a compiled graph's guards see no change)
        state._plan_cache.clear()
        state._plan_cache.update(tables)
        state.apply_setup(state.active)
    with torch.no_grad():
        for tensor, value in writes:
            tensor.copy_(value.to(device=tensor.device, dtype=tensor.dtype))
    for layer in state.layers(name):
        clear = getattr(layer, "clear_gathered", None)
        if clear is not None:
            clear()
    if head:
        _load_head(model, head, source)
    if loaded.embeddings:
        _load_embeddings(model, loaded.embeddings, source)
