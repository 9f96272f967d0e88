"""The VeRA method: where its layers go on a model, and what it supports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from adapters.errors import AdapterError
from adapters.method import AdapterMethod, AttachSite
from adapters.points import FusedQKV, ModelPoints, ModulePoint, linear_features

from .config import VeraConfig
from .layer import Rows, VeraLinear, VeraProjections, is_linear_like

__all__ = ["VeraMethod"]


@dataclass
class _Target:
    """One place to adapt: a projection, and for a fused one the matrix and its output rows."""

    point: ModulePoint
    fused: FusedQKV | None
    rows: Rows
    which: str | None
    in_features: int
    out_rows: int


def _features(point: ModulePoint) -> tuple[int, int, torch.nn.Parameter]:
    module = point.module
    if isinstance(module, VeraLinear):
        return module.in_features, module.out_features, module.weight
    if not is_linear_like(module):
        raise AdapterError(f"VeRA can only adapt nn.Linear or Conv1D projections; '{point.path}' is a "
                           f"{type(module).__name__} (another method's layer may already wrap it).")
    in_f, out_f = linear_features(module)
    return in_f, out_f, module.weight


class VeraMethod(AdapterMethod):
    """VeRA on attention projections (separate or fused q|k|v) and FFN projections."""

    name: ClassVar[str] = "vera"
    config_classes = (VeraConfig,)
    presets = {"vera": VeraConfig}
    supported_blocks = frozenset({"Stack", "BatchSplit", "Average", "MultiTask", "Parallel"})
    hook_points = frozenset({"attn_q_proj", "attn_k_proj", "attn_v_proj", "attn_qkv_proj", "attn_o_proj",
                             "layer_intermediate_proj", "layer_output_proj", "layer_self_attn", "layer_cross_attn"})
    can_merge = True

    def validate(self, config: VeraConfig, points: ModelPoints) -> None:
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
            raise AdapterError(f"VeRA attn_matrices {missing} have no projection in this model's interface; "
                               f"available: {sorted(have)}.")
        if config.intermediate_lora and not interface.layer_intermediate_proj:
            raise AdapterError("intermediate_lora=True, but the interface names no layer_intermediate_proj.")
        if config.output_lora and not interface.layer_output_proj:
            raise AdapterError("output_lora=True, but the interface names no layer_output_proj.")
        if not (wanted or config.intermediate_lora or config.output_lora):
            raise AdapterError("This VeRA config adapts nothing: enable selfattn_lora with attn_matrices, "
                               "intermediate_lora or output_lora.")

    def targets(self, points: ModelPoints, config: VeraConfig) -> list[_Target]:
        """Every projection (part) the config adapts, in a fixed order; changes nothing."""
        out: list[_Target] = []
        leave_out = set(config.leave_out)

        def plain(point: ModulePoint | None) -> None:
            if point is None:
                return
            in_f, out_f, _ = _features(point)
            out.append(_Target(point, None, None, None, in_f, out_f))

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
                        in_f, _, _ = _features(attn.qkv)
                        for which in chosen:
                            rows = attn.fused.index(which)
                            count = rows.stop - rows.start if isinstance(rows, slice) else int(rows.numel())
                            out.append(_Target(attn.qkv, attn.fused, rows, which, in_f, count))
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

    def attach(self, site: AttachSite, name: str, config: VeraConfig) -> None:
        targets = self.targets(site.points, config)
        if not targets:
            raise AdapterError("This VeRA config adapts no projection of this model (check leave_out).")
        max_in = max(t.in_features for t in targets)
        max_out = max(t.out_rows for t in targets)
        reference = _features(targets[0].point)[2]
        dtype = site.dtype_for(reference, config)
        projections = site.shared(
            "projections", lambda: VeraProjections(config, max_in, max_out, dtype, reference.device))
        if (projections.max_in, projections.max_out, projections.r) != (max_in, max_out, config.r):
            raise AdapterError(f"Adapter '{name}' already has VeRA projections of another shape; one adapter "
                               "can hold only one VeRA config.")
        for t in targets:
            layer = site.replace(t.point, VeraLinear,
                                 lambda original, t=t: VeraLinear(original, t.point.location, t.fused))
            layer.add_part(name, config, site, projections, t.rows, t.which)
