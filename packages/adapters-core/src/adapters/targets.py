"""Where methods that adapt linear projections go on a model (LoRA family, VeRA, third parties).

:func:`check_linear_placement` / :func:`linear_targets`: where a config lands on a model. Two ways:

* by the interface (``selfattn_lora``, ``attn_matrices``, ``intermediate_lora``, ``output_lora``):
  attention projections (separate, or the rows of a fused QKV projection), FFN projections, in self-
  and cross-attention;
* by module names (``target_modules``: names, a regular expression or ``"all-linear"``; see
  :mod:`adapters.module_match`): any ``nn.Linear`` / ``Conv1D`` (a fused projection is adapted
  whole), and ``nn.Embedding`` for methods that ask for it. With ``target_modules`` set, the
  interface fields are not used.

Both honour ``leave_out`` and ``layers_to_transform``; :func:`target_config` applies ``rank_pattern``
/ ``alpha_pattern`` to one target.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

from .errors import AdapterError
from .linear import AdapterLinear, Rows, count_rows, is_linear_like
from .method import AdapterLayer
from .module_match import name_matches, names_match, pattern_value, select_modules, uses_target_modules
from .points import FusedQKV, ModelPoints, ModulePoint, linear_features

__all__ = ["LinearPlacement", "LinearTarget", "check_linear_placement", "check_layer_indices", "linear_targets",
           "target_config", "LINEAR_HOOK_POINTS"]

#: The interface hook points :func:`linear_targets` places adapters through (a method's ``hook_points``).
LINEAR_HOOK_POINTS = frozenset({"attn_q_proj", "attn_k_proj", "attn_v_proj", "attn_qkv_proj", "attn_o_proj",
                                "layer_intermediate_proj", "layer_output_proj", "layer_self_attn",
                                "layer_cross_attn"})


class LinearPlacement(Protocol):
    """The placement fields a config needs for :func:`linear_targets`."""

    selfattn_lora: bool
    attn_matrices: list[str]
    intermediate_lora: bool
    output_lora: bool
    leave_out: list[int]


@dataclass
class LinearTarget:
    """One place to adapt: a projection, and for a fused one the matrix ``which`` and its output rows."""

    point: ModulePoint
    fused: FusedQKV | None
    rows: Rows
    which: str | None
    in_features: int
    out_rows: int
    #: the module's paths ``rank_pattern`` / ``alpha_pattern`` keys are matched against
    names: tuple[str, ...] = ()
    #: ``"linear"``, or ``"embedding"`` for an ``nn.Embedding`` (``in_features``: vocabulary size,
    #: ``out_rows``: embedding width)
    kind: str = "linear"
    #: other places the same module is registered (install the layer there too: ``AttachSite.alias``)
    aliases: tuple[ModulePoint, ...] = ()


def _names(point: ModulePoint, points: ModelPoints) -> tuple[str, ...]:
    prefix = points.base_path + "." if points.base_path else ""
    return (point.path, point.path[len(prefix):]) if prefix and point.path.startswith(prefix) else (point.path,)


def target_config(config: Any, target: LinearTarget) -> Any:
    """``config`` with ``r`` / ``alpha`` replaced by the first matching ``rank_pattern`` / ``alpha_pattern``
    entry for ``target`` (the config itself when no pattern matches)."""
    ranks, alphas = getattr(config, "rank_pattern", None) or {}, getattr(config, "alpha_pattern", None) or {}
    if not (ranks or alphas):
        return config
    r = pattern_value(ranks, target.names, config.r)
    alpha = pattern_value(alphas, target.names, config.alpha)
    return config if (r, alpha) == (config.r, config.alpha) else config.replace(r=r, alpha=alpha)


def check_linear_placement(config: LinearPlacement, points: ModelPoints, label: str) -> None:
    """Refuse (before anything changes) a config whose projections the model's interface does not name
    (with ``target_modules``: whose names match nothing)."""
    check_layer_indices(config, [lp.index for lp in points.layers], label)
    if uses_target_modules(config):
        _warn_unused_names(config, select_modules(points, config, label), points, label)
        return
    interface = points.interface
    wanted = set(config.attn_matrices) if config.selfattn_lora else set()
    have = {"o"} if interface.attn_o_proj else set()
    if interface.attn_qkv_proj:
        have |= {"q", "k", "v"}
    else:
        have |= {m for m, f in (("q", "attn_q_proj"), ("k", "attn_k_proj"), ("v", "attn_v_proj"))
                 if getattr(interface, f)}
    missing = sorted(wanted - have)
    if missing:
        raise AdapterError(f"{label} attn_matrices {missing} have no projection in this model's interface; "
                           f"available: {sorted(have)}.")
    if config.intermediate_lora and not interface.layer_intermediate_proj:
        raise AdapterError("intermediate_lora=True, but the interface names no layer_intermediate_proj.")
    if config.output_lora and not interface.layer_output_proj:
        raise AdapterError("output_lora=True, but the interface names no layer_output_proj.")
    if not (wanted or config.intermediate_lora or config.output_lora):
        raise AdapterError(f"This {label} config adapts nothing: enable selfattn_lora with attn_matrices, "
                           "intermediate_lora or output_lora.")


def check_layer_indices(config: Any, indices: list[int], label: str) -> None:
    """``layers_to_transform`` / ``leave_out`` against the model's layer indices: indices the model lacks are
    named in a warning; a choice that leaves no layer is refused.

    :raises AdapterError: no layer remains."""
    if not indices:
        return
    span = f"it has layers {min(indices)} to {max(indices)}"
    only = getattr(config, "layers_to_transform", None)
    leave = set(getattr(config, "leave_out", None) or ())
    for name, value in (("layers_to_transform", only), ("leave_out", leave)):
        missing = sorted(set(value or ()) - set(indices))
        if missing:
            warnings.warn(f"{label} {name} names layers {missing} this model does not have ({span}).", UserWarning,
                          stacklevel=5)
    if not any((only is None or i in only) and i not in leave for i in indices):
        chosen = ", ".join(f"{n}={v!r}" for n, v in (("layers_to_transform", only), ("leave_out", sorted(leave))) if v)
        raise AdapterError(f"{label} places no adapter: {chosen} leave no layer of this model ({span}).")


def _warn_unused_names(config: Any, selected: list, points: ModelPoints, label: str) -> None:
    """Warn about ``rank_pattern`` / ``alpha_pattern`` keys that match none of the adapted modules and
    ``exclude_modules`` entries that match no module (a typo there would otherwise go unnoticed; peft ignores
    both silently)."""
    for field in ("rank_pattern", "alpha_pattern"):
        keys = list(getattr(config, field, None) or {})
        unused = [k for k in keys if not any(name_matches(k, m.names) for m in selected)]
        if unused:
            warnings.warn(f"{label} {field} keys {unused} match none of the {len(selected)} adapted modules (e.g. "
                          f"{selected[0].names[-1]!r}); their values are not used.", UserWarning, stacklevel=5)
    excluded = getattr(config, "exclude_modules", None)
    if isinstance(excluded, list) and excluded:
        paths = [(p,) for p, _ in points.root.named_modules() if p]
        unused = [e for e in excluded if not any(names_match([e], names) for names in paths)]
        if unused:
            warnings.warn(f"{label} exclude_modules entries {unused} match no module of this model; they exclude "
                          "nothing.", UserWarning, stacklevel=5)


def _features(point: ModulePoint, label: str, layer_type: type | None) -> tuple[int, int]:
    module = point.module
    if isinstance(module, AdapterLinear) and (layer_type is None or isinstance(module, layer_type)):
        return module.in_features, module.out_features
    if isinstance(module, AdapterLayer) or not is_linear_like(module):
        raise AdapterError(f"{label} can only adapt nn.Linear or Conv1D projections; '{point.path}' is a "
                           f"{type(module).__name__} (another method's layer may already wrap it).")
    return linear_features(module)


def _named_targets(points: ModelPoints, config: Any, label: str, layer_type: type | None,
                   embedding_type: type | None) -> list[LinearTarget]:
    out: list[LinearTarget] = []
    for named in select_modules(points, config, label):
        module = named.module
        if embedding_type is not None and isinstance(module, (embedding_type, nn.Embedding)):
            vocab, width = module.num_embeddings, module.embedding_dim
            out.append(LinearTarget(named.point, None, None, None, vocab, width, named.names, "embedding",
                                    named.aliases))
            continue
        if not (isinstance(module, AdapterLinear) or is_linear_like(module)) and not isinstance(module, AdapterLayer):
            allowed = "nn.Linear, Conv1D" + (" or nn.Embedding" if embedding_type is not None else "")
            raise AdapterError(f"{label} target_modules matched '{named.point.path}', a {type(module).__name__}; "
                               f"{label} adapts {allowed} modules. Name the projections inside it instead.")
        in_f, out_f = _features(named.point, label, layer_type)
        out.append(LinearTarget(named.point, None, None, None, in_f, out_f, named.names, aliases=named.aliases))
    return out


def linear_targets(points: ModelPoints, config: LinearPlacement, label: str = "This method",
                   layer_type: type | None = None, embedding_type: type | None = None) -> list[LinearTarget]:
    """Every projection (or fused-projection part) ``config`` adapts, in a fixed order; changes nothing.

    :param layer_type: the method's own :class:`AdapterLinear` subclass; a projection already wrapped
        by another method's layer is refused with an :class:`~adapters.errors.AdapterError`.
    :param embedding_type: the method's layer for ``nn.Embedding`` modules, if it adapts them (only
        reachable through ``target_modules``); ``None``: an embedding named there is refused.
    :raises AdapterError: a target that is not a linear projection (or embedding), or names that match
        nothing.
    """
    if uses_target_modules(config):
        return _named_targets(points, config, label, layer_type, embedding_type)
    out: list[LinearTarget] = []
    leave_out = set(config.leave_out)
    only = getattr(config, "layers_to_transform", None)

    def plain(point: ModulePoint | None) -> None:
        if point is not None:
            in_f, out_f = _features(point, label, layer_type)
            out.append(LinearTarget(point, None, None, None, in_f, out_f, _names(point, points)))

    for lp in points.layers:
        if lp.index in leave_out or (only is not None and lp.index not in only):
            continue
        if config.selfattn_lora:
            for kind in ("self_attn", "cross_attn"):
                attn = lp.attention(kind)
                if attn is None:
                    continue
                chosen = [m for m in ("q", "k", "v") if m in config.attn_matrices]
                if attn.qkv is not None:
                    in_f, out_f = _features(attn.qkv, label, layer_type)
                    for which in chosen:
                        rows = attn.fused.index(which)
                        out.append(LinearTarget(attn.qkv, attn.fused, rows, which, in_f, count_rows(rows, out_f),
                                                _names(attn.qkv, points)))
                else:
                    for which in chosen:
                        plain(attn.projection(which))
                if "o" in config.attn_matrices:
                    plain(attn.o)
        if config.intermediate_lora:
            plain(lp.intermediate)
        if config.output_lora:
            plain(lp.output)
    return out
