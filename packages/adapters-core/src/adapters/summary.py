"""``adapter_summary``: what a model's adapters are, how big, whether active, trained or merged."""

from __future__ import annotations

from typing import Any

from torch import nn

from .composition import fusion_names
from .quantized import logical_numel
from .state import setup_adapter_names
from .trainability import unique_parameters

__all__ = ["adapter_summary"]


def adapter_summary(self: nn.Module, as_dict: bool = False) -> str | list[dict[str, Any]]:
    """A table of adapters: name, method, #params, % of the base model, active, trainable.

    After the adapters (and fusion layers) come ``Task head`` (parameters outside the base
    model, such as ``classifier``; only when there are any) and ``Full model`` (the base model;
    ``train`` tells whether any of its own weights train).
    """
    state = self._adapters_state
    adapter_ids = state.owned_parameter_ids()
    base_params = [p for p in unique_parameters(self) if id(p) not in adapter_ids]
    base_count = sum(logical_numel(p) for p in base_params)  # a 4-bit weight counts its weights, not bytes
    inner_ids = {id(p) for p in state.points.base_model.parameters()}
    head_params = [p for p in base_params if id(p) not in inner_ids]
    inner_params = [p for p in base_params if id(p) in inner_ids]
    active = set(setup_adapter_names(state.active)) if state.active is not None else set()
    active_fusions = fusion_names(state.active)

    def row(name: str, method: str, params: list, active: bool, merged: bool = False) -> dict[str, Any]:
        count = sum(logical_numel(p) for p in params)
        share = 100.0 * count / base_count if base_count else 0.0
        return {"name": name, "method": method, "#params": count, "%params": share, "active": active,
                "train": any(p.requires_grad for p in params), "merged": merged}

    rows = [row(name, "+".join(c.label for c in record.config.configs), state.adapter_parameters(name), name in active,
                name in state.merged) for name, record in state.adapters.items()]
    rows += [row(f"Fuse[{fusion_name}]", f"{fusion.method.name}-fusion", state.fusion_parameters(fusion_name),
                 fusion_name in active_fusions) for fusion_name, fusion in state.fusions.items()]
    if head_params:
        rows.append(row("Task head", "", head_params, True))
    # the whole model's size, but "train" asks about the base model's own weights only
    rows.append({**row("Full model", "", inner_params, True), "#params": base_count, "%params": 100.0})
    if as_dict:
        return rows
    header = f"{'Name':<24}{'Architecture':<20}{'#Param':>12}{'%Param':>10}  {'Active':<7}{'Train':<6}"
    lines = ["=" * len(header), header, "-" * len(header)]
    footer = False
    for entry in rows:
        if entry["name"] in ("Task head", "Full model") and not footer:
            lines.append("-" * len(header))
            footer = True
        flag = " (merged)" if entry["merged"] else ""
        lines.append(
            f"{entry['name'][:23]:<24}{entry['method'][:19]:<20}{entry['#params']:>12,}{entry['%params']:>10.3f}  "
            f"{entry['active']!s:<7}{entry['train']!s:<6}{flag}"
        )
    lines.append("=" * len(header))
    return "\n".join(lines)
