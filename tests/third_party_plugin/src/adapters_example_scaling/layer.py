"""The adapter layer of ``channel_scale``: a linear projection whose output is scaled per channel."""

from __future__ import annotations

import torch
from torch import nn

from adapters.plugin import AdapterLinear, AttachSite

from .config import ChannelScaleConfig

__all__ = ["ChannelScale", "ScaledLinear"]


class ChannelScale(nn.Module):
    """The parameters of one adapter at one projection: ``scale`` (one entry per output channel)."""

    def __init__(self, width: int, init: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((width,), float(init), dtype=dtype, device=device))


class ScaledLinear(AdapterLinear):
    """Replaces an ``nn.Linear`` (or GPT-2 ``Conv1D``); core's :class:`~adapters.linear.AdapterLinear`
    shares its ``weight`` and ``bias`` tensors, runs the original projection (``base_forward``) and keeps
    the exact backup that ``unmerge_adapter`` restores."""

    def add_adapter(self, name: str, config: ChannelScaleConfig, site: AttachSite) -> None:
        """Create adapter ``name``'s scales."""
        dtype = site.dtype_for(self.weight, config)
        self.adapters[name] = ChannelScale(self.out_features, config.init_scale, dtype, self.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x)`` when inactive; scaled by the active adapter(s) otherwise."""
        return self.run_plan(self.plan, (self.base_forward(x),))

    def leaf(self, name: str, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """One adapter on the (routed) output: ``y ⊙ s``. ``Stack`` multiplies scales, ``Average``
        averages the scaled outputs (core's defaults)."""
        return inputs[0] * self.adapters[name].scale

    def merge_adapter(self, name: str) -> None:
        """Fold the scales into the weight and bias: ``W ← diag(s) W``, ``b ← s ⊙ b``."""
        self.begin_merge()
        s = self.adapters[name].scale.detach().to(self.weight.dtype)
        with torch.no_grad():
            self.weight.mul_(s.unsqueeze(0) if self.is_conv1d else s.unsqueeze(1))
            if self.bias is not None:
                self.bias.mul_(s.to(self.bias.dtype))
