"""Merging adapters into the base weights, one rule: merged adapters add to the base in merge order.

* :func:`merge_adapter` folds one more adapter into the weights of the layers hosting it. Several may
  be merged: ``merge_adapter("a"); merge_adapter("b")`` computes what ``Stack("a", "b")`` computes
  unmerged. While anything is merged, every setup must list the merged adapters first in a top-level
  ``Stack`` (the weights contain them), and asking for the bare base model (``set_active_adapters(None)``,
  ``AdapterSetup(None)``) is refused alike.
* :func:`reset_adapter` undoes every merge exactly (each layer restores the copy of its original
  weights taken at its first merge) and gives back the setup that was active before the first merge.
* :func:`merge_and_unload` merges and removes every trace of adapters: the model becomes an instance
  of its original class whose modules are plain torch / transformers modules and whose state dict
  has the original keys, ready for ``save_pretrained`` and any server that loads transformers models.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import composition as ac
from .errors import AdapterError, CompositionError

__all__ = ["merge_adapter", "reset_adapter", "merge_and_unload"]


def _top(setup: Any) -> list[Any]:
    if setup is None:
        return []
    return list(setup.children) if isinstance(setup, ac.Stack) else [setup]


def _stack(items: list[Any]) -> Any:
    if not items:
        return None
    return items[0] if len(items) == 1 else ac.Stack(*items)


def merge_adapter(model: nn.Module, name: str) -> None:
    """Fold adapter ``name`` into the base weights (see the module docstring).

    :raises AdapterError: the adapter's method cannot merge, it is merged already, or a layer refuses
        (e.g. DoRA onto another merge). Nothing changes then.
    :raises CompositionError: the active setup is a ``Parallel`` / ``MultiTask`` block without it
        (merged weights would apply to every row).
    """
    state = model._adapters_state
    record = state.record(name)
    cannot = [m.name for m in record.methods if not m.can_merge]
    if cannot:
        raise AdapterError(f"Adapter '{name}' cannot be merged: method(s) {cannot} do not support merging.")
    if name in state.merged:
        raise AdapterError(f"Adapter '{name}' is already merged.")
    previous = state.active
    rest = [item for item in _top(previous) if item != name and item not in state.merged]
    if isinstance(previous, (ac.Parallel, ac.MultiTask)):
        raise CompositionError(f"Cannot merge '{name}' while {previous!r} is active: merged weights act on every "
                               "row. Activate a Stack (or nothing) first.")
    _refuse_shared_weights(model, state.layers(name), name)
    try:
        for layer in state.layers(name):
            layer.merge_adapter(name)
    except BaseException:
        _restore(state.layers(name), name, state.merged)
        raise
    if not state.merged:
        state.pre_merge_active = previous
    state.merged.append(name)
    state.active = _stack([*state.merged, *rest])
    state.merge_active = state.active
    state.refresh()


def _refuse_shared_weights(model: nn.Module, layers: list[Any], name: str) -> None:
    """Merging writes into a layer's ``weight``; refuse when another module uses the same tensor (a tied LM
    head and input embeddings, T5's ``shared`` and ``encoder.embed_tokens``): it would change too."""
    weights = {id(w): layer for layer in layers if isinstance(w := layer._parameters.get("weight"), torch.Tensor)}
    if not weights:
        return
    for path, module in model.named_modules(remove_duplicate=False):
        layer = weights.get(id(module._parameters.get("weight")))
        if layer is not None and module is not layer:
            raise AdapterError(f"Cannot merge '{name}': the weight at {layer.location} is also the weight of "
                               f"'{path}' (tied weights, e.g. tie_word_embeddings), which merging would change "
                               "as well. Keep the adapter unmerged, or untie the weights first.")


def _restore(layers: list[Any], failed: str, merged: list[str]) -> None:
    """After merging ``failed`` broke off: put ``layers`` back to their original weights, then merge the
    adapters merged before again (exactly the weights they held: merging is deterministic)."""
    for layer in layers:
        for name in [failed, *reversed(merged)]:
            if name in layer.adapters:
                layer.unmerge_adapter(name)
        for name in merged:
            if name in layer.adapters:
                layer.merge_adapter(name)


def reset_adapter(model: nn.Module) -> None:
    """Undo every merge exactly and restore the setup that was active before the first one (or, if the
    setup changed while merged, that setup without the merged adapters)."""
    state = model._adapters_state
    if not state.merged:
        return
    merged = list(state.merged)
    for name in reversed(merged):
        for layer in state.layers(name):
            layer.unmerge_adapter(name)
    state.merged = []
    if state.active == state.merge_active and _exists(state, state.pre_merge_active):
        state.active = state.pre_merge_active
    else:
        state.active = _stack([item for item in _top(state.active) if item not in merged])
    state.pre_merge_active = state.merge_active = None
    state.refresh()


def _exists(state: Any, setup: Any) -> bool:
    if setup is None:
        return True
    names = [setup] if isinstance(setup, str) else setup.flatten()
    return all(n in state.adapters for n in names)


def merge_and_unload(model: nn.Module, adapter_names: str | list[str] | None = None) -> nn.Module:
    """Merge adapters and return ``model`` as a plain transformers model (the same object).

    :param adapter_names: the adapters to merge (in order); ``None``: the active setup, which must
        be a name or a ``Stack`` of names. Adapters merged already count as merged.
    :returns: ``model``, now an instance of its original class: every module a torch / transformers
        module, no adapter keys in its state dict, no hooks of ours; ``save_pretrained`` writes a
        checkpoint that plain ``from_pretrained`` loads with the merged model's outputs.
    :raises AdapterError: an adapter to merge cannot merge, or other adapters / fusions are on the
        model (they would be lost: delete them first). Nothing changes then.
    """
    state = model._adapters_state
    if adapter_names is None:
        top = _top(state.active)
        if not all(isinstance(item, str) for item in top):
            raise AdapterError(f"merge_and_unload merges a name or a Stack of names; the active setup is "
                               f"{state.active!r}. Pass adapter_names=[...].")
        names = list(top)
    else:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    if not names and not state.merged:
        raise AdapterError("merge_and_unload: nothing to merge (no adapter active or named).")
    for name in names:
        record = state.record(name)
        cannot = [m.name for m in record.methods if not m.can_merge]
        if cannot:
            raise AdapterError(f"merge_and_unload: adapter '{name}' uses {cannot}, which cannot be merged into "
                               "the weights; delete it or keep the adapter model.")
    others = sorted(set(state.adapters) - set(names) - set(state.merged))
    if others or state.fusions:
        raise AdapterError(f"merge_and_unload would drop adapters {others} and fusions {sorted(state.fusions)}, "
                           "which are not merged. Delete them first (model.delete_adapter(...)) or merge them.")
    for name in names:
        if name not in state.merged:
            merge_adapter(model, name)
    for layer in state.layers():
        layer.keep_merged()  # the merged weights become the base weights: no restore point any more
    state.merged = []
    state.active = None
    for name in list(state.adapters):
        model.delete_adapter(name)
    return unload(model)


def unload(model: nn.Module) -> nn.Module:
    """Undo ``adapters.init`` on a model without adapters: its original class, no hooks of ours."""
    state = model._adapters_state
    if state.adapters:
        raise AdapterError(f"unload needs a model without adapters; it has {sorted(state.adapters)}.")
    state.remove_layer_frames()
    for handle in state.hook_handles:
        handle.remove()
    state.hook_handles.clear()
    model.__class__ = type(model)._adapters_original_class
    del model._adapters_state
    return model
