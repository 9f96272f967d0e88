"""Modules chosen by name: ``target_modules`` (a list of names, a regular expression or ``"all-linear"``),
``exclude_modules``, ``layers_to_transform`` and per-module values (``rank_pattern``, ``alpha_pattern``).

The names are the field's (peft's): a list entry matches a module whose dotted path equals it or ends
with ``"." + entry`` (``"q_proj"``, ``"mlp.gate_proj"``, ``"model.layers.0.mlp.up_proj"``); a string is
a regular expression that must match a whole path (``r".*\\.(q|v)_proj"``); ``"all-linear"`` is every
``nn.Linear`` / ``Conv1D`` inside the interface's Transformer layers (so never the output head, a pooler
or a classifier). Paths are tried from the model root and from inside the base model, so one config
means the same modules on ``Qwen3ForCausalLM`` (``model.layers.0...``) and ``Qwen3Model``
(``layers.0...``). Modules inside adapter layers and the model-level ``adapters_shared`` container are
never candidates.

Every chosen module gets a portable *location* (the key of its tensors in checkpoints): its interface
hook point's location where it is one (``layers.3.self_attn.q``), else ``layers.<i>.<path in the layer>``
inside a Transformer layer, else its path inside the base model (``embed_tokens``; ``lm_head`` outside it).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import AdapterError
from .linear import AdapterLinear, is_linear_like
from .method import AdapterLayer
from .points import ModelPoints, ModulePoint

__all__ = ["ALL_LINEAR", "NamedModule", "uses_target_modules", "select_modules", "pattern_value", "name_matches",
           "names_match",
           "check_module_fields", "interface_locations"]

#: The ``target_modules`` shorthand for every linear projection inside the Transformer layers.
ALL_LINEAR = "all-linear"
_SHARED_ATTR = "adapters_shared"


@dataclass
class NamedModule:
    """A module chosen by name. :ivar point: where it sits (replaceable in place). :ivar layer: index of
    the Transformer layer holding it (``None`` outside the layers). :ivar names: the paths patterns are
    matched against (from the root, and from inside the base model when different)."""

    point: ModulePoint
    layer: int | None
    names: tuple[str, ...]
    #: other places the same module object is registered (T5's ``shared`` embedding is also
    #: ``encoder.embed_tokens``): the adapter layer must be installed there too
    aliases: tuple[ModulePoint, ...] = ()

    @property
    def module(self) -> nn.Module:
        return self.point.module


def uses_target_modules(config: Any) -> bool:
    """Whether ``config`` places its adapter by module names (``target_modules`` set) rather than by the
    interface's placement fields."""
    return getattr(config, "target_modules", None) is not None


def check_module_fields(config: Any) -> None:
    """Normalise and check the name-based fields of a config in place (for ``__post_init__``).

    :raises ValueError: a field of the wrong type, an invalid regular expression, a negative layer index
        or a non-positive rank in ``rank_pattern``.
    """
    for field_name in ("target_modules", "exclude_modules", "feedforward_modules"):
        value = getattr(config, field_name, None)
        if value is None:
            continue
        if isinstance(value, str):
            if value != ALL_LINEAR or field_name != "target_modules":
                _compile(value, field_name)
            continue
        if not isinstance(value, (list, tuple, set)) or not all(isinstance(v, str) and v for v in value):
            raise ValueError(f"{field_name} must be a list of module names, a regular expression or "
                             f"{ALL_LINEAR!r}; got {value!r}.")
        if not value:
            raise ValueError(f"{field_name} is empty; use None to place adapters through the interface.")
        setattr(config, field_name, sorted(set(value)) if isinstance(value, set) else list(value))
    layers = getattr(config, "layers_to_transform", None)
    if layers is not None:
        layers = [layers] if isinstance(layers, int) else list(layers)
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
            raise ValueError(f"layers_to_transform must hold layer indices (ints >= 0), got {layers!r}.")
        config.layers_to_transform = layers
    for field_name, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
        if not hasattr(config, field_name):
            continue
        patterns = getattr(config, field_name)
        if patterns is None:
            setattr(config, field_name, {})
            continue
        if not isinstance(patterns, dict) or not all(
                isinstance(k, str) and isinstance(v, kind) and not isinstance(v, bool) for k, v in patterns.items()):
            raise ValueError(f"{field_name} must map module-name patterns to numbers, got {patterns!r}.")
        if field_name == "rank_pattern" and any(v < 1 for v in patterns.values()):
            raise ValueError(f"rank_pattern ranks must be positive, got {patterns!r}.")
        setattr(config, field_name, dict(patterns))


def _compile(pattern: str, field_name: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{field_name}={pattern!r} is not a valid regular expression: {exc}.") from None


def name_matches(entry: str, names: tuple[str, ...]) -> bool:
    """A list entry (or a ``rank_pattern`` key) against a module's paths: equal, a dotted suffix, or a
    regular expression matching the end of the path after a dot (peft's reading of pattern keys)."""
    for name in names:
        if name == entry or name.endswith("." + entry):
            return True
    try:
        compiled = re.compile(rf"(?:.*\.)?(?:{entry})")
    except re.error:
        return False
    return any(compiled.fullmatch(name) for name in names)


def pattern_value(patterns: dict[str, Any], names: tuple[str, ...], default: Any) -> Any:
    """The value of the first key of ``patterns`` matching a module's paths (:func:`name_matches`), else
    ``default``."""
    for key, value in patterns.items():
        if name_matches(key, names):
            return value
    return default


def interface_locations(points: ModelPoints) -> dict[str, str]:
    """Location key of every projection hook point of the interface, by module path."""
    return {point.path: point.location for _, _, point, _ in points.projections()}


def _walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module, nn.Module, str]]:
    """``(path, module, parent, attr)`` of every module of the base model (not inside adapter layers)."""
    for attr, child in module._modules.items():
        if child is None or (prefix == "" and attr == _SHARED_ATTR):
            continue
        path = f"{prefix}.{attr}" if prefix else attr
        yield path, child, module, attr
        if not isinstance(child, AdapterLayer):
            yield from _walk(child, path)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, AdapterLinear) or is_linear_like(module)


