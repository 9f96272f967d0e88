"""Shared machinery for methods that adapt linear projections (LoRA family, VeRA, third parties).

* :func:`check_linear_placement` / :func:`linear_targets`: where a config with LoRA's placement
  fields (``selfattn_lora``, ``attn_matrices``, ``intermediate_lora``, ``output_lora``,
  ``leave_out``) lands on a model: attention projections (separate, or the rows of a fused QKV
  projection), FFN projections, in self- and cross-attention.
* :class:`AdapterLinear`: the base of layers that replace an ``nn.Linear`` or GPT-2 ``Conv1D``
  and take over its ``weight`` and ``bias`` (the same Parameter objects, so base state-dict keys
  do not change), with the base computation, row access for fused projections, and exact
  merge / reset bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .errors import AdapterError
from .method import AdapterLayer
from .points import FusedQKV, ModelPoints, ModulePoint, linear_features

__all__ = [
    "Rows",
    "LinearPlacement",
    "LinearTarget",
    "AdapterLinear",
    "is_linear_like",
    "count_rows",
    "row_index",
    "check_linear_placement",
    "linear_targets",
    "LINEAR_HOOK_POINTS",
    "param",
    "FusedParts",
]

#: The interface hook points :func:`linear_targets` places adapters through (a method's ``hook_points``).
LINEAR_HOOK_POINTS = frozenset({"attn_q_proj", "attn_k_proj", "attn_v_proj", "attn_qkv_proj", "attn_o_proj",
                                "layer_intermediate_proj", "layer_output_proj", "layer_self_attn",
                                "layer_cross_attn"})

#: Output features of a projection an adapter acts on: all (``None``), a slice, or an index tensor.
Rows = slice | torch.Tensor | None


class LinearPlacement(Protocol):
    """The placement fields a config needs for :func:`linear_targets`."""

    selfattn_lora: bool
    attn_matrices: list[str]
    intermediate_lora: bool
    output_lora: bool
    leave_out: list[int]


def param(module: nn.Module, name: str) -> torch.Tensor | None:
    """``getattr(module, name)`` for a parameter, without ``nn.Module.__getattr__`` on the common path.

    A registered parameter is read straight from ``module._parameters`` (FSDP2 and ``torch.func``
    swap tensors there); anything else (``None``, a plain tensor put in place of a parameter, as
    FSDP1 does with flat parameters, a parametrization's property) goes through ordinary attribute
    lookup. On a small-batch forward ``__getattr__`` costs more per call than a kernel launch.
    """
    params = module._parameters
    return params[name] if name in params else getattr(module, name)


def is_linear_like(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Linear`` or a GPT-2 style ``Conv1D`` (weight ``in × out``, ``nf``)."""
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 2 and hasattr(module, "nf")


def count_rows(rows: Rows, width: int) -> int:
    """How many output features ``rows`` selects out of ``width``."""
    if rows is None:
        return width
    if isinstance(rows, slice):
        return rows.stop - rows.start
    return int(rows.numel())


def row_index(rows: Rows, width: int, device: torch.device) -> torch.Tensor:
    """``rows`` as an index tensor on ``device``."""
    if rows is None:
        return torch.arange(width, device=device)
    if isinstance(rows, slice):
        return torch.arange(rows.start, rows.stop, device=device)
    return rows.to(device)


@dataclass
class LinearTarget:
    """One place to adapt: a projection, and for a fused one the matrix ``which`` and its output rows."""

    point: ModulePoint
    fused: FusedQKV | None
    rows: Rows
    which: str | None
    in_features: int
    out_rows: int


def check_linear_placement(config: LinearPlacement, points: ModelPoints, label: str) -> None:
    """Refuse (before anything changes) a config whose projections the model's interface does not name."""
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


def _features(point: ModulePoint, label: str, layer_type: type | None) -> tuple[int, int]:
    module = point.module
    if isinstance(module, AdapterLinear) and (layer_type is None or isinstance(module, layer_type)):
        return module.in_features, module.out_features
    if not is_linear_like(module):
        raise AdapterError(f"{label} can only adapt nn.Linear or Conv1D projections; '{point.path}' is a "
                           f"{type(module).__name__} (another method's layer may already wrap it).")
    return linear_features(module)


def linear_targets(points: ModelPoints, config: LinearPlacement, label: str = "This method",
                   layer_type: type | None = None) -> list[LinearTarget]:
    """Every projection (or fused-projection part) ``config`` adapts, in a fixed order; changes nothing.

    :param layer_type: the method's own :class:`AdapterLinear` subclass; a projection already wrapped
        by another method's layer is refused with an :class:`~adapters.errors.AdapterError`.
    """
    out: list[LinearTarget] = []
    leave_out = set(config.leave_out)

    def plain(point: ModulePoint | None) -> None:
        if point is not None:
            in_f, out_f = _features(point, label, layer_type)
            out.append(LinearTarget(point, None, None, None, in_f, out_f))

    for lp in points.layers:
        if lp.index in leave_out:
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
                        out.append(LinearTarget(attn.qkv, attn.fused, rows, which, in_f, count_rows(rows, out_f)))
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


class FusedParts(nn.Module):
    """One adapter on a fused q|k|v projection: a part per adapted matrix (at most three, in
    ``self.parts``), each acting on its own output rows. Calling it applies the parts in turn:
    ``part(x, y, *args) -> y`` (the signature of the method's per-projection adapter modules)."""

    straight = False  # LoRA's straight-line path is for a plain adapter on a whole projection

    def __init__(self) -> None:
        super().__init__()
        self.parts = nn.ModuleDict()

    def forward(self, x: torch.Tensor, y: torch.Tensor, *args: Any) -> torch.Tensor:
        for part in self.parts.values():
            y = part(x, y, *args)
        return y

    @staticmethod
    def units(module: nn.Module) -> dict[str, nn.Module]:
        """The per-matrix modules of one adapter (``{"": module}`` on a plain projection)."""
        return dict(module.parts.items()) if isinstance(module, FusedParts) else {"": module}


class AdapterLinear(AdapterLayer):
    """Base of layers replacing an ``nn.Linear`` / ``Conv1D``; shares its ``weight`` and ``bias``.

    Subclasses add adapters and a ``forward``; :meth:`base_forward` is exactly the original module's
    computation. Merging writes into the shared weight through :meth:`write_weight_rows` after
    :meth:`begin_merge` saved an exact backup, which :meth:`unmerge_adapter` restores.
    """

    def __init__(self, base: nn.Module, location: str, fused: Any = None) -> None:
        super().__init__(location)
        if not is_linear_like(base):
            raise AdapterError(f"{type(self).__name__} can only wrap nn.Linear or Conv1D projections; {location} "
                               f"holds a {type(base).__name__} (is another method's layer already there?).")
        self.is_conv1d = not isinstance(base, nn.Linear)
        self.in_features, self.out_features = linear_features(base)
        self.weight = base.weight
        self.bias = base.bias
        self.fused = fused
        self._backup: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Exactly the wrapped module's computation.

        ``weight`` and ``bias`` are read with :func:`param` (no ``nn.Module.__getattr__``, which
        costs microseconds a call on every projection of a small-batch forward).
        """
        weight, bias = param(self, "weight"), param(self, "bias")
        if self.is_conv1d:
            flat = x.reshape(-1, x.shape[-1])
            out = torch.addmm(bias, flat, weight) if bias is not None else flat.mm(weight)
            return out.view(*x.shape[:-1], self.out_features)
        return F.linear(x, weight, bias)

    def weight_rows(self, rows: Rows) -> torch.Tensor:
        """The base weight as (out × in), restricted to output ``rows``."""
        w = self.weight.t() if self.is_conv1d else self.weight
        if rows is None:
            return w
        if isinstance(rows, slice):
            return w[rows]
        return w.index_select(0, rows.to(w.device))

    def bias_rows(self, rows: Rows) -> torch.Tensor | None:
        """The base bias restricted to output ``rows`` (``None`` without a bias)."""
        if self.bias is None or rows is None:
            return self.bias
        if isinstance(rows, slice):
            return self.bias[rows]
        return self.bias.index_select(0, rows.to(self.bias.device))

    # -- merging ---------------------------------------------------------------------------------
    def begin_merge(self) -> None:
        """Keep an exact copy of the original weight and bias for :meth:`unmerge_adapter` (at the first
        merge only: later merges add to the weights, and unmerging restores the original)."""
        if self._backup is None:
            self._backup = (self.weight.detach().clone(), None if self.bias is None else self.bias.detach().clone())

    @property
    def is_merged(self) -> bool:
        """Whether some adapter is merged into this projection's weights."""
        return self._backup is not None

    def keep_merged(self) -> None:
        self._backup = None

    def write_weight_rows(self, rows: Rows, new_rows: torch.Tensor) -> None:
        """Overwrite the weight's output ``rows`` with ``new_rows`` (out_rows × in, any float dtype)."""
        index = row_index(rows, self.out_features, self.weight.device)
        with torch.no_grad():
            value = new_rows.to(self.weight.dtype)
            if self.is_conv1d:
                self.weight.index_copy_(1, index, value.t())
            else:
                self.weight.index_copy_(0, index, value)

    def unmerge_adapter(self, name: str) -> None:
        """Restore the original weight (and bias) saved by :meth:`begin_merge`, bit for bit (this undoes
        every merge at this projection)."""
        if self._backup is None:
            return
        weight, bias = self._backup
        with torch.no_grad():
            self.weight.copy_(weight)
            if bias is not None:
                self.bias.copy_(bias)
        self._backup = None

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.is_conv1d else "Linear"
        return f"{kind}(in={self.in_features}, out={self.out_features}), location={self.location}"
