"""Prefix tuning: trained key/value prefixes in every chosen attention module.

Parameters
    One model-level *pool* per adapter and attention kind (``self``: decoder-only / encoder-only
    self-attention and a decoder's self-attention; ``encoder``: an encoder-decoder's encoder; ``cross``:
    cross-attention), shared by that kind's layers through :class:`~adapters.plugin.SharedRef`, saved
    as ``shared.prefix_<kind>``. :class:`PrefixMLP` (training, ``flat=False``) maps a ``P × d`` table
    through ``Linear → act → Linear`` to ``P × (layers · 2 · H_kv · D)``; :class:`PrefixFlat` holds that
    matrix itself. Column block ``i`` (width ``2·H_kv·D``: keys then values, head-major) belongs to the
    kind's ``i``-th layer, the layout peft and AdapterHub use. :func:`eject_prefix` turns an MLP into its
    output.

The call
    A forward pre-hook on each attention module (:func:`prefix_pre_hook`) computes the layer's prefix
    ``(B × 2 × H_kv × P × D)`` from the call's plan (rows routed by ``BatchSplit`` / ``MultiTask``,
    ``Stack`` concatenates prefixes), passes a :class:`~adapters_prompt.cache.PrefixedCache` as the
    module's cache and widens its attention mask (and T5's position bias). Tokens keep their positions
    (``offset_positions`` shifts them by ``P``, peft's convention) and the outputs their length.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapters.plugin import (
    AdapterError,
    AdapterLayer,
    PlanNode,
    SharedRef,
    StackPlan,
    current_context,
    current_frame,
    traced_or_transformed,
)

from .cache import fixed_size, pad_mask, pad_position_bias, wrap_cache
from .calls import CACHE_KEYS, get_arg, set_arg
from .prompt import cache_length, plan_length

__all__ = ["PrefixMLP", "PrefixFlat", "PrefixUnit", "PrefixLayer", "prefix_pre_hook", "offset_pre_hook",
           "activation"]


def activation(name: str) -> nn.Module:
    """The MLP's activation for a :data:`~adapters_prompt.config.NON_LINEARITIES` name."""
    key = name.lower()
    if key in ("linear", "identity"):
        return nn.Identity()
    return {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU,
            "sigmoid": nn.Sigmoid, "gelu_new": lambda: nn.GELU(approximate="tanh")}[key]()


class PrefixMLP(nn.Module):
    """Reparameterised prefixes of ``layers`` attention modules: ``control_trans(wte)``, ``P × layers·width``.

    ``wte``: ``P × hidden``; ``control_trans``: ``Linear(hidden, bottleneck) → act → Linear(bottleneck,
    layers · width)``. Eagerly the whole output is computed and split into the layers' blocks
    (:func:`layer_blocks`, once a forward call: :func:`call_blocks`); under ``torch.compile`` each layer
    evaluates its own column block (:meth:`layer_prefix`).
    """

    def __init__(self, length: int, hidden: int, bottleneck: int, layers: int, width: int, act: str,
                 dropout: float, dtype: torch.dtype, device: torch.device | None) -> None:
        super().__init__()
        self.layers, self.width = layers, width
        self.wte = nn.Embedding(length, hidden, dtype=dtype, device=device)
        self.control_trans = nn.Sequential(nn.Linear(hidden, bottleneck, dtype=dtype, device=device), activation(act),
                                           nn.Linear(bottleneck, layers * width, dtype=dtype, device=device))
        self.dropout = nn.Dropout(dropout)

    def layer_prefix(self, columns: torch.Tensor) -> torch.Tensor:
        """One layer's prefix, ``P × width``, from its ``columns`` (indices into ``layers·width``)."""
        hidden = self.control_trans[1](self.control_trans[0](self.wte.weight))
        last = self.control_trans[2]
        return self.dropout(F.linear(hidden, last.weight.index_select(0, columns), last.bias.index_select(0, columns)))

    def prefixes(self) -> torch.Tensor:
        """Every layer's prefix, ``P × layers·width`` (no dropout)."""
        return self.control_trans(self.wte.weight)


