"""Compiling a composition setup into per-layer plans: one immutable :class:`PlanTable` per setup and
model, a plan per adapter layer restricted to the adapters that layer hosts (an absent or merged
adapter is identity there). :class:`~adapters.state.AdapterState` caches the tables under the setup's
value; :mod:`adapters.plan` runs the plans."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import composition as ac
from .errors import CompositionError
from .method import AdapterLayer
from .plan import (
    IDENTITY,
    AveragePlan,
    BatchSplitPlan,
    FusePlan,
    Leaf,
    MultiTaskPlan,
    ParallelPlan,
    PlanNode,
    SplitPlan,
    StackPlan,
)

__all__ = ["PlanTable", "compile_table", "setup_adapter_names"]


@dataclass(frozen=True)
class PlanTable:
    """One setup compiled for one model: a plan per adapter layer (indexed by the layer's slot) and
    what a forward call of that setup needs from the pre-hook."""

    setup: Any
    plans: tuple[PlanNode | None, ...]
    parallel: int
    task_names: tuple[str, ...] | None
    needs_context: bool


def setup_adapter_names(setup: ac.AdapterCompositionBlock | str) -> list[str]:
    return [setup] if isinstance(setup, str) else setup.flatten()


def _restrict(node: ac.AdapterCompositionBlock | str, layer: AdapterLayer, merged: list[str]) -> PlanNode | None:
    plan = _restrict_node(node, layer, merged)
    return None if plan is IDENTITY else plan


def _restrict_node(node: ac.AdapterCompositionBlock | str, layer: AdapterLayer, merged: list[str]) -> PlanNode:
    if isinstance(node, str):
        return Leaf(node) if node in layer.adapters and node not in merged else IDENTITY
    children = tuple(_restrict_node(c, layer, merged) for c in node.children)
    if isinstance(node, ac.Stack):
        kept = tuple(c for c in children if c is not IDENTITY)
        if not kept:
            return IDENTITY
        return kept[0] if len(kept) == 1 else StackPlan(kept)
    if all(c is IDENTITY for c in children):
        return IDENTITY
    if isinstance(node, ac.Average):
        return AveragePlan(children, tuple(node.weights))
    if isinstance(node, ac.BatchSplit):
        return BatchSplitPlan(children, tuple(node.batch_sizes))
    if isinstance(node, ac.Split):
        return SplitPlan(children, tuple(node.splits))
    if isinstance(node, ac.Parallel):
        return ParallelPlan(children)
    if isinstance(node, ac.MultiTask):
        return MultiTaskPlan(children, tuple(c if isinstance(c, str) else c.name for c in node.children))
    if isinstance(node, ac.Fuse):
        return FusePlan(children, node.fusion_name)
    raise CompositionError(f"Unknown composition block {node!r}")


def compile_table(setup: ac.AdapterCompositionBlock | str | None, layers: list[AdapterLayer], merged: list[str],
                  needs_context: bool) -> PlanTable:
    """The :class:`PlanTable` of a validated ``setup`` on ``layers`` (in slot order); ``needs_context``:
    a method of the setup reads the call's context."""
    plans = tuple(None if setup is None else _restrict(setup, layer, merged) for layer in layers)
    parallel = len(setup) if isinstance(setup, ac.Parallel) else 1
    tasks = (tuple(c if isinstance(c, str) else c.name for c in setup.children)
             if isinstance(setup, ac.MultiTask) else None)
    return PlanTable(setup, plans, parallel, tasks, parallel > 1 or tasks is not None or needs_context)
