"""Several plain LoRA adapters at one projection, one per row of the batch, in a fixed number of kernels.

When a call routes rows to adapters (``MultiTask`` with ``task_ids``, the per-row ``adapter_names=``
argument, which core turns into a ``MultiTask`` plan with a last, identity child for rows that name the base
model, ``BatchSplit``, ``Parallel``) and every child of the routing plan at a projection is a plain LoRA
adapter (or identity), :func:`gathered_forward` computes every row's delta at once instead of one
sub-batch per adapter:

* the adapters' weights are stacked once into ``W`` of shape ``(K, r_max, in + out)``: row ``k`` holds
  ``A_k`` (``r_k × in``) and ``(s_k · B_k)ᵀ`` (``r_k × out``), zero-padded to the largest rank, so the scaling
  is folded in and a padded rank contributes exactly zero; identity children (base rows, an adapter this
  projection does not host) are all zeros;
* per call: ``G = W[ids]`` (``index_select``, ``(batch, r_max, in + out)``), ``h = bmm(x, G[:, :, :in]ᵀ)``
  (``(batch, tokens, r_max)``) and ``y += bmm(h, G[:, :, in:])`` (``baddbmm_`` into the base output):
  three operations per projection whatever the number of adapters (a test counts them).

It runs without autograd only (inference, serving; training takes the general path, which routes
sub-batches) and outside autocast, on adapters whose dtype and device are the input's. Anything else --
DoRA, MTL-LoRA, IA3, gates, parts of a fused projection, nested blocks, dropout in training mode --
returns ``None`` and the layer runs the general path.

**The stack is a cache of derived weights** on the layer (``layer.__dict__[CACHE]``, never a submodule or
parameter, so state dicts, ``named_modules`` and checkpoints do not see it). Rules that keep it correct:

* entries are keyed by the plan object (plans are immutable values kept alive by the model's plan tables;
  the entry holds its plan, so the key cannot be reused) and record the layer's ``id``: an
  ``nn.DataParallel`` replica or a deep copy (whose ``__dict__`` starts as a copy of the original's)
  never uses the original's entry, it builds its own;
* the dict is replaced, never mutated (copy on write), so concurrent threads each read a consistent
  dict and at worst build the same entry twice;
* before use, the parameters of every adapter a call actually uses are compared with the ones the entry
  was built from: the same objects and the same ``_version`` (any in-place write: an optimizer step,
  ``load_state_dict``, ``hotswap_adapter``, ``torch.no_grad()`` edits); otherwise the entry is rebuilt.
  Adding, deleting, sharing or moving adapters clears the cache (:meth:`LoRALinear.clear_gathered`);
* pickles and deep copies leave it out (``LoRALinear.__getstate__``).

Under ``torch.compile`` the stack is built inside the traced graph on every call (no cache, no
``_version`` reads, which would break the graph).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from adapters.plugin import (
    BatchSplitPlan,
    Identity,
    Leaf,
    MultiTaskPlan,
    ParallelPlan,
    PlanNode,
    current_context,
    param,
)

from .deltas import LoRADelta

__all__ = ["CACHE", "ROUTED", "Stacked", "gathered_forward", "build_stack"]

#: Key of the cache in a layer's ``__dict__``.
CACHE = "_gathered_stacks"
#: Routing plans the gathered path handles.
ROUTED = (MultiTaskPlan, BatchSplitPlan, ParallelPlan)
#: How many plans' stacks a layer keeps (a server usually runs one: ``adapter_names`` over all adapters).
MAX_ENTRIES = 4


@dataclass(frozen=True)
class Stacked:
    """The stacked weights of one routing plan at one layer (``weights`` is ``None``: not eligible)."""

    plan: PlanNode
    owner: int
    dtype: torch.dtype
    device: torch.device
    weights: torch.Tensor | None = None
    #: per child: ``(lora_A, lora_B)`` the stack was built from (``None``: identity), and their versions
    params: tuple[tuple[torch.Tensor, torch.Tensor] | None, ...] = ()
    versions: tuple[tuple[int, int] | None, ...] = ()
    names: tuple[str | None, ...] = ()
    has_dropout: bool = False
    #: row ids of BatchSplit / Parallel by batch size (filled on first use; plain dict writes are atomic)
    rows: dict[int, torch.Tensor] = field(default_factory=dict)


def _children(plan: PlanNode) -> tuple[PlanNode, ...]:
    return plan.children  # type: ignore[attr-defined]


def _eligible_modules(layer: nn.Module, plan: PlanNode, dtype: torch.dtype,
                      device: torch.device) -> list[LoRADelta | None] | None:
    """Per child, the plain LoRA module (``None`` for identity); ``None`` if some child is not one."""
    adapters = layer._modules["adapters"]._modules
    modules: list[LoRADelta | None] = []
    for child in _children(plan):
        if type(child) is Identity:
            modules.append(None)
            continue
        if type(child) is not Leaf:
            return None
        module = adapters.get(child.name)
        if (type(module) is not LoRADelta or module.gate is not None or module.row_index is not None
                or module.lora_A.dtype != dtype or module.lora_B.dtype != dtype or module.lora_A.device != device):
            return None
        modules.append(module)
    if all(m is None for m in modules):
        return None
    return modules


def build_stack(modules: list[LoRADelta | None], in_features: int, out_features: int, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """``W`` of shape ``(K, r_max, in + out)``: ``[A_k | (s_k B_k)ᵀ]`` zero-padded to ``r_max``; zeros for ``None``.

    Functional (``cat`` / ``pad`` / ``stack``), so it traces under ``torch.compile``; the scaling is
    applied in float32 and rounded once to ``dtype``.
    """
    rank = max(m.lora_A.shape[0] for m in modules if m is not None)
    rows = []
    for module in modules:
        if module is None:
            rows.append(torch.zeros(rank, in_features + out_features, dtype=dtype, device=device))
            continue
        up = (module.lora_B.float() * module.scaling).t().to(dtype)
        both = torch.cat([module.lora_A.detach(), up.detach()], dim=1)
        rows.append(F.pad(both, (0, 0, 0, rank - both.shape[0])) if both.shape[0] < rank else both)
    return torch.stack(rows)


def _build_entry(layer: nn.Module, plan: PlanNode, dtype: torch.dtype, device: torch.device) -> Stacked:
    modules = _eligible_modules(layer, plan, dtype, device)
    if modules is None:
        return Stacked(plan, id(layer), dtype, device)
    params = tuple(None if m is None else (param(m, "lora_A"), param(m, "lora_B")) for m in modules)
    with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable in and out of inference mode
        weights = build_stack(modules, layer.in_features, layer.out_features, dtype, device)
    try:
        versions = tuple(None if p is None else (p[0]._version, p[1]._version) for p in params)
    except RuntimeError:  # parameters made in inference mode have no version counter: never cache them
        versions = ()
    names = tuple(c.name if type(c) is Leaf else None for c in _children(plan))
    has_dropout = any(m is not None and m.dropout is not None for m in modules)
    return Stacked(plan, id(layer), dtype, device, weights, params, versions, names, has_dropout)


def _fresh(layer: nn.Module, entry: Stacked, used: list[int] | range) -> bool:
    """Whether the adapters of the children ``used`` are still the tensors (and versions) the stack holds."""
    if not entry.versions:
        return False
    adapters = layer._modules["adapters"]._modules
    for k in used:
        pair = entry.params[k]
        if pair is None:
            continue
        module = adapters.get(entry.names[k])
        if module is None:
            return False
        a, b = pair
        if param(module, "lora_A") is not a or param(module, "lora_B") is not b:  # replaced (or a replica's)
            return False
        va, vb = entry.versions[k]
        if a._version != va or b._version != vb:
            return False
    return True


def _stack_for(layer: nn.Module, plan: PlanNode, x: torch.Tensor, used: list[int] | range) -> Stacked:
    """The cached entry of ``plan`` (rebuilt and stored when missing or stale)."""
    cache = layer.__dict__.get(CACHE)
    entry = None if cache is None else cache.get(id(plan))
    if (entry is not None and entry.plan is plan and entry.owner == id(layer) and entry.dtype == x.dtype
            and entry.device == x.device and (entry.weights is None or _fresh(layer, entry, used))):
        return entry
    entry = _build_entry(layer, plan, x.dtype, x.device)
    new = {} if cache is None else {k: v for k, v in cache.items() if v.owner == id(layer)}
    while len(new) >= MAX_ENTRIES:
        new.pop(next(iter(new)))
    new[id(plan)] = entry
    layer.__dict__[CACHE] = new  # replaced, never mutated: threads and replicas read consistent dicts
    return entry


def _routing(plan: PlanNode, batch: int, token: int) -> tuple[torch.Tensor | None, list[int] | None] | None:
    """``(row ids, sizes)``: ``MultiTask`` gives its row ids (the call's ``task_ids``, grouped on the host into
    ``task_sizes`` when the call started), ``BatchSplit`` / ``Parallel`` their sizes (ids ``None``: built from
    the sizes). ``None`` when the rows do not fit the plan (the general path then raises its error)."""
    if type(plan) is MultiTaskPlan:
        ctx = current_context()
        if (ctx is None or ctx.token != token or ctx.task_ids is None or ctx.task_sizes is None
                or ctx.task_ids.shape[0] != batch):
            return None
        return ctx.task_ids, ctx.task_sizes
    children = len(_children(plan))
    if type(plan) is BatchSplitPlan:
        sizes = list(plan.sizes)  # type: ignore[attr-defined]
        if sum(sizes) != batch:
            return None
    elif batch % children:
        return None
    else:
        sizes = [batch // children] * children
    return None, sizes


def _ids_from_sizes(sizes: list[int], device: torch.device) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(device)


def gathered_forward(layer: nn.Module, plan: PlanNode, x: torch.Tensor) -> torch.Tensor | None:
    """The projection's output for a routing ``plan`` (see the module docstring), or ``None`` when the
    gathered path does not apply and the general path must run.

    :param layer: the :class:`~adapters_lora.layer.LoRALinear` (``in_features``, ``out_features``,
        ``adapters``, ``base_forward``).
    :param x: the projection's input, batch first: ``(batch, ..., in)``.
    :returns: ``(batch, ..., out)``, or ``None``.
    """
    if torch.is_grad_enabled() or x.dim() < 2 or torch.is_autocast_enabled(x.device.type):
        return None
    batch = x.shape[0]
    routing = _routing(plan, batch, layer._adapters_token)
    if routing is None:
        return None
    ids, sizes = routing
    if torch.compiler.is_compiling():  # traced: the stack is built in the graph, no cache
        modules = _eligible_modules(layer, plan, x.dtype, x.device)
        if modules is None or (layer.training and any(m is not None and m.dropout is not None for m in modules)):
            return None
        weights = build_stack(modules, layer.in_features, layer.out_features, x.dtype, x.device)
        if ids is None:
            ids = _ids_from_sizes(sizes, x.device)
    else:
        entry = _stack_for(layer, plan, x, [k for k, size in enumerate(sizes) if size])
        if entry.weights is None or (entry.has_dropout and layer.training):
            return None
        weights = entry.weights
        if ids is None:
            ids = entry.rows.get(batch)
            if ids is None:
                ids = entry.rows[batch] = _ids_from_sizes(sizes, x.device)
    in_features = layer.in_features
    y = layer.base_forward(x)
    if not y.is_contiguous():
        y = y.contiguous()
    gathered = weights.index_select(0, ids)  # (batch, r, in + out)
    h = torch.bmm(x.reshape(batch, -1, in_features), gathered[:, :, :in_features].transpose(1, 2))
    y.view(batch, -1, layer.out_features).baddbmm_(h, gathered[:, :, in_features:])
    return y
