"""The ReFT layer: interventions on the hidden states a Transformer layer outputs.

One :class:`ReftLayer` per edited Transformer layer is installed as the child ``reft`` of that
layer (so base state-dict keys do not change) and a forward hook on the Transformer layer routes
the layer's output through it. Each adapter is a :class:`ReftUnit` holding one
:class:`Intervention` (tied weights) or two (``prefix`` and ``suffix``).

Positions
    Positions count *real* tokens, read from the attention mask of the current forward pass
    (``adapters.context.current_context().attention_mask``): the prefix is the first
    ``prefix_positions`` real tokens of each row, the suffix the last ``suffix_positions`` real
    tokens, whatever the padding side and the row lengths. Padding is never edited. A row shorter
    than the prefix (or suffix) edits only the real tokens it has. The sorted positions of the real
    tokens are computed once per forward pass and cached in ``ctx.extra``; every layer then does one
    gather, a small matmul and one ``scatter_add`` (no host synchronisation).

Overlaps
    With tied weights, a token that is both a prefix and a suffix position is edited once. With
    untied weights it receives both edits, each computed from the layer's output ``h``
    (``h + Δ_prefix(h) + Δ_suffix(h)``).

Generation with a KV cache
    Interventions apply to the prompt only. A forward pass whose attention mask is longer than its
    hidden states (it continues a sequence held in the cache: a decode step, or a later chunk) edits
    nothing, so the prompt is edited exactly once, in the pre-fill, and generated tokens never are.
    The suffix is therefore the end of the *prompt*. To get the same edits in a full re-forward of
    prompt + continuation without cache (or to train on prompt + response while editing only the
    prompt), wrap the forward in :func:`prompt_lengths`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapters.context import current_context
from adapters.method import AdapterLayer, AttachSite
from adapters.plan import Leaf, PlanOps, execute

from .config import ReftConfig

__all__ = ["ReftLayer", "ReftUnit", "Intervention", "orthonormal_rows", "prompt_lengths"]

_local = threading.local()
_CACHE_KEY = "adapters_reft.order"
_SKIP = object()


@contextmanager
def prompt_lengths(lengths: torch.Tensor | list[int] | int) -> Iterator[None]:
    """Treat only the first ``lengths[b]`` real tokens of row ``b`` as the prompt (thread-local).

    Inside the block, prefix and suffix positions are counted within the prompt, and tokens after
    it are not edited: a full forward of prompt + continuation then edits exactly what generation
    with a KV cache edits (the prompt, in the pre-fill). Also the way to train on prompt + response
    while intervening on the prompt only. ``lengths``: one int for every row or one per row.
    """
    stack = getattr(_local, "lengths", None)
    if stack is None:
        stack = _local.lengths = []
    value = lengths if isinstance(lengths, torch.Tensor) else torch.as_tensor(lengths, dtype=torch.long)
    stack.append(value.long())
    try:
        yield
    finally:
        stack.pop()


def _prompt_lengths() -> torch.Tensor | None:
    stack = getattr(_local, "lengths", None)
    return stack[-1] if stack else None


def orthonormal_rows(a: torch.Tensor) -> torch.Tensor:
    """Rows of ``a`` (r × d, r ≤ d) made orthonormal by Gram-Schmidt, computed in float32.

    Each row is orthogonalised twice against the previous ones ("twice is enough"), so the result
    is orthonormal to float32 precision; it is the Q of ``a``'s QR decomposition with a positive
    diagonal, a deterministic, differentiable function of ``a``. Returned in ``a``'s dtype.
    """
    a32 = a.float()
    rows: list[torch.Tensor] = []
    for i in range(a32.shape[0]):
        v = a32[i]
        if rows:
            q = torch.stack(rows)
            v = v - (q @ v) @ q
            v = v - (q @ v) @ q
        rows.append(v / v.norm().clamp_min(1e-12))
    return torch.stack(rows).to(a.dtype)


def _activation(name: str | None) -> nn.Module:
    key = (name or "linear").lower()
    if key in ("linear", "identity"):
        return nn.Identity()
    return {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "silu": nn.SiLU,
            "swish": nn.SiLU}[key]()


class Intervention(nn.Module):
    """One ReFT intervention ``Δ(h) = Rᵀ(act(Wh + b) − Rh)`` (without ``−Rh`` for DiReFT).

    ``rotate_weight`` (r × d) is the free parameter; ``R`` is its row-orthonormalisation when
    ``orthogonal`` (float32 Gram-Schmidt, recomputed each forward so it stays exact while
    training and reloads bit-identically), else ``rotate_weight`` itself. ``learned_source`` is
    the linear map ``W, b`` (d → r).
    """

    def __init__(self, hidden: int, config: ReftConfig, dtype: torch.dtype, device: torch.device | None) -> None:
        super().__init__()
        self.orthogonal = bool(config.orthogonality)
        self.subtract = bool(config.subtract_projection)
        init = torch.linalg.qr(torch.randn(hidden, config.r, dtype=torch.float32)).Q.t()
        self.rotate_weight = nn.Parameter(init.to(dtype=dtype, device=device))
        self.learned_source = nn.Linear(hidden, config.r, dtype=dtype, device=device)
        self.act = _activation(config.non_linearity)
        self.dropout = nn.Dropout(float(config.dropout)) if config.dropout > 0 else nn.Identity()

    def rotation(self) -> torch.Tensor:
        """``R`` (r × d) in the parameter dtype."""
        return orthonormal_rows(self.rotate_weight) if self.orthogonal else self.rotate_weight

    def delta(self, h: torch.Tensor, rotation: torch.Tensor | None = None) -> torch.Tensor:
        """The edit ``φ(h) − h`` of hidden states ``h`` (… × d)."""
        r = self.rotation() if rotation is None else rotation
        edit = self.act(self.learned_source(h))
        if self.subtract:
            edit = edit - F.linear(h, r)
        return self.dropout(edit) @ r

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``φ(h) = h + Δ(h)``."""
        return h + self.delta(h)


