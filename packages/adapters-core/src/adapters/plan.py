"""Per-layer activation plans and their generic interpreter.

Compiling a setup turns it, for every adapter layer, into a small immutable tree of plan
nodes restricted to the adapters that layer hosts (an adapter absent from the layer becomes
:data:`IDENTITY`). Adapter layers read theirs with ``AdapterLayer.active_plan()`` in
``forward``; the common case, one adapter, is a :class:`Leaf` that a layer handles on a
straight-line fast path. Plans are immutable values holding adapter names only (never a module),
so a table of them can be shared by threads and ``nn.DataParallel`` replicas. :func:`execute`
interprets the other nodes: the row and position routing of ``BatchSplit``, ``Split``, ``Parallel`` and
``MultiTask`` is the same for every method, so it lives here; what a leaf, a stack or a fusion
means is the method's business (:class:`PlanOps`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .context import current_context

__all__ = [
    "PlanNode",
    "Leaf",
    "Identity",
    "IDENTITY",
    "StackPlan",
    "AveragePlan",
    "BatchSplitPlan",
    "SplitPlan",
    "ParallelPlan",
    "MultiTaskPlan",
    "FusePlan",
    "PlanOps",
    "execute",
]


class PlanNode:
    """Base of plan nodes."""

    def leaves(self) -> list[str]:
        return []


@dataclass(frozen=True)
class Leaf(PlanNode):
    name: str

    def leaves(self) -> list[str]:
        return [self.name]


@dataclass(frozen=True)
class Identity(PlanNode):
    """An adapter this layer does not host: the input passes unchanged."""


IDENTITY = Identity()


@dataclass(frozen=True)
class _Group(PlanNode):
    children: tuple[PlanNode, ...]

    def leaves(self) -> list[str]:
        return [n for c in self.children for n in c.leaves()]


@dataclass(frozen=True)
class StackPlan(_Group):
    pass


@dataclass(frozen=True)
class AveragePlan(_Group):
    weights: tuple[float, ...] = ()


@dataclass(frozen=True)
class BatchSplitPlan(_Group):
    sizes: tuple[int, ...] = ()


@dataclass(frozen=True)
class SplitPlan(_Group):
    splits: tuple[int, ...] = ()


@dataclass(frozen=True)
class ParallelPlan(_Group):
    pass


@dataclass(frozen=True)
class MultiTaskPlan(_Group):
    tasks: tuple[str, ...] = ()


@dataclass(frozen=True)
class FusePlan(_Group):
    fusion: str = ""


Run = Callable[[PlanNode, tuple[torch.Tensor, ...]], torch.Tensor]


class PlanOps:
    """What a method defines for :func:`execute`. ``inputs[0]`` is the tensor being adapted;
    other inputs (e.g. a residual stream) are routed along with it (batch-first tensors)."""

    def leaf(self, name: str, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        raise NotImplementedError

    def identity(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return inputs[0]

    def stack(self, node: StackPlan, inputs: tuple[torch.Tensor, ...], run: Run) -> torch.Tensor:
        """Default: each child runs on the previous child's output."""
        out = inputs[0]
        for child in node.children:
            out = run(child, (out, *inputs[1:]))
        return out

    def average(self, node: AveragePlan, inputs: tuple[torch.Tensor, ...], run: Run) -> torch.Tensor:
        out = None
        for weight, child in zip(node.weights, node.children):
            part = run(child, inputs) * weight
            out = part if out is None else out + part
        return out

    def fuse(self, node: FusePlan, inputs: tuple[torch.Tensor, ...], run: Run) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not support Fuse.")


def _split_rows(inputs: tuple[torch.Tensor, ...], sizes: list[int]) -> list[tuple[torch.Tensor, ...]]:
    parts = [torch.split(t, sizes, dim=0) for t in inputs]
    return [tuple(p[i] for p in parts) for i in range(len(sizes))]


def execute(node: PlanNode, inputs: tuple[torch.Tensor, ...], ops: PlanOps) -> torch.Tensor:
    """Interpret ``node`` on ``inputs`` with the method's ``ops``; return the adapted tensor."""

    def run(n: PlanNode, ins: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if isinstance(n, Leaf):
            return ops.leaf(n.name, ins)
        if isinstance(n, Identity):
            return ops.identity(ins)
        if isinstance(n, StackPlan):
            return ops.stack(n, ins, run)
        if isinstance(n, AveragePlan):
            return ops.average(n, ins, run)
        if isinstance(n, FusePlan):
            return ops.fuse(n, ins, run)
        if isinstance(n, BatchSplitPlan):
            batch = ins[0].shape[0]
            if sum(n.sizes) != batch:
                raise ValueError(f"BatchSplit batch_sizes {list(n.sizes)} do not add up to the batch size {batch}.")
            parts = _split_rows(ins, list(n.sizes))
            return torch.cat([run(c, p) for c, p in zip(n.children, parts)], dim=0)
        if isinstance(n, ParallelPlan):
            copies = len(n.children)
            batch = ins[0].shape[0]
            if batch % copies:
                raise ValueError(f"Parallel with {copies} adapters got a batch of {batch} rows; "
                                 "was the model's input replicated?")
            parts = _split_rows(ins, [batch // copies] * copies)
            return torch.cat([run(c, p) for c, p in zip(n.children, parts)], dim=0)
        if isinstance(n, SplitPlan):
            length = ins[0].shape[1]
            sizes, start = [], 0
            for s in n.splits:
                size = length - start if s < 0 else min(s, length - start)
                sizes.append(size)
                start += size
            if start != length:
                sizes[-1] += length - start
            parts = [torch.split(t, sizes, dim=1) for t in ins]
            outs = [run(c, tuple(p[i] for p in parts)) for i, c in enumerate(n.children) if sizes[i] > 0]
            return torch.cat(outs, dim=1)
        if isinstance(n, MultiTaskPlan):
            ctx = current_context()
            if ctx is None or ctx.task_perm is None or sum(ctx.task_sizes) != ins[0].shape[0]:
                raise ValueError("The active setup is MultiTask: pass task_ids=... (one per row) to the model's "
                                 "forward or generate.")
            ordered = tuple(t.index_select(0, ctx.task_perm) for t in ins)
            parts = _split_rows(ordered, ctx.task_sizes)
            outs = [run(c, p) for c, p, size in zip(n.children, parts, ctx.task_sizes) if size > 0]
            return torch.cat(outs, dim=0).index_select(0, ctx.task_inverse)
        raise TypeError(f"Unknown plan node {n!r}")

    return run(node, inputs)
