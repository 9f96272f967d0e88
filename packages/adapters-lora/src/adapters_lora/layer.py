"""The LoRA-family layer: a drop-in replacement of an ``nn.Linear`` or GPT-2 ``Conv1D``.

:class:`LoRALinear` takes over the original module's ``weight`` and ``bias`` parameters (the same
tensors, no copy), so the base model's state-dict keys are unchanged, and hosts every LoRA-family
adapter placed at that projection. Each adapter is a small module (:class:`LoRADelta`,
:class:`IA3Scale`, :class:`DoRADelta`) that maps ``(x, y)`` -- the projection's input and output --
to the adapted output. The forward pass is ``y = base(x)`` followed by, for a single active
adapter, one call; other plans go through core's :func:`adapters.plan.execute`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from adapters.errors import AdapterError
from adapters.method import AdapterLayer, AttachSite
from adapters.plan import Leaf, PlanOps, execute
from adapters.points import linear_features
from torch import nn

from .config import LoRAConfig

__all__ = ["LoRALinear", "LoRADelta", "IA3Scale", "DoRADelta"]

Rows = slice | torch.Tensor | None


def _generator(config: LoRAConfig) -> torch.Generator | None:
    if config.init_weights_seed is None:
        return None
    return torch.Generator().manual_seed(int(config.init_weights_seed))


def _init_pair(a: torch.Tensor, b: torch.Tensor, config: LoRAConfig) -> None:
    """Initialise ``A`` and ``B`` on CPU float32 with a private generator (if seeded), then copy."""
    gen = _generator(config)
    a32 = torch.empty(a.shape, dtype=torch.float32)
    b32 = torch.zeros(b.shape, dtype=torch.float32)
    if config.init_weights == "bert":
        a32.normal_(0.0, 0.02, generator=gen)
        b32.normal_(0.0, 0.02, generator=gen)
    elif config.init_weights == "gaussian":
        a32.normal_(0.0, 1.0 / config.r, generator=gen)
    else:
        nn.init.kaiming_uniform_(a32, a=math.sqrt(5), generator=gen)
    with torch.no_grad():
        a.copy_(a32)
        b.copy_(b32)


def _place(y: torch.Tensor, delta: torch.Tensor, rows: Rows) -> torch.Tensor:
    """``y`` plus ``delta`` on the output features ``rows`` (all features when ``None``)."""
    if rows is None:
        return y + delta
    if isinstance(rows, slice):
        parts = []
        if rows.start:
            parts.append(y[..., : rows.start])
        parts.append(y[..., rows] + delta)
        if rows.stop < y.shape[-1]:
            parts.append(y[..., rows.stop:])
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
    return y.index_add(-1, rows, delta)


def _scale_rows(y: torch.Tensor, scale: torch.Tensor, rows: Rows) -> torch.Tensor:
    if rows is None:
        return y * scale
    full = torch.ones(y.shape[-1], dtype=scale.dtype, device=scale.device)
    full = full.index_copy(0, _as_index(rows, y.shape[-1], scale.device), scale)
    return y * full


def _as_index(rows: Rows, width: int, device: torch.device) -> torch.Tensor:
    if rows is None:
        return torch.arange(width, device=device)
    if isinstance(rows, slice):
        return torch.arange(rows.start, rows.stop, device=device)
    return rows.to(device)


class _AdapterBase(nn.Module):
    """Shared plumbing of one adapter at one projection: rows of the output it touches, dropout, gate."""

    def __init__(self, config: LoRAConfig, in_features: int, out_rows: int, rows: Rows,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.config_r = config.r
        self.scaling = config.scaling
        self.rows: Rows = rows
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.gate = nn.Linear(in_features, 1, dtype=dtype, device=device) if config.use_gating else None
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)

    def _gate(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            return delta
        gate = torch.sigmoid(self.gate(x))
        if gate.dim() >= 3:
            gate = gate.mean(dim=-2, keepdim=True)  # one gate per sequence
        return delta * gate


class LoRADelta(_AdapterBase):
    """``y + s·B(A·dropout(x))`` on the selected output rows."""

    def __init__(self, config: LoRAConfig, in_features: int, out_rows: int, rows: Rows,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(config, in_features, out_rows, rows, dtype, device)
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_rows, config.r, dtype=dtype, device=device))
        _init_pair(self.lora_A, self.lora_B, config)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(x) if self.dropout is not None else x
        return self._gate(x, F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling)

    def forward(self, x: torch.Tensor, y: torch.Tensor, layer: LoRALinear) -> torch.Tensor:
        return _place(y, self.delta(x), self.rows)

    def delta_weight(self) -> torch.Tensor:
        """``s·BA`` (out_rows × in), for merging only."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling


class IA3Scale(_AdapterBase):
    """``l ⊙ y`` on the selected output rows; ``l`` starts at ones."""

    def __init__(self, config: LoRAConfig, in_features: int, out_rows: int, rows: Rows,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(config, in_features, out_rows, rows, dtype, device)
        init = torch.ones(out_rows) if config.init_weights == "ia3" else torch.ones(out_rows)
        if config.init_weights in ("bert", "gaussian"):
            init = init + torch.empty(out_rows).normal_(0.0, 0.02, generator=_generator(config))
        self.lora_B = nn.Parameter(init.to(dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, y: torch.Tensor, layer: LoRALinear) -> torch.Tensor:
        return _scale_rows(y, self.lora_B, self.rows)


class DoRADelta(LoRADelta):
    """``m ⊙ (W + s·BA)x / ‖W + s·BA‖_row + b``.

    The row norms are computed from ``‖W‖²`` (constant while ``W`` is frozen), ``W·Aᵀ`` and the
    Gram matrix ``A·Aᵀ``, so the full ``W + s·BA`` is never built in the forward pass.
    """

    def __init__(self, config: LoRAConfig, in_features: int, out_rows: int, rows: Rows,
                 dtype: torch.dtype, device: torch.device, base_rows_weight: torch.Tensor) -> None:
        super().__init__(config, in_features, out_rows, rows, dtype, device)
        norm = base_rows_weight.detach().float().norm(dim=1)
        self.magnitude = nn.Parameter(norm.to(dtype=dtype, device=device))

    def row_norm(self, w_rows: torch.Tensor) -> torch.Tensor:
        a, b, s = self.lora_A, self.lora_B, self.scaling
        w_sq = (w_rows * w_rows).sum(dim=1)
        cross = (b * F.linear(w_rows, a)).sum(dim=1)  # B_i · (W_i Aᵀ)
        gram = F.linear(a, a)  # A Aᵀ (r × r)
        quad = ((b @ gram) * b).sum(dim=1)
        return (w_sq + 2 * s * cross + s * s * quad).clamp_min(1e-12).sqrt()

    def forward(self, x: torch.Tensor, y: torch.Tensor, layer: LoRALinear) -> torch.Tensor:
        w_rows = layer.weight_rows(self.rows).detach()
        factor = self.magnitude / self.row_norm(w_rows).detach()
        bias = layer.bias_rows(self.rows)
        base = _select(y, self.rows)
        if bias is not None:
            base = base - bias
        out = (base + self.delta(x)) * factor
        if bias is not None:
            out = out + bias
        return _replace_rows(y, out, self.rows)

    def merged_rows(self, w_rows: torch.Tensor) -> torch.Tensor:
        new = w_rows.float() + self.delta_weight()
        return new * (self.magnitude.float() / new.norm(dim=1)).unsqueeze(1)


def _select(y: torch.Tensor, rows: Rows) -> torch.Tensor:
    if rows is None:
        return y
    if isinstance(rows, slice):
        return y[..., rows]
    return y.index_select(-1, rows)


def _replace_rows(y: torch.Tensor, new: torch.Tensor, rows: Rows) -> torch.Tensor:
    if rows is None:
        return new
    return y.index_copy(-1, _as_index(rows, y.shape[-1], y.device), new)


class _Ops(PlanOps):
    """LoRA plans run on ``(y, x)``: each adapter maps the output ``y`` to an adapted output."""

    def __init__(self, layer: LoRALinear) -> None:
        self.layer = layer

    def leaf(self, name: str, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        y, x = inputs
        return self.layer.adapters[name](x, y, self.layer)


class LoRALinear(AdapterLayer):
    """A linear projection with LoRA-family adapters. Shares ``weight``/``bias`` with the original."""

    def __init__(self, base: nn.Module, location: str, fused: Any = None) -> None:
        super().__init__(location)
        self.is_conv1d = not isinstance(base, nn.Linear)
        self.in_features, self.out_features = linear_features(base)
        self.weight = base.weight
        self.bias = base.bias
        self.fused = fused
        self._backup: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._ops = _Ops(self)

    # -- base computation ------------------------------------------------------------------------
    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_conv1d:
            shape = x.shape[:-1] + (self.out_features,)
            flat = x.reshape(-1, x.shape[-1])
            out = torch.addmm(self.bias, flat, self.weight) if self.bias is not None else flat @ self.weight
            return out.view(shape)
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)
        plan = self.plan
        if plan is None:
            return y
        if type(plan) is Leaf:
            return self.adapters[plan.name](x, y, self)
        return execute(plan, (y, x), self._ops)

    def weight_rows(self, rows: Rows) -> torch.Tensor:
        """The base weight as (out × in), restricted to output ``rows``."""
        w = self.weight.t() if self.is_conv1d else self.weight
        if rows is None:
            return w
        if isinstance(rows, slice):
            return w[rows]
        return w.index_select(0, rows.to(w.device))

    def bias_rows(self, rows: Rows) -> torch.Tensor | None:
        if self.bias is None or rows is None:
            return self.bias
        if isinstance(rows, slice):
            return self.bias[rows]
        return self.bias.index_select(0, rows.to(self.bias.device))

    # -- adapters --------------------------------------------------------------------------------
    def add_adapter(self, name: str, config: LoRAConfig, site: AttachSite) -> None:
        self.adapters[name] = self._build(config, site, None)

    def add_fused_or_plain(self, name: str, config: LoRAConfig, site: AttachSite, rows: Rows,
                           which: str | None) -> None:
        """Add adapter ``name``; for a fused projection, its part for matrix ``which`` on output ``rows``."""
        if which is None:
            self.add_adapter(name, config, site)
            return
        if name not in self.adapters:
            self.adapters[name] = FusedParts()
        self.adapters[name].parts[which] = self._build(config, site, rows)

    def _build(self, config: LoRAConfig, site: AttachSite, rows: Rows) -> nn.Module:
        dtype = site.dtype_for(self.weight, config)
        device = self.weight.device
        out_rows = self.out_features if rows is None else _count(rows)
        if isinstance(rows, torch.Tensor):
            rows = rows.to(device)
        if config.composition_mode == "scale":
            module: nn.Module = IA3Scale(config, self.in_features, out_rows, rows, dtype, device)
        elif config.use_dora:
            module = DoRADelta(config, self.in_features, out_rows, rows, dtype, device, self.weight_rows(rows))
        else:
            module = LoRADelta(config, self.in_features, out_rows, rows, dtype, device)
        return module

    # -- merging ---------------------------------------------------------------------------------
    def merge_adapter(self, name: str) -> None:
        self._backup = (self.weight.detach().clone(), None if self.bias is None else self.bias.detach().clone())
        try:
            for unit in _units(self.adapters[name]):
                self._merge_unit(unit)
        except BaseException:
            self.unmerge_adapter(name)
            raise

    def _merge_unit(self, module: nn.Module) -> None:
        rows = module.rows
        index = _as_index(rows, self.out_features, self.weight.device)
        with torch.no_grad():
            w = self.weight_rows(rows).float()
            if isinstance(module, IA3Scale):
                new_w = w * module.lora_B.float().unsqueeze(1)
                if self.bias is not None:
                    self.bias.index_copy_(0, index, (self.bias_rows(rows).float() * module.lora_B.float())
                                          .to(self.bias.dtype))
            elif isinstance(module, DoRADelta):
                new_w = module.merged_rows(w)  # DoRA leaves the bias as it is
            else:
                if module.gate is not None:
                    raise AdapterError("A gated LoRA adapter cannot be merged: its gate depends on the input.")
                new_w = w + module.delta_weight()
            new_w = new_w.to(self.weight.dtype)
            if self.is_conv1d:
                self.weight.index_copy_(1, index, new_w.t())
            else:
                self.weight.index_copy_(0, index, new_w)

    def unmerge_adapter(self, name: str) -> None:
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


class FusedParts(nn.Module):
    """One adapter on a fused QKV projection: a part per adapted matrix, each on its own rows."""

    def __init__(self) -> None:
        super().__init__()
        self.parts = nn.ModuleDict()

    def forward(self, x: torch.Tensor, y: torch.Tensor, layer: LoRALinear) -> torch.Tensor:
        for part in self.parts.values():
            y = part(x, y, layer)
        return y


def _units(module: nn.Module) -> list[nn.Module]:
    return list(module.parts.values()) if isinstance(module, FusedParts) else [module]


def _count(rows: Rows) -> int:
    if isinstance(rows, slice):
        return rows.stop - rows.start
    return int(rows.numel())