class ReftUnit(nn.Module):
    """One ReFT adapter at one layer: ``interventions["shared"]`` or ``["prefix"]`` / ``["suffix"]``."""

    def __init__(self, hidden: int, config: ReftConfig, dtype: torch.dtype, device: torch.device | None) -> None:
        super().__init__()
        self.prefix = int(config.prefix_positions)
        self.suffix = int(config.suffix_positions)
        self.tied = bool(config.tied_weights)
        self.interventions = nn.ModuleDict()
        if self.tied:
            self.interventions["shared"] = Intervention(hidden, config, dtype, device)
        else:
            if self.prefix:
                self.interventions["prefix"] = Intervention(hidden, config, dtype, device)
            if self.suffix:
                self.interventions["suffix"] = Intervention(hidden, config, dtype, device)

    def slots(self, order: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token positions ``(B × P)`` this adapter edits and a mask of the slots to ignore.

        ``order[b, k]`` is the position of row ``b``'s ``k``-th real token, ``lengths[b]`` its number
        of real (prompt) tokens. Slots ``0..prefix-1`` are the prefix, the rest the suffix.
        """
        seq = order.shape[1]
        device = order.device
        parts, invalid = [], []
        if self.prefix:
            k = torch.arange(self.prefix, device=device).unsqueeze(0)
            parts.append(order.index_select(1, k[0].clamp(max=seq - 1)))
            invalid.append(k >= lengths.unsqueeze(1))
        if self.suffix:
            k = lengths.unsqueeze(1) - self.suffix + torch.arange(self.suffix, device=device).unsqueeze(0)
            parts.append(order.gather(1, k.clamp(0, seq - 1)))
            bad = k < 0
            if self.tied:
                bad = bad | (k < self.prefix)  # already edited as a prefix position
            invalid.append(bad)
        return torch.cat(parts, dim=1), torch.cat(invalid, dim=1)

    def apply(self, h: torch.Tensor, index: torch.Tensor, invalid: torch.Tensor) -> torch.Tensor:
        """``h`` with the edits scattered in at ``index`` (slots in ``invalid`` add nothing)."""
        expanded = index.unsqueeze(-1).expand(-1, -1, h.shape[-1])
        first = next(iter(self.interventions.values()))
        dtype = first.rotate_weight.dtype
        picked = h.gather(1, expanded).to(dtype)
        if self.tied:
            delta = first.delta(picked)
        else:
            deltas = []
            if self.prefix:
                deltas.append(self.interventions["prefix"].delta(picked[:, : self.prefix]))
            if self.suffix:
                deltas.append(self.interventions["suffix"].delta(picked[:, self.prefix:]))
            delta = torch.cat(deltas, dim=1) if len(deltas) > 1 else deltas[0]
        delta = delta.masked_fill(invalid.unsqueeze(-1), 0).to(h.dtype)
        return h.scatter_add(1, expanded, delta)

    def forward(self, h: torch.Tensor, order: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Edit hidden states ``h`` (B × T × d) of rows described by ``order`` / ``lengths``."""
        index, invalid = self.slots(order, lengths)
        return self.apply(h, index, invalid)


class _Ops(PlanOps):
    """ReFT plans run on ``(h, order, lengths)``: all batch-first, so rows route through
    ``BatchSplit`` and ``MultiTask``; a ``Stack`` edits the previous adapter's output."""

    def __init__(self, layer: ReftLayer) -> None:
        self.layer = layer

    def leaf(self, name: str, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        h, order, lengths = inputs
        return self.layer.adapters[name](h, order, lengths)


def _real_tokens(h: torch.Tensor) -> Any:
    """``(order, lengths)`` of the real tokens of this forward, once per pass, or ``_SKIP``."""
    ctx = current_context()
    batch, seq = h.shape[0], h.shape[1]
    key = (_CACHE_KEY, batch, seq, h.device)
    if ctx is not None:
        cached = ctx.extra.get(key)
        if cached is not None:
            return cached
    mask = ctx.attention_mask if ctx is not None else None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == batch:
        if mask.shape[1] > seq:
            result: Any = _SKIP  # continues a cached sequence (decode step): the prompt was edited already
        elif mask.shape[1] == seq:
            real = mask.to(device=h.device) != 0
            result = None
        else:
            real = torch.ones(batch, seq, dtype=torch.bool, device=h.device)
            result = None
    else:
        real = torch.ones(batch, seq, dtype=torch.bool, device=h.device)
        result = None
    if result is None:
        order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)
        lengths = real.sum(dim=1)
        limit = _prompt_lengths()
        if limit is not None:
            lengths = torch.minimum(lengths, limit.to(lengths.device).expand_as(lengths))
        result = (order, lengths)
    if ctx is not None:
        ctx.extra[key] = result
    return result


class ReftLayer(AdapterLayer):
    """Hosts the ReFT adapters of one Transformer layer; edits that layer's output via a forward hook."""

    def __init__(self, location: str, hidden: int, base_dtype: torch.dtype, device: torch.device | None) -> None:
        super().__init__(location)
        self.hidden = hidden
        self.base_dtype = base_dtype
        self.device = device
        self.hooked = False
        self._ops = _Ops(self)
        self._slot_key = "adapters_reft.slots"
        self._recompute: tuple[Any, Any] | None = None

    def add_adapter(self, name: str, config: ReftConfig, site: AttachSite) -> None:
        """Create adapter ``name`` (weights in the base model's dtype unless ``config.dtype``)."""
        dtype = site.dtype_for(torch.empty(0, dtype=self.base_dtype), config)
        unit = ReftUnit(self.hidden, config, dtype, self.device)
        unit.train(self.training)  # follow the model's mode (eval: no dropout)
        self.adapters[name] = unit

    def edit(self, h: torch.Tensor) -> torch.Tensor:
        """Apply the active plan to hidden states ``h`` (B × T × d); ``h`` itself when nothing applies."""
        plan = self.plan
        if plan is None or h.dim() != 3:
            return h
        if current_context() is None and self._recompute is not None and self._recompute[0] == (h.shape[:2], h.device):
            # no forward context: gradient checkpointing is recomputing this layer in the backward pass
            # (possibly on autograd's device thread); use the positions of the forward pass it repeats
            info = self._recompute[1]
        else:
            info = _real_tokens(h)
            if torch.is_grad_enabled() and self.training:
                self._recompute = ((h.shape[:2], h.device), info)
        if info is _SKIP:
            return h
        order, lengths = info
        if type(plan) is Leaf:
            unit: ReftUnit = self.adapters[plan.name]
            ctx = current_context()
            key = (self._slot_key, unit.prefix, unit.suffix, unit.tied, id(order))
            slots = ctx.extra.get(key) if ctx is not None else None
            if slots is None:
                slots = unit.slots(order, lengths)
                if ctx is not None:
                    ctx.extra[key] = slots
            return unit.apply(h, *slots)
        return execute(plan, (h, order, lengths), self._ops)

    def hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        """Forward hook of the Transformer layer: replace its hidden-state output by the edited one."""
        if self.plan is None:
            return None
        if isinstance(output, torch.Tensor):
            return self.edit(output)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (self.edit(output[0]), *output[1:])
        return None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`edit` (the layer is normally driven by its hook)."""
        return self.edit(h)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, location={self.location}"
