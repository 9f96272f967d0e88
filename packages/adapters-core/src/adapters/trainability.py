"""Which parameters train: the one rule of ``train_adapter`` / ``train_adapter_fusion`` and the
parameter groups it speaks of (task heads, output embeddings). Quantized parameters (integer storage,
bitsandbytes / torchao weights: :func:`adapters.quantized.is_quantized_tensor`) never train."""

from __future__ import annotations

from torch import nn

from .quantized import is_quantized_tensor, keep_training_kernels
from .state import TrainingSetup

__all__ = ["set_trainable", "freeze_base", "unique_parameters", "head_parameters", "output_embedding_parameters"]


def set_trainable(self: nn.Module, adapter_names: set[str], fusion_names: set[str], train_embeddings: bool) -> None:
    """The one place that decides ``requires_grad`` for a training setup (see :meth:`train_adapter`)."""
    state = self._adapters_state
    freeze_base(self, True)
    # by id, so a parameter shared (share_parameters) with a trained adapter stays trainable
    trained = {id(p) for name in adapter_names for p in state.adapter_parameters(name)}
    trained |= {id(p) for fusion in fusion_names for p in state.fusion_parameters(fusion)}
    for name in state.adapters:
        for p in state.adapter_parameters(name):
            p.requires_grad_(id(p) in trained)
    for fusion in state.fusions:
        for p in state.fusion_parameters(fusion):
            p.requires_grad_(id(p) in trained)
    for p in head_parameters(self):
        p.requires_grad_(not is_quantized_tensor(p))
    for p in output_embedding_parameters(self):
        p.requires_grad_(False)
    if train_embeddings and state.points.embeddings is not None:
        for p in state.points.embeddings.module.parameters():
            p.requires_grad_(not is_quantized_tensor(p))
    keep_training_kernels(self)  # bitsandbytes' CPU inference layout of 4-bit weights computes no gradients
    state.training = TrainingSetup(frozenset(adapter_names), frozenset(fusion_names), bool(train_embeddings))


def freeze_base(self: nn.Module, freeze: bool) -> None:
    """Freeze (or unfreeze) the base model's own parameters; quantized ones stay frozen either way."""
    state = self._adapters_state
    adapter_ids = state.owned_parameter_ids()
    for p in state.points.base_model.parameters():
        if id(p) not in adapter_ids:
            p.requires_grad_(not freeze and not is_quantized_tensor(p))


def unique_parameters(module: nn.Module) -> list[nn.Parameter]:
    return list({id(p): p for p in module.parameters()}.values())


def output_embedding_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the model's output embeddings (LM head), tied or not, without the weights of adapters
    placed on it (``target_modules=["lm_head"]``); empty when it has none."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if not isinstance(head, nn.Module):
        return []
    owned = model._adapters_state.owned_parameter_ids()
    return [p for p in head.parameters() if id(p) not in owned]


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Task-head parameters: outside the base model, not adapter weights, not the output embeddings."""
    state = model._adapters_state
    inside = {id(p) for p in state.points.base_model.parameters()}
    inside |= state.owned_parameter_ids()
    inside |= {id(p) for p in output_embedding_parameters(model)}
    return [p for p in unique_parameters(model) if id(p) not in inside]
