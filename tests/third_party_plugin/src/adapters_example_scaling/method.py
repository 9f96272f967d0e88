"""The ``channel_scale`` method: where its layers go and what it supports."""

from __future__ import annotations

from typing import ClassVar

from adapters.plugin import AdapterError, AdapterMethod, AttachSite, ModelPoints

from .config import ChannelScaleConfig
from .layer import ScaledLinear

__all__ = ["ChannelScaleMethod"]


class ChannelScaleMethod(AdapterMethod):
    """Learned per-channel scaling of each layer's FFN output projection (``layer_output_proj``)."""

    name: ClassVar[str] = "channel_scale"
    config_classes = (ChannelScaleConfig,)
    presets = {"channel_scale": ChannelScaleConfig}
    supported_blocks = frozenset({"Stack", "BatchSplit", "Split", "Parallel", "Average", "MultiTask"})
    hook_points = frozenset({"layer_output_proj"})
    can_merge = True

    def validate(self, config: ChannelScaleConfig, points: ModelPoints) -> None:
        """Refuse models whose interface names no FFN output projection."""
        if not points.interface.layer_output_proj:
            raise AdapterError("channel_scale needs the interface field layer_output_proj (the FFN output "
                               "projection); this model's interface has none.")

    def attach(self, site: AttachSite, name: str, config: ChannelScaleConfig) -> None:
        """Wrap every layer's FFN output projection (except ``leave_out``) and add the scales."""
        leave_out = set(config.leave_out)
        for lp in site.points.layers:
            if lp.index in leave_out or lp.output is None:
                continue
            point = lp.output
            layer = site.replace(point, ScaledLinear, lambda original, p=point: ScaledLinear(original, p.location))
            layer.add_adapter(name, config, site)