def select_modules(points: ModelPoints, config: Any, label: str) -> list[NamedModule]:
    """The modules ``config.target_modules`` names, minus ``exclude_modules``, restricted to
    ``layers_to_transform`` and outside ``leave_out``, in model order; changes nothing.

    :raises AdapterError: an entry (or the expression, or ``"all-linear"``) matches no module; the
        error lists close module names.
    """
    wanted = config.target_modules
    excluded = getattr(config, "exclude_modules", None)
    layer_filter = getattr(config, "layers_to_transform", None)
    leave_out = set(getattr(config, "leave_out", None) or ())
    layer_paths = [(lp.module.path + ".", lp.index) for lp in points.layers]
    base_prefix = points.base_path + "." if points.base_path else ""
    locations = interface_locations(points)
    used: set[str] = set()
    chosen: list[NamedModule] = []
    all_names: list[str] = []
    matched = 0  # modules target_modules names, before exclude_modules, layers_to_transform and leave_out
    places: dict[int, list[ModulePoint]] = {}
    for path, module, parent, attr in _walk(points.root, ""):
        places.setdefault(id(module), []).append(ModulePoint(parent, attr, path, path))
        names = (path, path[len(base_prefix):]) if base_prefix and path.startswith(base_prefix) else (path,)
        all_names.append(names[-1])
        layer = next((i for p, i in layer_paths if path.startswith(p)), None)
        if wanted == ALL_LINEAR:
            hit = layer is not None and _is_linear(module)
        elif isinstance(wanted, str):
            hit = any(re.fullmatch(wanted, n) for n in names)
        else:
            entries = [e for e in wanted if name_matches_plain(e, names)]
            used.update(entries)
            hit = bool(entries)
        if not hit:
            continue
        matched += 1
        if excluded is not None and names_match(excluded, names):
            continue
        if layer_filter is not None and layer not in layer_filter:
            continue
        if layer is not None and layer in leave_out:
            continue
        if layer is not None:
            in_layer = path[len(points.layers[layer].module.path) + 1:]
            location = locations.get(path, f"layers.{layer}.{in_layer}")
        else:
            location = names[-1]
        chosen.append(NamedModule(ModulePoint(parent, attr, path, location), layer, names))
    _check_found(wanted, used, chosen, all_names, label)
    if not chosen:
        _nothing_left(config, matched, all_names, len(points.layers), label)
    unique: dict[int, NamedModule] = {}
    for named in chosen:  # a module registered under several names is adapted once, at every name
        first = unique.setdefault(id(named.module), named)
        first.aliases = tuple(p for p in places[id(named.module)] if p.path != first.point.path)
    return list(unique.values())


def name_matches_plain(entry: str, names: tuple[str, ...]) -> bool:
    """A ``target_modules`` list entry against a module's paths: equal or a dotted suffix."""
    return any(name == entry or name.endswith("." + entry) for name in names)


def names_match(spec: str | list[str], names: tuple[str, ...]) -> bool:
    """Whether a module with paths ``names`` is named by ``spec``: a list of names (equal or a dotted suffix)
    or a regular expression matching a whole path (``exclude_modules``, ``feedforward_modules``)."""
    if isinstance(spec, str):
        return any(re.fullmatch(spec, n) for n in names)
    return any(name_matches_plain(e, names) for e in spec)



def _check_found(wanted: str | list[str], used: set[str], chosen: list[NamedModule], all_names: list[str],
                 label: str) -> None:
    if isinstance(wanted, list):
        missing = [e for e in wanted if e not in used]
        if missing:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in all_names} - {str(i) for i in range(len(all_names))})
            hints = {e: difflib.get_close_matches(e.rsplit(".", 1)[-1], leaves, n=3, cutoff=0.5) for e in missing}
            detail = "; ".join(f"{e!r}" + (f" (did you mean {h}?)" if h else "") for e, h in hints.items())
            raise AdapterError(f"{label} target_modules entries match no module of this model: {detail}. Module "
                               f"names end in e.g. {leaves[:12]}.")


def _nothing_left(config: Any, matched: int, all_names: list[str], layers: int, label: str) -> None:
    """The error for a selection that adapts nothing: what matched nothing, or which filter removed all."""
    wanted = config.target_modules
    if not matched:
        if wanted == ALL_LINEAR:
            raise AdapterError(f"{label} target_modules='all-linear' finds no linear module inside the layers.")
        example = max(all_names[:500], key=lambda n: n.count("."), default="")
        if str(wanted).lower() == ALL_LINEAR:
            hint = "; 'all-linear' is spelt in lower case"
        elif re.escape(wanted) == wanted:  # a plain name, not an expression
            hint = f"; for module names use a list: target_modules=[{wanted!r}]"
        else:
            hint = ""
        raise AdapterError(f"{label} target_modules={wanted!r} is a regular expression that must match a whole "
                           f"module path (as in peft), and matches none (paths look like {example!r}){hint}.")
    filters = {name: getattr(config, name, None) for name in ("exclude_modules", "layers_to_transform", "leave_out")}
    set_filters = ", ".join(f"{k}={v!r}" for k, v in filters.items() if v not in (None, [], ()))
    raise AdapterError(f"{label} target_modules={wanted!r} names {matched} module(s), and {set_filters} leave none "
                       f"of them (the model has layers 0 to {layers - 1}).")
