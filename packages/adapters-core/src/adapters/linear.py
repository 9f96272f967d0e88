"""Shared machinery for methods that adapt linear projections (LoRA family, VeRA, third parties).

Where such adapters go is :mod:`adapters.targets`; this module is what replaces a projection:

* :class:`AdapterLinear`: the base of layers that replace an ``nn.Linear`` or GPT-2 ``Conv1D``
  and take over its ``weight`` and ``bias`` (the same Parameter objects, so base state-dict keys
  do not change), with the base computation, row access for fused projections, and exact
  merge / reset bookkeeping. A *quantized* projection (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``,
  a torchao weight: :mod:`adapters.quantized`) is kept whole as the ``base_layer`` child and called
  for the base computation; its weight is dequantized only transiently (DoRA norms, merging).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import quantized
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
    scales_input = False  # nor does IA3 on the input apply to parts

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


_BASE = "base_layer"


def _shared_parameter(name: str) -> property:
    """``weight`` / ``bias`` of an :class:`AdapterLinear`: the registered (shared) Parameter; a plain tensor
    put in its place (FSDP1's flat-parameter views: kept in ``__dict__``); else the quantized
    ``base_layer``'s current one (merging a quantized weight replaces that Parameter object)."""

    def get(self: nn.Module) -> Any:
        params = self._parameters
        if name in params:
            return params[name]
        if name in self.__dict__:
            return self.__dict__[name]
        base = self._modules.get(_BASE)
        if base is None:
            raise AttributeError(name)
        return getattr(base, name)

    def put(self: nn.Module, value: Any) -> None:  # nn.Module.__setattr__ registers Parameters itself
        self.__dict__[name] = value

    def delete(self: nn.Module) -> None:
        if name not in self.__dict__:
            raise AttributeError(name)
        del self.__dict__[name]

    return property(get, put, delete)


class AdapterLinear(AdapterLayer):
    """Base of layers replacing an ``nn.Linear`` / ``Conv1D``; shares its ``weight`` and ``bias``.

    Subclasses add adapters and a ``forward``; :meth:`base_forward` is exactly the original module's
    computation. Merging writes into the shared weight through :meth:`write_weight_rows` after
    :meth:`begin_merge` saved an exact backup, which :meth:`unmerge_adapter` restores.

    A quantized projection (``self.quantization`` is its kind, see :mod:`adapters.quantized`; ``None``
    for a float one) stays one module, the child ``base_layer``: :meth:`base_forward` calls it (its own
    kernel), ``weight`` / ``bias`` read its current parameters, :meth:`dequantized_weight` gives a
    transient float copy, merging dequantizes, adds and re-quantizes (a warning says outputs round) or
    refuses (torchao), and reset puts the original quantized weight back bit for bit. Its state-dict
    keys are written and read without the ``base_layer.`` step, so the model's keys do not change.
    """

    def __init__(self, base: nn.Module, location: str, fused: Any = None) -> None:
        super().__init__(location)
        kind = quantized.quantization_kind(base)
        if kind is None and not is_linear_like(base):
            raise AdapterError(f"{type(self).__name__} can only wrap nn.Linear or Conv1D projections; {location} "
                               f"holds a {type(base).__name__} (is another method's layer already there?).")
        self.quantization = kind
        self.is_conv1d = kind is None and not isinstance(base, nn.Linear)
        self.in_features, self.out_features = linear_features(base)
        if kind is None:
            self.weight = base.weight
            if base.bias is None:  # registered as None (as nn.Linear does): the property never reads __dict__,
                self.register_parameter("bias", None)  # which dynamo cannot trace (infinite recursion)
            else:
                self.bias = base.bias
        else:
            if kind == quantized.BNB_4BIT:  # never bitsandbytes' CPU inference layout: it computes no gradients
                quantized.keep_training_kernels(base)
            self.base_layer = base
        self.fused = fused
        self._backup: Any = None

    weight = _shared_parameter("weight")
    bias = _shared_parameter("bias")

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Exactly the wrapped module's computation.

        ``weight`` and ``bias`` are read with :func:`param` (no ``nn.Module.__getattr__``, which
        costs microseconds a call on every projection of a small-batch forward). A quantized base is
        called (``forward``: its hooks moved to this layer when it was replaced).
        """
        if self.quantization is not None:
            return self._modules[_BASE].forward(x)
        weight, bias = param(self, "weight"), param(self, "bias")
        if self.is_conv1d:
            flat = x.reshape(-1, x.shape[-1])
            out = torch.addmm(bias, flat, weight) if bias is not None else flat.mm(weight)
            return out.view(*x.shape[:-1], self.out_features)
        return F.linear(x, weight, bias)

    def adapter_dtype(self, site: Any, config: Any = None) -> torch.dtype:
        """The dtype of new adapter weights here: ``config.dtype`` if set, else the base weight's dtype;
        for a quantized base its compute dtype (the 4-bit ``bnb_4bit_compute_dtype``, a torchao tensor's
        dtype, the bias'), else the dtype of the model's float weights, float32 where that is float16
        (:func:`adapters.quantized.adapter_dtype_at`)."""
        if self.quantization is None:
            return site.dtype_for(self.weight, config)
        return quantized.adapter_dtype_at(site, self, config)

    def dequantized_weight(self) -> torch.Tensor:
        """The base weight as a float ``(out × in)`` tensor: the weight itself for a float projection (a view
        for ``Conv1D``), a transient dequantized copy for a quantized one (never kept, no autograd graph).

        :raises AdapterError: a quantized weight of unknown format.
        """
        if self.quantization is None:
            return self.weight.t() if self.is_conv1d else self.weight
        return quantized.dequantize(self._modules[_BASE], self.quantization)

    def weight_key(self) -> tuple:
        """A value that changes whenever the base weight does (in-place writes, merges, re-quantization,
        bitsandbytes' CPU repacking): for caches of quantities derived from it (DoRA's row norms)."""
        w = self.weight
        return (id(w), w._version, w.data_ptr(), w.dtype, w.device)

    def weight_rows(self, rows: Rows) -> torch.Tensor:
        """The base weight as (out × in), restricted to output ``rows`` (dequantized when quantized)."""
        w = self.dequantized_weight()
        if rows is None:
            return w
        if isinstance(rows, slice):
            return w[rows]
        return w.index_select(0, rows.to(w.device))

    def bias_rows(self, rows: Rows) -> torch.Tensor | None:
        """The base bias restricted to output ``rows`` (``None`` without a bias)."""
        bias = self.bias
        if bias is None or rows is None:
            return bias
        if isinstance(rows, slice):
            return bias[rows]
        return bias.index_select(0, rows.to(bias.device))

    # -- merging ---------------------------------------------------------------------------------
    def begin_merge(self) -> None:
        """Keep an exact copy of the original weight and bias for :meth:`unmerge_adapter` (at the first
        merge only: later merges add to the weights, and unmerging restores the original). A quantized
        base keeps its original quantized weight object instead of a copy, and warns that the merge
        rounds.

        :raises AdapterError: a quantized base that cannot be re-quantized (torchao); nothing changed.
        """
        if self.quantization is not None:
            base = self._modules[_BASE]
            quantized.check_merge(base, self.quantization, self.location)
            if self._backup is None:
                self._backup = quantized.snapshot(base, self.quantization)
            return
        if self._backup is None:
            self._backup = (self.weight.detach().clone(), None if self.bias is None else self.bias.detach().clone())

    @property
    def is_merged(self) -> bool:
        """Whether some adapter is merged into this projection's weights."""
        return self._backup is not None

    def keep_merged(self) -> None:
        self._backup = None

    def write_weight_rows(self, rows: Rows, new_rows: torch.Tensor) -> None:
        """Overwrite the weight's output ``rows`` with ``new_rows`` (out_rows × in, any float dtype). A
        quantized weight is dequantized, overwritten and quantized again (a new Parameter object)."""
        if self.quantization is not None:
            with torch.no_grad():
                full = self.dequantized_weight().float()
                index = row_index(rows, self.out_features, full.device)
                full.index_copy_(0, index, new_rows.to(device=full.device, dtype=full.dtype))
                quantized.requantize(self._modules[_BASE], self.quantization, full)
            return
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
        if self.quantization is not None:
            quantized.restore(self._modules[_BASE], self.quantization, self._backup)
            self._backup = None
            return
        weight, bias = self._backup
        with torch.no_grad():
            self.weight.copy_(weight)
            if bias is not None:
                self.bias.copy_(bias)
        self._backup = None

    # -- state dict: a quantized child's keys without the ``base_layer.`` step ---------------------
    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        out = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if self.quantization is not None:
            inner = f"{prefix}{_BASE}."
            for key in [k for k in out if k.startswith(inner)]:
                out[prefix + key[len(inner):]] = out.pop(key)
        return out

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        if self.quantization is not None:
            own = set(self._modules) | set(self._parameters) | set(self._buffers)
            for key in [k for k in state_dict if k.startswith(prefix)]:
                if key[len(prefix):].split(".", 1)[0] not in own:
                    state_dict[f"{prefix}{_BASE}.{key[len(prefix):]}"] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.is_conv1d else "Linear"
        quant = f", quantized={self.quantization}" if self.quantization is not None else ""
        return f"{kind}(in={self.in_features}, out={self.out_features}){quant}, location={self.location}"
