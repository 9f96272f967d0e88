"""Hook points: an :class:`~adapters.interface.AdapterModelInterface` resolved on a concrete model.

:func:`resolve_points` walks every path of the interface on the model once, when ``adapters.init``
runs, and fails with an :class:`InterfaceError` that names the field, the path and the closest
existing module names. Methods then attach to the resolved :class:`ModulePoint` objects, which
address a module through its parent, so a method may replace the module in place.

Location keys (``layers.3.self_attn.q``, ``layers.3.output``, ``layers.3``, ``embeddings``) name
hook points independently of the model class, so checkpoints are portable between a base model
and the same model with a task head.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .interface import AdapterModelInterface

__all__ = [
    "InterfaceError",
    "ModulePoint",
    "AttentionPoints",
    "FusedQKV",
    "LayerPoints",
    "ModelPoints",
    "resolve_points",
    "resolve_path",
    "linear_features",
]


class InterfaceError(ValueError):
    """An interface path does not exist on the model (or an interface is otherwise unusable)."""


def _child(module: nn.Module, step: str) -> nn.Module | None:
    """One step of a dotted path: an attribute, or an (possibly negative) index into a container."""
    if step.lstrip("-").isdigit() and isinstance(module, (nn.ModuleList, nn.Sequential)):
        index = int(step)
        if -len(module) <= index < len(module):
            return module[index]
        return None
    child = getattr(module, step, None)
    return child if isinstance(child, nn.Module) else None


def _normalise_step(module: nn.Module, step: str) -> str:
    if step.lstrip("-").isdigit() and isinstance(module, (nn.ModuleList, nn.Sequential)):
        return str(int(step) % len(module))
    return step


def resolve_path(root: nn.Module, path: str) -> tuple[nn.Module, str, nn.Module] | None:
    """Follow ``path`` from ``root``; return ``(parent, attribute, module)`` or ``None`` if absent."""
    steps = path.split(".")
    parent = root
    for step in steps[:-1]:
        parent = _child(parent, step)
        if parent is None:
            return None
    module = _child(parent, steps[-1])
    if module is None:
        return None
    return parent, _normalise_step(parent, steps[-1]), module


def _normalise_path(root: nn.Module, path: str) -> str:
    """``path`` with negative container indices made positive (so ``get_submodule`` finds it)."""
    module, out = root, []
    for step in path.split("."):
        out.append(_normalise_step(module, step))
        module = _child(module, step)
        if module is None:
            return path
    return ".".join(out)


def _closest(root: nn.Module, path: str) -> tuple[str, list[str]]:
    """The deepest existing prefix of ``path`` and, as full paths, the close child names where it breaks."""
    steps = path.split(".")
    module = root
    done: list[str] = []
    for step in steps:
        nxt = _child(module, step)
        if nxt is None:
            names = [n for n, _ in module.named_children()]
            close = difflib.get_close_matches(step, names, n=3, cutoff=0.3) or names[:8]
            return ".".join(done), [".".join([*done, name]) for name in close]
        done.append(step)
        module = nxt
    return ".".join(done), []


def linear_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or a GPT-2 style ``Conv1D`` (weight in × out)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if weight is not None and weight.dim() == 2 and hasattr(module, "nf"):
        return weight.shape[0], weight.shape[1]
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    raise TypeError(f"{type(module).__name__} is not a linear projection (nn.Linear or Conv1D).")


@dataclass
class ModulePoint:
    """A module at a hook point, addressed through its parent so it can be replaced in place.

    :ivar parent: the module holding it. :ivar attr: its attribute name in ``parent``.
    :ivar path: the full dotted path from the model root. :ivar location: the portable location key.
    """

    parent: nn.Module
    attr: str
    path: str
    location: str

    @property
    def module(self) -> nn.Module:
        """The module currently installed at this point (a wrapper, once a method replaced it)."""
        return getattr(self.parent, self.attr)

    def replace(self, new: nn.Module) -> nn.Module:
        """Install ``new`` at this point; return what was there."""
        old = self.module
        setattr(self.parent, self.attr, new)
        return old


@dataclass
class FusedQKV:
    """Where q, k and v live in the output features of a fused projection."""

    sizes: tuple[int, int, int]
    layout: str = "concat"
    num_heads: int = 1

    def index(self, which: str) -> slice | torch.Tensor:
        """Output feature positions of ``which`` (``"q"``, ``"k"`` or ``"v"``): a slice or an index tensor."""
        pos = "qkv".index(which)
        if self.layout == "concat":
            start = sum(self.sizes[:pos])
            return slice(start, start + self.sizes[pos])
        head = self.sizes[0] // self.num_heads
        rows = [h * 3 * head + pos * head + j for h in range(self.num_heads) for j in range(head)]
        return torch.tensor(rows, dtype=torch.long)


@dataclass
class AttentionPoints:
    """The projections of one attention module (self- or cross-attention)."""

    kind: str  # "self_attn" or "cross_attn"
    module: ModulePoint
    q: ModulePoint | None = None
    k: ModulePoint | None = None
    v: ModulePoint | None = None
    qkv: ModulePoint | None = None
    o: ModulePoint | None = None
    fused: FusedQKV | None = None

    def projection(self, which: str) -> ModulePoint | None:
        """The point of projection ``which`` in ``q``, ``k``, ``v``, ``qkv``, ``o``."""
        return getattr(self, which)


@dataclass
class LayerPoints:
    """Every hook point of one Transformer layer."""

    index: int
    stack: int
    module: ModulePoint
    self_attn: AttentionPoints | None = None
    cross_attn: AttentionPoints | None = None
    intermediate: ModulePoint | None = None
    output: ModulePoint | None = None
    pre_self_attn: ModulePoint | None = None
    pre_cross_attn: ModulePoint | None = None
    pre_ffn: ModulePoint | None = None
    ln_1: ModulePoint | None = None
    ln_2: ModulePoint | None = None

    def attention(self, kind: str) -> AttentionPoints | None:
        """``self_attn`` or ``cross_attn``."""
        return getattr(self, kind)


@dataclass
class ModelPoints:
    """The interface resolved on one model: the base model, embeddings and every layer's points."""

    interface: AdapterModelInterface
    root: nn.Module
    base_model: nn.Module
    base_path: str
    embeddings: ModulePoint | None
    layers: list[LayerPoints] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def projections(self) -> Iterator[tuple[LayerPoints, str, ModulePoint, AttentionPoints | None]]:
        """Every projection hook point: ``(layer, kind, point, attention)`` with ``kind`` one of ``q``, ``k``,
        ``v``, ``qkv``, ``o`` (self- and cross-attention; ``attention`` the one holding it), ``intermediate``,
        ``output`` (``attention`` ``None``)."""
        for lp in self.layers:
            for attn in (lp.self_attn, lp.cross_attn):
                if attn is None:
                    continue
                for which in ("q", "k", "v", "qkv", "o"):
                    point = attn.projection(which)
                    if point is not None:
                        yield lp, which, point, attn
            for which in ("intermediate", "output"):
                point = getattr(lp, which)
                if point is not None:
                    yield lp, which, point, None

    @property
    def hidden_size(self) -> int | None:
        config = getattr(self.root, "config", None)
        for name in ("hidden_size", "d_model", "n_embd", "dim"):
            value = getattr(config, name, None)
            if isinstance(value, int):
                return value
        return None


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def qkv_sizes(config: object, out_features: int, interface: AdapterModelInterface) -> FusedQKV:
    if interface.attn_qkv_split is not None:
        sizes = tuple(int(s) for s in interface.attn_qkv_split)
        if len(sizes) != 3 or sum(sizes) != out_features:
            raise InterfaceError(
                f"attn_qkv_split={list(sizes)} does not add up to the fused projection's "
                f"{out_features} output features."
            )
    else:
        heads = getattr(config, "num_attention_heads", None) or getattr(config, "num_heads", None)
        kv_heads = _kv_heads(config)
        hidden = getattr(config, "hidden_size", None)
        head_dim = getattr(config, "head_dim", None) or (hidden // heads if hidden and heads else None)
        sizes = None
        if heads and head_dim:
            guess = (heads * head_dim, (kv_heads or heads) * head_dim, (kv_heads or heads) * head_dim)
            if sum(guess) == out_features:
                sizes = guess
        if sizes is None:
            if out_features % 3 or (kv_heads is not None and kv_heads != heads):  # equal thirds: only with as
                # many key/value heads as query heads (a multi-query model's thirds would cut through q)
                raise InterfaceError(
                    f"Cannot tell the q/k/v widths of a fused projection with {out_features} outputs; "
                    "set attn_qkv_split=[q, k, v] in the interface."
                )
            sizes = (out_features // 3,) * 3
    heads = getattr(config, "num_attention_heads", None) or 1
    if interface.attn_qkv_layout == "per_head" and len(set(sizes)) != 1:
        raise InterfaceError("attn_qkv_layout='per_head' needs equal q/k/v widths.")
    return FusedQKV(sizes=sizes, layout=interface.attn_qkv_layout, num_heads=heads)


def _kv_heads(config: object) -> int | None:
    """Key/value heads the config states (``num_key_value_heads``; Falcon's ``num_kv_heads`` / ``multi_query``;
    ``n_head_kv``), ``None`` when it states none."""
    if getattr(config, "multi_query", False) is True and not getattr(config, "new_decoder_architecture", False):
        return 1  # (Falcon's config keeps num_kv_heads = heads then)
    for name in ("num_key_value_heads", "num_kv_heads", "n_head_kv"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class _Resolver:
    def __init__(self, model: nn.Module, interface: AdapterModelInterface) -> None:
        self.model = model
        self.interface = interface

    def point(
        self, field_name: str, ref: nn.Module, ref_path: str, rel: str, location: str, where: str, optional: bool
    ) -> ModulePoint | None:
        found = resolve_path(ref, rel)
        if found is None:
            if optional:
                return None
            prefix, close = _closest(ref, rel)
            broke_at = f" (resolved up to '{prefix}')" if prefix else ""
            raise InterfaceError(
                f"Interface field {field_name}={rel!r} does not exist on {where} "
                f"('{ref_path or '<model>'}'){broke_at}. Closest module names there: {close}. "
                "Fix the path in your AdapterModelInterface."
            )
        parent, attr, _ = found
        rel = _normalise_path(ref, rel)
        parent_path = rel.rsplit(".", 1)[0] if "." in rel else ""
        return ModulePoint(parent=parent, attr=attr, path=_join(ref_path, parent_path, attr), location=location)


def resolve_points(model: nn.Module, interface: AdapterModelInterface) -> ModelPoints:
    """Resolve and validate every path of ``interface`` on ``model``.

    :raises InterfaceError: a path that does not exist, naming the field, the path and the closest
        module names; or a layer list that is not a ``ModuleList``.
    """
    r = _Resolver(model, interface)
    if interface.base_model is not None:
        found = resolve_path(model, interface.base_model)
        if found is None:
            prefix, close = _closest(model, interface.base_model)
            raise InterfaceError(
                f"Interface field base_model={interface.base_model!r} does not exist on the model. "
                f"Closest module names: {close}."
            )
        base, base_path = found[2], interface.base_model
    else:
        prefix = getattr(model, "base_model_prefix", "") or ""
        candidate = getattr(model, prefix, None) if prefix else None
        if isinstance(candidate, nn.Module):
            base, base_path = candidate, prefix
        else:
            base, base_path = model, ""

    embeddings = None
    if interface.model_embeddings is not None:
        embeddings = r.point("model_embeddings", base, base_path, interface.model_embeddings, "embeddings",
                             "the base model", optional=False)

    layers: list[LayerPoints] = []
    config = getattr(model, "config", None)
    for stack_index, stack_path in enumerate(interface.layer_stacks):
        found = resolve_path(base, stack_path)
        if found is None or not isinstance(found[2], (nn.ModuleList, nn.Sequential)):
            prefix, close = _closest(base, stack_path)
            what = "does not exist" if found is None else f"is a {type(found[2]).__name__}, not a ModuleList"
            raise InterfaceError(
                f"Interface field model_layers={stack_path!r} {what} on the base model "
                f"('{base_path or '<model>'}'). Closest module names: {close}."
            )
        container = found[2]
        container_path = _join(base_path, stack_path)
        for local_index in range(len(container)):
            i = len(layers)
            path = _join(container_path, str(local_index))
            layer_point = ModulePoint(container, str(local_index), path, f"layers.{i}")
            layers.append(_resolve_layer(r, layer_point, i, stack_index, config))

    _check_optional_fields_exist_somewhere(interface, layers)
    return ModelPoints(interface=interface, root=model, base_model=base, base_path=base_path,
                       embeddings=embeddings, layers=layers)


def _resolve_layer(r: _Resolver, lp: ModulePoint, i: int, stack: int, config: object) -> LayerPoints:
    it = r.interface
    layer, lpath = lp.module, lp.path
    where = f"layer {i}"
    points = LayerPoints(index=i, stack=stack, module=lp)
    for kind, rel, optional in (("self_attn", it.layer_self_attn, False), ("cross_attn", it.layer_cross_attn, True)):
        if rel is None:
            continue
        attn = r.point(f"layer_{kind}", layer, lpath, rel, f"layers.{i}.{kind}", where, optional)
        if attn is None:
            continue
        ap = AttentionPoints(kind=kind, module=attn)
        awhere = f"the {kind.replace('_', '-')} module of layer {i}"
        for which, field_name in (("q", "attn_q_proj"), ("k", "attn_k_proj"), ("v", "attn_v_proj"),
                                  ("qkv", "attn_qkv_proj"), ("o", "attn_o_proj")):
            rel_proj = getattr(it, field_name)
            if rel_proj is not None:
                point = r.point(field_name, attn.module, attn.path, rel_proj, f"layers.{i}.{kind}.{which}", awhere,
                                optional=False)
                setattr(ap, which, point)
        if ap.qkv is not None:
            _, out = linear_features(ap.qkv.module)
            ap.fused = qkv_sizes(config, out, it)
        setattr(points, kind, ap)
    for attr, field_name, optional in (
        ("intermediate", "layer_intermediate_proj", False),
        ("output", "layer_output_proj", False),
        ("pre_self_attn", "layer_pre_self_attn", False),
        ("pre_cross_attn", "layer_pre_cross_attn", True),
        ("pre_ffn", "layer_pre_ffn", False),
        ("ln_1", "layer_ln_1", False),
        ("ln_2", "layer_ln_2", False),
    ):
        rel = getattr(it, field_name)
        if attr == "pre_cross_attn" and points.cross_attn is None:
            continue  # only layers with cross-attention have a residual stream entering it
        if rel is not None:
            setattr(points, attr, r.point(field_name, layer, lpath, rel, f"layers.{i}.{attr}", where, optional))
    return points


def _check_optional_fields_exist_somewhere(interface: AdapterModelInterface, layers: list[LayerPoints]) -> None:
    if interface.layer_cross_attn is not None and not any(lp.cross_attn for lp in layers):
        raise InterfaceError(
            f"Interface field layer_cross_attn={interface.layer_cross_attn!r} exists in none of the "
            f"{len(layers)} layers; set it to None for a model without cross-attention."
        )
    if interface.layer_pre_cross_attn is not None and not any(lp.pre_cross_attn for lp in layers):
        raise InterfaceError(
            f"Interface field layer_pre_cross_attn={interface.layer_pre_cross_attn!r} exists in none of the layers."
        )
