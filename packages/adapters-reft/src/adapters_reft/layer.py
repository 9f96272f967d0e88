"""The ReFT layer: interventions on the hidden states a Transformer layer outputs.

One :class:`ReftLayer` per edited Transformer layer is installed as the child ``reft`` of that
layer (so base state-dict keys do not change) and a forward hook on the Transformer layer routes
the layer's output through it. Each adapter is a :class:`ReftUnit` holding one
:class:`Intervention` (tied weights) or two (``prefix`` and ``suffix``).

Positions
    Positions count *real* tokens of the call's own layout (``adapters.context.current_context()``):
    padding from its attention mask, sequences packed into one row from its ``position_ids``
    (restarting at 0, no mask: each packed sequence gets its own prefix and suffix), decode steps
    from its cache. The prefix is the first ``prefix_positions`` real tokens of each sequence, the
    suffix the last ``suffix_positions`` real tokens, whatever the padding side and the lengths.
    Padding is never edited. A row shorter than the prefix (or suffix) edits only the real tokens
    it has. The sorted positions of the real
    tokens are computed once per forward pass and cached in ``ctx.extra``; every layer then does one
    gather, a small matmul and one ``scatter_add`` (no host synchronisation).

Overlaps
    With tied weights, a token that is both a prefix and a suffix position is edited once. With
    untied weights it receives both edits, each computed from the layer's output ``h``
    (``h + Δ_prefix(h) + Δ_suffix(h)``).

Generation with a KV cache
    Interventions apply to the prompt only. A forward call that continues a sequence held in the
    cache (its ``past_key_values`` or ``cache_position`` say tokens came before, or its attention
    mask is longer than its hidden states: a decode step, or a later chunk) edits nothing, so the
    prompt is edited exactly once, in the pre-fill, and generated tokens never are.
    The suffix is therefore the end of the *prompt*. ``generate()`` without a cache re-runs prompt +
    continuation each step and edits the same prompt tokens (core tells the layer the prompt's
    lengths, :attr:`adapters.context.ForwardContext.prompt_lengths`). To get those edits in your own
    full forward (or to train on prompt + response while editing only the prompt), wrap it in
    :func:`prompt_lengths`.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapters.plugin import AdapterError, AdapterLayer, AttachSite, Leaf, StackPlan, adapter_dtype_at, current_context

from .config import ReftConfig

__all__ = ["ReftLayer", "ReftUnit", "Intervention", "orthonormal_rows", "prompt_lengths", "edit_layer_output"]

_local = threading.local()
_CACHE_KEY = "adapters_reft.order"
_SLOT_KEY = "adapters_reft.slots"
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
    diagonal, a deterministic, differentiable function of ``a``. A single row is divided by its norm
    (no per-row loop: the same numbers, fewer operations). Returned in ``a``'s dtype.

    Gram-Schmidt's operation count grows with r² (157 forward and backward at rank 4, every one a kernel
    launch on a GPU); Cholesky QR twice takes a fixed 40, but was rejected: rows with a condition number
    from about 7e3 come out sign-flipped or NaN (its Cholesky factorisation fails, and checking that needs a
    device synchronisation), a zero row makes every output NaN, where Gram-Schmidt stays finite.
    """
    a32 = a.float()
    if a32.shape[0] == 1:  # one row (LoReFT's default rank): its normalisation
        return (a32 / a32.norm(dim=1, keepdim=True).clamp_min(1e-12)).to(a.dtype)
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
    ``orthogonal`` (:func:`orthonormal_rows` in float32, recomputed each forward so it stays exact while
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
        source = self.learned_source
        if self.subtract and type(self.act) is nn.Identity and type(source) is nn.Linear:
            # (W − R) h + b in one GEMM: W h + b − R h to rounding, two launches and three backward fewer
            edit = F.linear(h, source.weight - r, source.bias)
        else:
            edit = self.act(source(h))
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

    def apply(self, h: torch.Tensor, index: torch.Tensor, invalid: torch.Tensor,
              n_prefix: int | None = None) -> torch.Tensor:
        """``h`` with the edits scattered in at ``index`` (slots in ``invalid`` add nothing); the first
        ``n_prefix`` slots (default: ``prefix_positions``) are prefix slots, the rest suffix slots."""
        n_prefix = self.prefix if n_prefix is None else n_prefix
        expanded = index.unsqueeze(-1).expand(-1, -1, h.shape[-1])
        first = next(iter(self.interventions.values()))
        dtype = first.rotate_weight.dtype
        picked = h.gather(1, expanded).to(dtype)
        if self.tied:
            delta = first.delta(picked)
        else:
            deltas = []
            if self.prefix:
                deltas.append(self.interventions["prefix"].delta(picked[:, :n_prefix]))
            if self.suffix:
                deltas.append(self.interventions["suffix"].delta(picked[:, n_prefix:]))
            delta = torch.cat(deltas, dim=1) if len(deltas) > 1 else deltas[0]
        delta = delta.masked_fill(invalid.unsqueeze(-1), 0).to(h.dtype)
        return h.scatter_add(1, expanded, delta)

    def forward(self, h: torch.Tensor, order: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Edit hidden states ``h`` (B × T × d) of rows described by ``order`` / ``lengths``."""
        index, invalid = self.slots(order, lengths)
        return self.apply(h, index, invalid)


def _packed_segments(position_ids: torch.Tensor, batch: int, seq: int) -> list[tuple[int, int, int]] | None:
    """``(row, start, end)`` of every sequence packed into the rows, when ``position_ids`` restart at 0
    inside a row (sequences packed without padding); ``None`` when every row holds one sequence.
    One host synchronisation, only for calls that pass ``position_ids`` and no attention mask."""
    if position_ids.dim() != 2 or tuple(position_ids.shape) != (batch, seq) or seq < 2:
        return None
    starts = (position_ids[:, 1:] == 0).nonzero().tolist()
    if not starts:
        return None
    cuts: dict[int, list[int]] = {}
    for row, col in starts:
        cuts.setdefault(row, []).append(col + 1)
    segments = []
    for row in range(batch):
        bounds = [0, *cuts.get(row, []), seq]
        segments.extend((row, a, b) for a, b in itertools.pairwise(bounds) if b > a)
    return segments


def _token_layout(h: torch.Tensor) -> Any:
    """``(order, lengths, segments)`` of the real tokens of this call, once per call, or ``_SKIP``.

    From the call's own layout, never from the attention mask alone: a call that continues a
    cached sequence (``past_key_values`` / ``cache_position`` say tokens came before: a decode step)
    edits nothing; padding comes from the attention mask; sequences packed into one row
    (``position_ids`` restarting at 0, no mask) are edited each on its own (``segments``).
    """
    ctx = current_context()
    batch, seq = h.shape[0], h.shape[1]
    key = (_CACHE_KEY, batch, seq, h.device)
    memo = _call_memo(ctx)
    if memo is not None and memo.get(key) is not None:
        return memo[key]
    if ctx is not None and (ctx.continues or ctx.past_length() > 0):
        if memo is not None:
            memo[key] = _SKIP  # continues a cached sequence: the prompt was edited in the pre-fill
        return _SKIP
    mask = ctx.attention_mask if ctx is not None else None
    segments = None
    real = None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == batch:
        if mask.shape[1] > seq:
            result: Any = _SKIP  # mask covers cached tokens too: a continuation
            if memo is not None:
                memo[key] = result
            return result
        if mask.shape[1] == seq:
            real = mask.to(device=h.device) != 0
    elif ctx is not None and isinstance(ctx.position_ids, torch.Tensor):
        segments = _packed_segments(ctx.position_ids, batch, seq)
    if real is None:
        real = torch.ones(batch, seq, dtype=torch.bool, device=h.device)
    order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)
    lengths = real.sum(dim=1)
    limit = _prompt_lengths()
    if limit is None and ctx is not None and ctx.prompt_lengths is not None and ctx.prompt_lengths.numel() == batch:
        limit = ctx.prompt_lengths  # inside generate(): the prompt only, with or without a cache
    if limit is not None:
        lengths = torch.minimum(lengths, limit.to(lengths.device).expand_as(lengths))
    result = (order, lengths, segments)
    if memo is not None:
        memo[key] = result
    return result


def _call_memo(ctx: Any) -> dict | None:
    """Where the layers of one call share what they derive from the call's layout (computed once a call):
    the context's ``extra``; ``None`` (derive it again) without a context and inside ``torch.compile``, where
    a shared dict keyed by devices and tensor ids would be guarded on, so every layer compiled on its own
    (regional compilation) would recompile or fail, and the graph recomputes it for nothing anyway."""
    if ctx is None or torch.compiler.is_compiling():
        return None
    return ctx.extra


def _segment_slots(unit: ReftUnit, segments: list[tuple[int, int, int]], seq: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Slots of packed sequences as one flat row of ``batch × seq`` tokens: all prefix slots first."""
    order = torch.tensor([[row * seq + a + k for k in range(b - a)] + [0] * (seq - (b - a))
                          for row, a, b in segments], dtype=torch.long, device=device)
    lengths = torch.tensor([b - a for _, a, b in segments], dtype=torch.long, device=device)
    index, invalid = unit.slots(order, lengths)
    n_prefix = unit.prefix
    flat_index = torch.cat([index[:, :n_prefix].reshape(1, -1), index[:, n_prefix:].reshape(1, -1)], dim=1)
    flat_invalid = torch.cat([invalid[:, :n_prefix].reshape(1, -1), invalid[:, n_prefix:].reshape(1, -1)], dim=1)
    return flat_index, flat_invalid, n_prefix * len(segments)


class ReftLayer(AdapterLayer):
    """Hosts the ReFT adapters of one Transformer layer; edits that layer's output via a forward hook.

    The hook (:func:`edit_layer_output`) is a plain function registered on the Transformer layer: it
    edits through the ``reft`` child of the module actually called (a replica, a copy), and reads the
    token layout from the call's context, which gradient checkpointing restores when it recomputes.
    """

    def __init__(self, location: str, hidden: int, base_dtype: torch.dtype, device: torch.device | None) -> None:
        super().__init__(location)
        self.hidden = hidden
        self.base_dtype = base_dtype
        self.device = device
        self.hooked = False

    def leaf(self, name: str, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Plans run on ``(h, order, lengths)``: all batch-first, so rows route through ``BatchSplit`` and
        ``MultiTask``; a ``Stack`` edits the previous adapter's output."""
        h, order, lengths = inputs
        return self.adapters[name](h, order, lengths)

    def add_adapter(self, name: str, config: ReftConfig, site: AttachSite) -> None:
        """Create adapter ``name`` (weights in the base model's dtype unless ``config.dtype``; on a quantized
        model its compute dtype, float32 for float16)."""
        owner = site.points.layers[int(self.location.split(".")[1])].module.module  # the Transformer layer
        dtype = adapter_dtype_at(site, owner, config)
        unit = ReftUnit(self.hidden, config, dtype, self.device)
        unit.train(self.training)  # follow the model's mode (eval: no dropout)
        self.adapters[name] = unit

    def edit(self, h: torch.Tensor) -> torch.Tensor:
        """Apply this call's plan to hidden states ``h`` (B × T × d); ``h`` itself when nothing applies."""
        plan = self.active_plan()
        if plan is None or h.dim() != 3:
            return h
        info = _token_layout(h)
        if info is _SKIP:
            return h
        order, lengths, segments = info
        if segments is not None:
            return self._edit_packed(plan, h, segments)
        if type(plan) is Leaf:
            unit: ReftUnit = self.adapters[plan.name]
            memo = _call_memo(current_context())
            if memo is None:  # no memo (compiling): the key's id() of a traced tensor broke torch 2.11's graph
                return unit.apply(h, *unit.slots(order, lengths))
            key = (_SLOT_KEY, unit.prefix, unit.suffix, unit.tied, id(order))
            slots = memo.get(key)
            if slots is None:
                slots = memo[key] = unit.slots(order, lengths)
            return unit.apply(h, *slots)
        return self.run_plan(plan, (h, order, lengths))

    def _edit_packed(self, plan: Any, h: torch.Tensor, segments: list[tuple[int, int, int]]) -> torch.Tensor:
        names = [plan.name] if type(plan) is Leaf else None
        if names is None and type(plan) is StackPlan and all(type(c) is Leaf for c in plan.children):
            names = [c.name for c in plan.children]
        if names is None:
            raise AdapterError("ReFT on packed sequences (position_ids restarting inside a row) supports one "
                               "adapter or a Stack of adapters; row-routing blocks need one sequence per row.")
        batch, seq, width = h.shape
        flat = h.reshape(1, batch * seq, width)
        for name in names:
            unit: ReftUnit = self.adapters[name]
            index, invalid, n_prefix = _segment_slots(unit, segments, seq, h.device)
            flat = unit.apply(flat, index, invalid, n_prefix)
        return flat.reshape(batch, seq, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`edit` (the layer is normally driven by its hook)."""
        return self.edit(h)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, location={self.location}"


def edit_layer_output(attr: str, module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook of a Transformer layer: replace its hidden-state output by the edited one."""
    layer = module._modules.get(attr)
    if layer is None or layer.active_plan() is None:
        return None
    if isinstance(output, torch.Tensor):
        return layer.edit(output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (layer.edit(output[0]), *output[1:])
    return None
