"""Helpers shared by the foreign-format readers and writers: module-path lookup (file reading is
core's :func:`adapters.checkpoint.read_json` / :func:`~adapters.checkpoint.read_tensors`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoint_io import read_json, read_tensors
from ..errors import CheckpointError
from ..plugins import registry
from ..points import FusedQKV

__all__ = ["Target", "module_targets", "match_module", "method_config_class", "read_json", "read_tensors",
           "layer_index"]

#: What a module path of the foreign format can be on our model.
KINDS = ("q", "k", "v", "qkv", "o", "intermediate", "output")


@dataclass
class Target:
    """One of our LoRA-capable hook points: its portable location, its kind and (for qkv) the fused layout."""

    location: str
    kind: str  # one of KINDS
    layer: int
    path: str  # full dotted path from the model root
    fused: FusedQKV | None = None
    out_features: int = 0


def module_targets(model: nn.Module) -> dict[str, Target]:
    """Every projection hook point of ``model`` keyed by its full module path (self- and cross-attention:
    a native LoRA's ``attn_matrices`` adapt both, as PEFT's ``target_modules`` names match both)."""
    state = getattr(model, "_adapters_state", None)
    if state is None:
        raise CheckpointError("This model was not prepared for adapters; call adapters.init(model) first.")
    out: dict[str, Target] = {}
    for lp in state.points.layers:
        for attn in (lp.self_attn, lp.cross_attn):
            if attn is None:
                continue
            for which in ("q", "k", "v", "qkv", "o"):
                point = attn.projection(which)
                if point is not None:
                    out[point.path] = Target(point.location, which, lp.index, point.path,
                                             attn.fused if which == "qkv" else None)
        for which in ("intermediate", "output"):
            point = getattr(lp, which)
            if point is not None:
                out[point.path] = Target(point.location, which, lp.index, point.path)
    return out


def match_module(targets: dict[str, Target], path: str, base_path: str) -> Target | None:
    """Our hook point for a foreign module ``path``; tolerates a task-model prefix on either side.

    A path saved from ``Qwen3ForCausalLM`` (``model.layers.0...``) matches ``Qwen3Model`` (``layers.0...``)
    and vice versa, as does a ``bert.`` prefix against a bare ``BertModel``.
    """
    if path in targets:
        return targets[path]
    if base_path and f"{base_path}.{path}" in targets:
        return targets[f"{base_path}.{path}"]
    _, _, rest = path.partition(".")
    if rest:
        if rest in targets:
            return targets[rest]
        if base_path and f"{base_path}.{rest}" in targets:
            return targets[f"{base_path}.{rest}"]
    return None


def layer_index(targets: dict[str, Target]) -> int:
    """Number of layers the targets span."""
    return 1 + max((t.layer for t in targets.values()), default=-1)


def rows_of(fused: FusedQKV, which: str, width: int) -> torch.Tensor:
    """Output feature indices of ``which`` in a fused projection of ``width`` outputs."""
    rows = fused.index(which)
    if isinstance(rows, slice):
        return torch.arange(rows.start, rows.stop)
    return rows


def method_config_class(class_name: str, distribution: str, source: str) -> type:
    """A method package's config class looked up through the plugin registry (core never imports a
    method package by name); a :class:`CheckpointError` naming ``source`` when it is not installed."""
    try:
        return registry.export(class_name)
    except (ImportError, KeyError):
        raise CheckpointError(f"{source}: reading it needs {class_name} from {distribution}: "
                              f"pip install {distribution}") from None