class PrefixFlat(nn.Module):
    """Prefixes of ``layers`` attention modules trained directly: ``control_trans``, ``P × layers·width``."""

    def __init__(self, length: int, layers: int, width: int, dropout: float, dtype: torch.dtype,
                 device: torch.device | None, values: torch.Tensor | None = None) -> None:
        super().__init__()
        self.layers, self.width = layers, width
        if values is None:
            values = torch.randn(length, layers * width)
        self.control_trans = nn.Parameter(values.detach().clone().to(dtype=dtype, device=device))
        self.dropout = nn.Dropout(dropout)

    def layer_prefix(self, columns: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.control_trans.index_select(1, columns))

    def prefixes(self) -> torch.Tensor:
        return self.control_trans


class PrefixUnit(nn.Module):
    """One adapter at one attention module: its pool (shared), its column block, an optional gate.

    :param offset: the adapter shifts the tokens' positions by its length (``offset_positions``).
    """

    def __init__(self, pool: nn.Module, index: int, heads: int, head_dim: int, gate: nn.Linear | None,
                 offset: bool) -> None:
        super().__init__()
        self.pool = SharedRef(pool)
        self.index, self.heads, self.head_dim, self.offset = index, heads, head_dim, offset
        self.gate = gate
        # the column block as indices, not as an int: under torch.compile an int attribute is a constant, so
        # each layer's attention compiled on its own (regional compilation) would be a new graph
        device = next(iter(pool.parameters())).device
        self.register_buffer("columns", torch.arange(index * pool.width, (index + 1) * pool.width, device=device),
                             persistent=False)

    @property
    def length(self) -> int:
        """``P``."""
        pool = self.pool.module
        return (pool.wte.weight if isinstance(pool, PrefixMLP) else pool.control_trans).shape[0]

    def kv(self) -> torch.Tensor:
        """``2 × H_kv × P × D``: keys, values."""
        pool = self.pool.module
        if torch.compiler.is_compiling():  # an index buffer, not an int: one graph for every layer
            flat = pool.layer_prefix(self.columns)
        else:
            flat = pool.dropout(call_blocks(pool, self.index)[self.index])
        return flat.view(flat.shape[0], 2, self.heads, self.head_dim).permute(1, 2, 0, 3)


_BLOCKS_KEY = "adapters_prompt.prefix_blocks"


def layer_blocks(pool: PrefixMLP | PrefixFlat) -> tuple[torch.Tensor, ...]:
    """Every layer's prefix before dropout, one ``P × width`` view each of ``pool.prefixes()`` (backward: one
    ``stack``)."""
    return pool.prefixes().view(-1, pool.layers, pool.width).unbind(1)


def call_blocks(pool: PrefixMLP | PrefixFlat, index: int) -> tuple[torch.Tensor, ...]:
    """``pool``'s layer blocks (:func:`layer_blocks`) for the layer at ``index``: evaluated once a
    pass by the first layer that needs them and shared with the others (in the call's ``ForwardContext.extra``,
    keyed by the pool, the grad mode and the pass: the forward pass, or one backward pass's graph task).

    Gradient checkpointing re-runs layers inside a backward pass, and non-reentrant checkpointing requires a
    re-run to repeat its forward operations: re-running the layer call (frame) that evaluated the pool
    evaluates it again; re-running another reuses the forward pass's blocks. Reentrant checkpointing's forward
    pass runs without gradients and each layer's re-run is differentiated on its own: such a re-run evaluates
    the pool itself. A model checkpointed as a whole re-runs as a new call, sharing blocks within its
    re-run as the forward pass did. Fresh or shared, the same
    operations on the same inputs: the same values. Without a call context and under ``torch.func``
    transforms, every layer evaluates the pool."""
    ctx = current_context()
    if ctx is None or traced_or_transformed():
        return layer_blocks(pool)
    task = torch._C._current_graph_task_id()  # -1 outside a backward pass
    grad = torch.is_grad_enabled()
    frame = current_frame()
    owner = frame if frame is not None else index
    entry = ctx.extra.get((_BLOCKS_KEY, id(pool), grad, task))
    if entry is not None:
        return entry[0]
    if task != -1:
        forward = ctx.extra.get((_BLOCKS_KEY, id(pool), grad, -1))
        if forward is not None:
            return layer_blocks(pool) if forward[1] == owner else forward[0]
        if (_BLOCKS_KEY, id(pool), not grad, -1) in ctx.extra:
            # reentrant checkpointing re-running one layer of a forward pass made without gradients: each
            # re-run is differentiated on its own, so it must not share a tensor with another
            return layer_blocks(pool)
    blocks = layer_blocks(pool)
    ctx.extra[(_BLOCKS_KEY, id(pool), grad, task)] = (blocks, owner)
    return blocks


