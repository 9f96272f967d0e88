"""The VeRA method: where its layers go on a model, and what it supports."""

from __future__ import annotations

from typing import ClassVar

from adapters.plugin import (
    LINEAR_HOOK_POINTS,
    AdapterError,
    AdapterMethod,
    AttachSite,
    LinearTarget,
    ModelPoints,
    adapter_dtype_at,
    check_linear_placement,
    linear_targets,
)

from .config import VeraConfig
from .formats import read_peft_vera, save_peft_vera
from .layer import VeraLinear, VeraProjections

__all__ = ["VeraMethod"]


class VeraMethod(AdapterMethod):
    """VeRA on attention projections (separate or fused q|k|v) and FFN projections."""

    name: ClassVar[str] = "vera"
    config_classes = (VeraConfig,)
    presets = {"vera": VeraConfig}
    supported_blocks = frozenset({"Stack", "BatchSplit", "Average", "MultiTask", "Parallel"})
    hook_points = LINEAR_HOOK_POINTS
    can_merge = True
    formats = {"peft": (read_peft_vera, save_peft_vera)}

    def validate(self, config: VeraConfig, points: ModelPoints) -> None:
        check_linear_placement(config, points, "VeRA")
        self.targets(points, config)  # every target must be a linear projection VeRA may wrap

    def targets(self, points: ModelPoints, config: VeraConfig) -> list[LinearTarget]:
        """Every projection (part) the config adapts, in a fixed order; changes nothing."""
        return linear_targets(points, config, "VeRA", VeraLinear)

    def attach(self, site: AttachSite, name: str, config: VeraConfig) -> None:
        targets = self.targets(site.points, config)
        if not targets:
            raise AdapterError("This VeRA config adapts no projection of this model (check leave_out).")
        max_in = max(t.in_features for t in targets)
        max_out = max(t.out_rows for t in targets)
        reference = targets[0].point.module.weight
        dtype = adapter_dtype_at(site, targets[0].point.module, config)  # the compute dtype on a quantized base
        projections = site.shared(
            "projections", lambda: VeraProjections(config, max_in, max_out, dtype, reference.device))
        if (projections.max_in, projections.max_out, projections.r) != (max_in, max_out, config.r):
            raise AdapterError(f"Adapter '{name}' already has VeRA projections of another shape; one adapter "
                               "can hold only one VeRA config.")
        for t in targets:
            layer = site.replace(t.point, VeraLinear,
                                 lambda original, t=t: VeraLinear(original, t.point.location, t.fused))
            layer.add_part(name, config, site, projections, t.rows, t.which)
            for alias in t.aliases:
                site.alias(alias, layer)
