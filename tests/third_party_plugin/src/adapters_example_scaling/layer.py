"""The adapter layer of ``channel_scale``: a linear projection whose output is scaled per channel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adapters.method import AdapterLayer, AttachSite
from adapters.plan import Leaf, PlanOps, execute
from adapters.points import linear_features

from .config import ChannelScaleConfig

__all__ = ["ChannelScale", "ScaledLinear"]


class ChannelScale(nn.Module):
    """The parameters of one adapter at one projection: ``scale`` (one entry per output channel)."""

    def __init__(self, width: int, init: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((width,), float(init), dtype=dtype, device=device))


class _Ops(PlanOps):
    """Composition plans: a leaf scales the projection output by that adapter's scale."""

    def __init__(self, layer: ScaledLinear) -> None:
        self.layer = layer

    def leaf(self, name: str, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return inputs[0] * self.layer.adapters[name].scale


class ScaledLinear(AdapterLayer):
    """Replaces an ``nn.Linear`` (or GPT-2 ``Conv1D``), sharing its ``weight`` and ``bias`` tensors."""

    def __init__(self, base: nn.Module, location: str) -> None:
        super().__init__(location)
        self.is_conv1d = not isinstance(base, nn.Linear)
        self.in_features, self.out_features = linear_features(base)
        self.weight = base.weight
        self.bias = base.bias
        self._ops = _Ops(self)
        self._backup: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def add_adapter(self, name: str, config: ChannelScaleConfig, site: AttachSite) -> None:
        """Create adapter ``name``'s scales."""
        dtype = site.dtype_for(self.weight, config)
        self.adapters[name] = ChannelScale(self.out_features, config.init_scale, dtype, self.weight.device)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The original projection."""
        if self.is_conv1d:
            flat = x.reshape(-1, x.shape[-1])
            out = torch.addmm(self.bias, flat, self.weight) if self.bias is not None else flat @ self.weight
            return out.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x)`` when inactive; scaled by the active adapter(s) otherwise."""
        y = self.base_forward(x)
        plan = self.plan
        if plan is None:
            return y
        if type(plan) is Leaf:
            return y * self.adapters[plan.name].scale
        return execute(plan, (y,), self._ops)

    def merge_adapter(self, name: str) -> None:
        """Fold the scales into the weight and bias: ``W ← diag(s) W``, ``b ← s ⊙ b``."""
        self._backup = (self.weight.detach().clone(), None if self.bias is None else self.bias.detach().clone())
        s = self.adapters[name].scale.detach().to(self.weight.dtype)
        with torch.no_grad():
            self.weight.mul_(s.unsqueeze(0) if self.is_conv1d else s.unsqueeze(1))
            if self.bias is not None:
                self.bias.mul_(s.to(self.bias.dtype))

    def unmerge_adapter(self, name: str) -> None:
        """Restore the weights saved by :meth:`merge_adapter` exactly."""
        if self._backup is None:
            return
        weight, bias = self._backup
        with torch.no_grad():
            self.weight.copy_(weight)
            if bias is not None:
                self.bias.copy_(bias)
        self._backup = None

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, location={self.location}"
