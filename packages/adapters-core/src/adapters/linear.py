"""Shared machinery for methods that adapt linear projections (LoRA family, VeRA, third parties).

Where such adapters go is :mod:`adapters.targets`; this module is what replaces a projection:

* :class:`AdapterLinear`: the base of layers that replace an ``nn.Linear`` or GPT-2 ``Conv1D``
  and take over its ``weight`` and ``bias`` (the same Parameter objects, so base state-dict keys
  do not change), with the base computation, row access for fused projections, and exact
  merge / reset bookkeeping.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import AdapterError
from .method import AdapterLayer
from .points import linear_features

__all__ = [
    "Rows",
    "AdapterLinear",
    "is_linear_like",
    "count_rows",
    "row_index",
    "param",
    "FusedParts",
]

#: Output features of a projection an adapter acts on: all (``None``), a slice, or an index tensor.
Rows = slice | torch.Tensor | None


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
