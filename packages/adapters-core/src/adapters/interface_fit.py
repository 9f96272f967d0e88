"""Fitting a registered interface to the model class at hand: an encoder-decoder type's interface on a
class that holds one of the stacks (``T5EncoderModel``, ``BartForCausalLM``). Applied by the registry to
every registered interface, built-in or from a plugin."""

from __future__ import annotations

from typing import Any

from .interface import AdapterModelInterface

__all__ = ["fit_layer_stacks"]


def fit_layer_stacks(interface: AdapterModelInterface, model: Any) -> AdapterModelInterface:
    """``interface`` without the layer stacks that ``model`` lacks altogether.

    Task classes such as ``T5EncoderModel`` (no decoder) or ``BartForCausalLM`` (no encoder) hold one
    of the two stacks an encoder-decoder interface names. A stack is dropped only when the first step
    of its path is missing on the base model (a typo deeper in a path still fails validation);
    cross-attention fields are dropped when no remaining layer has cross-attention, and a shared
    embedding module the class lacks is dropped too. Layers are then
    numbered within the remaining stacks, so adapter locations differ from the full model's for a
    decoder-only class.
    """
    import dataclasses

    from .points import InterfaceError, resolve_points

    stacks = interface.layer_stacks
    if len(stacks) < 2:
        return interface
    base = model
    if interface.base_model is None:
        prefix = getattr(model, "base_model_prefix", "") or ""
        base = getattr(model, prefix, None) if prefix and hasattr(model, prefix) else model
    kept = [path for path in stacks if hasattr(base, path.split(".")[0])]
    if not kept or len(kept) == len(stacks):
        return interface
    embeddings = interface.model_embeddings
    if embeddings is not None and not hasattr(base, embeddings.split(".")[0]):
        embeddings = None  # e.g. BartForCausalLM has no shared embedding module; only train_embeddings uses it
    reduced = dataclasses.replace(interface, model_layers=kept[0] if len(kept) == 1 else kept,
                                  model_embeddings=embeddings)
    try:
        resolve_points(model, reduced)
    except InterfaceError:
        reduced = dataclasses.replace(reduced, layer_cross_attn=None, layer_pre_cross_attn=None)
    return reduced