class PrefixLayer(AdapterLayer):
    """Hosts the prefix adapters of one attention module (its child ``prefix_tuning``).

    Plain data about the module's call, read once when attached: ``params`` (forward parameter
    names), ``cache_name``, ``mask_name``, ``inner`` (path of the module that holds ``layer_idx`` /
    ``config``: ``""`` or BERT's ``"self"``), ``cross``, ``causal``, ``bias`` (T5's ``position_bias``).
    """

    def __init__(self, location: str, params: tuple[str, ...], cache_name: str, mask_name: str, inner: str,
                 cross: bool, causal: bool, bias: bool) -> None:
        super().__init__(location)
        self.params, self.cache_name, self.mask_name, self.inner = params, cache_name, mask_name, inner
        self.cross, self.causal, self.bias = cross, causal, bias
        self.hooked = False
        self.offset_hooked = False

    def leaf(self, name: str, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """``b × 2 × H_kv × P × D`` for the rows ``inputs[0]`` (the attention's input, ``b × T × d``)."""
        hidden = inputs[0]
        unit: PrefixUnit = self.adapters[name]
        kv = unit.kv().unsqueeze(0).expand(hidden.shape[0], -1, -1, -1, -1)
        if unit.gate is None:
            return kv
        gate = torch.sigmoid(unit.gate(hidden.to(unit.gate.weight.dtype))).mean(dim=1)  # b × (1 | 2)
        scale = torch.stack([gate[:, 0], gate[:, -1]], dim=1).view(-1, 2, 1, 1, 1)
        return kv * scale.to(kv.dtype)

    def stack(self, node: StackPlan, inputs: tuple[torch.Tensor, ...], run: Any) -> torch.Tensor:
        """``Stack(a, b)``: both prefixes, ``a``'s first."""
        return torch.cat([run(child, inputs) for child in node.children], dim=3)

    def length(self, plan: PlanNode | None) -> int:
        return plan_length(plan, lambda n: self.adapters[n].length, "prefixes")

    def extra_repr(self) -> str:
        return f"location={self.location}, cross={self.cross}"


def prefix_pre_hook(attr: str, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook of an attention module (see the module docstring)."""
    layer: PrefixLayer | None = module._modules.get(attr)
    plan = layer.active_plan() if layer is not None else None
    if plan is None:
        return None
    names = layer.params
    hidden = get_arg(names, args, kwargs, "hidden_states")
    if hidden is None:
        raise AdapterError(f"Prefix tuning found no hidden_states in the call of {type(module).__name__}.")
    length = layer.length(plan)
    if not length:  # no row of this call goes to a prefix (per-row routing to other adapters)
        return None
    kv = layer.run_plan(plan, (hidden,))
    inner = module.get_submodule(layer.inner) if layer.inner else module
    layer_idx = getattr(inner, "layer_idx", None)
    real = get_arg(names, args, kwargs, *CACHE_KEYS)
    if hasattr(real, "self_attention_cache") and fixed_size(real):
        raise AdapterError("Prefix tuning on an encoder-decoder model cannot use a static (fixed-size) cache: its "
                           "cross-attention cache and relative position biases are sized for the tokens, without "
                           f"the {length} prefix positions. Generate with the default dynamic cache (no "
                           "cache_implementation='static'); decoder-only models take static caches.")
    past = 0
    if not layer.cross and real is not None:
        own = real.self_attention_cache if hasattr(real, "self_attention_cache") else real
        past = cache_length(own, layer_idx if layer_idx is not None else 0)
    args = set_arg(names, args, kwargs, layer.cache_name, wrap_cache(real, *kv.unbind(1), layer.cross),
                   aliases=CACHE_KEYS)
    query = hidden.shape[-2]
    config = getattr(inner, "config", None)
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    mask = get_arg(names, args, kwargs, layer.mask_name)
    try:
        mask = pad_mask(mask, length, query, past, layer.causal, implementation, hidden)
    except ValueError as exc:
        raise AdapterError(str(exc)) from None
    args = set_arg(names, args, kwargs, layer.mask_name, mask)
    if layer.bias and not layer.cross:
        args = _t5_bias(inner, names, args, kwargs, length, query, past, hidden)
    return args, kwargs


def _t5_bias(inner: nn.Module, names: tuple[str, ...], args: tuple, kwargs: dict, length: int, query: int,
             past: int, hidden: torch.Tensor) -> tuple:
    """T5's self-attention: the relative bias of the tokens' own keys, zero for the prefix keys."""
    bias = get_arg(names, args, kwargs, "position_bias")
    keys = past + query
    if bias is None:
        if getattr(inner, "has_relative_attention_bias", False):
            bias = inner.compute_bias(query, keys, device=hidden.device, past_seen_tokens=past)
        else:
            bias = torch.zeros(1, inner.n_heads, query, keys, device=hidden.device, dtype=hidden.dtype)
    elif bias.shape[-1] == keys + length:
        return args
    return set_arg(names, args, kwargs, "position_bias", pad_position_bias(bias, length, keys))


def offset_pre_hook(path: str, params: tuple[str, ...], module: nn.Module, args: tuple,
                    kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook of the base model for adapters with ``offset_positions``: the tokens' positions
    start after the prefix (``position_ids + P``; without ``position_ids``: ``past + arange(T) + P``)."""
    layer: PrefixLayer = module.get_submodule(path)
    plan = layer.active_plan()
    if plan is None:
        return None
    offset = plan_length(plan, lambda n: layer.adapters[n].length if layer.adapters[n].offset else 0,
                         "position offsets")
    if not offset:
        return None
    pos = get_arg(params, args, kwargs, "position_ids")
    if pos is None:
        tokens = get_arg(params, args, kwargs, "input_ids", "inputs_embeds")
        past = cache_length(get_arg(params, args, kwargs, *CACHE_KEYS))
        pos = torch.arange(past, past + tokens.shape[1], device=tokens.device).unsqueeze(0)
    args = set_arg(params, args, kwargs, "position_ids", pos + offset)
    return args, kwargs


@torch.no_grad()
def eject_prefix(model: nn.Module, name: str) -> None:
    """Replace adapter ``name``'s prefix MLPs by their outputs (plain prefixes, ``flat=True``) for inference.

    The model computes the same function afterwards; the adapter saves (and loads) as a flat prefix.

    :raises AdapterError: ``name`` is not a prefix-tuning adapter.
    """
    state = model._adapters_state
    record = state.record(name)
    config = next((c for c in record.config.configs if c.method == "prefix_tuning"), None)
    if config is None:
        raise AdapterError(f"Adapter '{name}' is not a prefix-tuning adapter.")
    container = state.shared_container()
    replaced: dict[int, nn.Module] = {}
    for key, pool in state.shared_modules(name).items():
        if isinstance(pool, PrefixMLP):
            weight = pool.control_trans[2].weight
            flat = PrefixFlat(pool.wte.weight.shape[0], pool.layers, pool.width, pool.dropout.p, weight.dtype,
                              weight.device, values=pool.prefixes())
            flat.train(pool.training)
            flat.control_trans.requires_grad_(weight.requires_grad)
            container[name][key] = flat
            replaced[id(pool)] = flat
    for layer in state.layers(name):
        unit = layer.adapters[name]
        if isinstance(unit, PrefixUnit) and id(unit.pool.module) in replaced:
            unit.pool.module = replaced[id(unit.pool.module)]
    flat_config = config.replace(flat=True)
    record.config = flat_config if record.config is config else type(record.config)(
        *[flat_config if c is config else c for c in record.config.configs])
    state.invalidate()
    state.refresh()
