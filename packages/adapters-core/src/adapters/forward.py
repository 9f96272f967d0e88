"""The model-level forward hooks ``adapters.init`` installs, and ``generate`` with a setup.

When a forward call starts, :func:`pre_forward` resolves the call's setup (an open
:class:`~adapters.context.AdapterSetup` for this model, else the model's default) into its cached
:class:`~adapters.state.PlanTable` and, only when the call needs one, pushes a
:class:`~adapters.context.ForwardContext`: for a setup other than the default (its plans travel
with the call), ``Parallel`` (the batch is replicated here), ``MultiTask`` (``task_ids`` are
grouped here), per-row ``adapter_names=`` (:func:`rows_table`: a ``MultiTask`` over the model's adapters
plus the base model) and methods that read the token layout (ReFT). :func:`post_forward` (always called)
pops it. Nothing is written to the model or its layers, so threads, ``nn.DataParallel`` replicas
and nested calls each keep their own state.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from . import composition as ac
from . import context as _context
from .context import AdapterSetup, ForwardContext, current_setup, pop_context, push_context
from .errors import CompositionError
from .plan import IDENTITY, MultiTaskPlan
from .plan_compile import PlanTable

__all__ = ["pre_forward", "post_forward", "inner_pre_forward", "inner_post_forward", "generate_with_setup",
           "call_setup", "rows_table", "BASE_ROW"]

#: The name that sends a row of ``adapter_names=[...]`` to the base model (no adapter), as in peft.
BASE_ROW = "__base__"
#: Key of the per-row table in the state's plan cache (never equal to a setup: setups are names or blocks).
_ROWS_KEY = ("adapter_names",)

_BATCH_KEYS = ("input_ids", "inputs_embeds", "pixel_values", "input_features", "decoder_input_ids")
_call_local = threading.local()


def _thread_stack(name: str) -> list:
    """A per-thread list ``name`` (the calls and encoder calls this thread has open)."""
    stack = getattr(_call_local, name, None)
    if stack is None:
        stack = []
        setattr(_call_local, name, stack)
    return stack


def _calls() -> list:
    return _thread_stack("calls")


def call_setup(model: nn.Module) -> tuple[Any, AdapterSetup | None]:
    """``(parsed setup, AdapterSetup entry or None)`` that a call of ``model`` made now would run."""
    state = model._adapters_state
    entry = current_setup(model) if _context.OPEN_SETUPS else None
    if entry is None:
        return state.active, None
    parsed = entry.__dict__.get("_parsed", _MISSING)
    if parsed is _MISSING:
        parsed = ac.parse_composition(entry.setup)
        entry.__dict__["_parsed"] = parsed
    return parsed, entry


_MISSING = object()


def _batch_size(named: dict[str, Any]) -> int | None:
    for key in _BATCH_KEYS:
        value = named.get(key)
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    for value in named.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


def _replicate(value: Any, copies: int, batch: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value.repeat(copies, *([1] * (value.dim() - 1)))
    return value


def pre_forward(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook of an adapter model (see the module docstring)."""
    state = model._adapters_state
    task_ids = kwargs.pop("task_ids", None)
    adapter_names = kwargs.pop("adapter_names", None)
    try:
        setup, entry = call_setup(model)
        if adapter_names is None and entry is not None:
            adapter_names = entry.adapter_names  # generate(adapter_names=...)
        if adapter_names is not None:
            if task_ids is not None:
                raise ValueError("Pass adapter_names (one adapter per row) or task_ids (a MultiTask setup), not both.")
            table, task_ids = rows_table(state, adapter_names)
            own_plans = True
        else:
            # the default table always belongs to state.active (apply_setup writes both, and every change of
            # the active setup goes through it): no lookup on the common path
            table = state.default if entry is None else state.table(setup)
            own_plans = entry is not None and setup != state.active
        if not (own_plans or table.needs_context):
            _calls().append(False)
            return (args, kwargs) if task_ids is not None else None
        if task_ids is None and entry is not None:
            task_ids = entry.task_ids
        label = "task_ids" if adapter_names is None else "adapter_names"
        args, kwargs, ctx = _build_context(state, table, args, kwargs, task_ids, entry, label)
        ctx.plans = table.plans if own_plans else None
    except BaseException:
        _calls().append(False)  # the post-hook (always called) pops one entry per call
        raise
    push_context(ctx)
    _calls().append(True)
    if model.training and torch.is_grad_enabled() and not state.frames_installed:
        _install_layer_frames(state)  # gradient checkpointing must find this call's context again
    return args, kwargs


@torch.compiler.disable  # registers hooks: never traced (a compiled call breaks its graph here, once)
def _install_layer_frames(state: Any) -> None:
    state.ensure_layer_frames()


def post_forward(model: nn.Module, args: tuple, output: Any) -> None:
    """Forward hook (always called) of an adapter model: ends what :func:`pre_forward` started."""
    stack = _calls()
    if stack and stack.pop():
        pop_context()
    return None


def _inner_calls() -> list:
    return _thread_stack("inner_calls")


def inner_pre_forward(state: Any, inner: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook of a module inside an adapter model that users and transformers call on its own: the
    encoder of an encoder-decoder model (``generate()`` runs it before the decoder steps;
    ``model.get_encoder()(...)``) and the base model inside a task model (``model.model(...)``, for
    embeddings). Called alone under an open :class:`AdapterSetup` (or a generation's ``adapter_names`` /
    ``task_ids``), or given ``adapter_names=`` / ``task_ids=`` itself (which its own forward would swallow
    in ``**kwargs``), it runs that setup, as a call of the whole model would. Inside a call of the model
    (its context is active) or with no setup open and no rows to route, it does nothing."""
    model = state.model
    routed = "adapter_names" in kwargs or "task_ids" in kwargs
    if (_context.call_context(state.token) is not None
            or (not routed and (not _context.OPEN_SETUPS or current_setup(model) is None))):
        _inner_calls().append(False)
        return None
    _inner_calls().append(True)  # pre_forward always pushes one entry that post_forward pops
    return pre_forward(model, args, kwargs)


def inner_post_forward(state: Any, inner: nn.Module, args: tuple, output: Any) -> None:
    """Forward hook (always called) of such a module: ends what :func:`inner_pre_forward` started."""
    stack = _inner_calls()
    if stack and stack.pop():
        post_forward(state.model, args, output)
    return None


def _build_context(state: Any, table: Any, args: tuple, kwargs: dict, task_ids: Any, entry: AdapterSetup | None,
                   label: str = "task_ids") -> tuple[tuple, dict, ForwardContext]:
    """The per-call context; replicates the inputs for ``Parallel`` and routes ``task_ids`` (``label``: the
    argument the rows came from, for error messages)."""
    named = dict(zip(state.forward_params, args))
    named.update(kwargs)
    ctx = ForwardContext(token=state.token, attention_mask=named.get("attention_mask"),
                         input_ids=named.get("input_ids"), position_ids=named.get("position_ids"),
                         cache_position=named.get("cache_position"),
                         past_key_values=named.get("past_key_values", named.get("cache")))
    generation_cache = entry is not None and entry.generation and ctx.past_key_values is not None
    # a generation's decode step never reads the cache (a compiled step would recompile per length)
    ctx.continues = generation_cache and entry.cache_started
    if not ctx.continues:
        ctx.past_length()  # now: the model appends to its cache during the call
        if generation_cache:
            entry.cache_started = True
    if table.parallel > 1:
        copies = table.parallel
        ctx.parallel = copies
        if entry is None or not entry.replicated:
            batch = _batch_size(named)
            if batch is not None:
                args = tuple(_replicate(a, copies, batch) for a in args)
                kwargs = {k: _replicate(v, copies, batch) for k, v in kwargs.items()}
                for key in ("attention_mask", "input_ids", "position_ids"):
                    setattr(ctx, key, _replicate(getattr(ctx, key), copies, batch))
    if entry is not None and entry.generation:
        if entry.prompt_lengths is None:  # the first call of a generation is the prompt
            entry.prompt_lengths = _real_lengths(ctx.attention_mask, named)
        if entry.prompt_lengths is not None:
            ctx.prompt_lengths = _expand_rows(entry.prompt_lengths, _batch_size(named))
    if table.task_names is not None:
        if task_ids is None:
            raise ValueError("The active setup is MultiTask: pass task_ids=[...] (one task per row) to forward.")
        ids = _task_ids(task_ids, list(table.task_names))
        batch = _batch_size(named)
        if entry is not None and entry.generation:
            ids = _expand_rows(ids, batch)
        count = ids.numel() if isinstance(ids, torch.Tensor) else len(ids)
        if batch is not None and count != batch:
            raise ValueError(f"{label} has {count} entries for a batch of {batch} rows: pass one per row "
                             f"({_row_entry(label, table.task_names)}).")
        device = next((t.device for t in (ctx.input_ids, ctx.attention_mask) if isinstance(t, torch.Tensor)), None)
        if device is None:
            device = next((v.device for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)
        ctx.set_task_ids(ids, len(table.task_names), device)
    return args, kwargs, ctx


def _expand_rows(values: Any, batch: int | None) -> Any:
    """Per-row ``values`` (a tensor or a list) for a batch that ``generate()`` expanded (``num_beams``,
    ``num_return_sequences``: each row repeated in place, as ``repeat_interleave`` does)."""
    count = values.numel() if isinstance(values, torch.Tensor) else len(values)
    if batch is not None and count and batch != count and batch % count == 0:
        if isinstance(values, torch.Tensor):
            return values.repeat_interleave(batch // count)
        return [v for v in values for _ in range(batch // count)]
    return values


def _real_lengths(mask: Any, named: dict[str, Any]) -> torch.Tensor | None:
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return (mask != 0).sum(dim=1)
    tokens = named.get("input_ids", named.get("inputs_embeds"))
    if isinstance(tokens, torch.Tensor) and tokens.dim() >= 2:
        return torch.full((tokens.shape[0],), tokens.shape[1], dtype=torch.long, device=tokens.device)
    return None


def _task_ids(task_ids: Any, names: list[str]) -> torch.Tensor | list[int]:
    """One task per row: a tensor as given (flattened), or a list of indices (names resolved)."""
    if isinstance(task_ids, torch.Tensor):
        return task_ids.reshape(-1)
    if isinstance(task_ids, str) or not hasattr(task_ids, "__iter__"):
        raise ValueError(f"task_ids must be a list or tensor with one task per row (names of {names} or indices), "
                         f"not {task_ids!r}.")
    ids = []
    for t in task_ids:
        if isinstance(t, str):
            if t not in names:
                raise ValueError(f"task_ids entry {t!r} is not one of the MultiTask adapters {names}.")
            ids.append(names.index(t))
        else:
            ids.append(int(t))
    return ids


def generate_with_setup(model: nn.Module, original: Any, args: tuple, kwargs: dict) -> Any:
    """``model.generate`` with the call's setup applied to the prompt and every decode step.

    ``task_ids=`` (one per prompt row) routes a ``MultiTask`` setup; ``adapter_names=`` (one adapter name per
    prompt row, ``"__base__"`` for the base model) routes each row to its own adapter whatever the active
    setup (:func:`rows_table`). Rows that ``generate`` expands (``num_beams``, ``num_return_sequences``) keep
    their row's task / adapter. With ``Parallel`` active the prompt batch is replicated once, one copy per
    child, so ``generate`` returns ``len(Parallel) × batch`` sequences (the first ``batch`` from the first
    child, ...).
    """
    task_ids = kwargs.pop("task_ids", None)
    adapter_names = kwargs.pop("adapter_names", None)
    setup, entry = call_setup(model)
    if adapter_names is None and entry is not None:
        adapter_names = entry.adapter_names
    named = dict(kwargs)
    if args and isinstance(args[0], torch.Tensor):
        named.setdefault("input_ids", args[0])
    if adapter_names is not None:
        if task_ids is not None:
            raise ValueError("Pass adapter_names (one adapter per row) or task_ids (a MultiTask setup), not both.")
        rows_table(model._adapters_state, adapter_names)  # refuse before generating
        _check_prompt_rows("adapter_names", adapter_names, _batch_size(named))
        scope = AdapterSetup(setup, model=model)
        scope.adapter_names = list(adapter_names)
        scope.generation = True
        with scope:
            return original(model, *args, **kwargs)
    if task_ids is None and entry is not None:
        task_ids = entry.task_ids
    table = model._adapters_state.table(setup)
    if task_ids is not None and table.task_names is not None:
        _check_prompt_rows("task_ids", task_ids, _batch_size(named), table.task_names)
    scope = AdapterSetup(setup, model=model, task_ids=task_ids)
    scope.generation = True
    if table.parallel > 1:
        batch = _batch_size(named)
        if batch is not None:
            args = tuple(_replicate(a, table.parallel, batch) for a in args)
            kwargs = {k: _replicate(v, table.parallel, batch) for k, v in kwargs.items()}
            scope.replicated = True
    with scope:
        return original(model, *args, **kwargs)


def _check_prompt_rows(label: str, rows: Any, batch: int | None, task_names: Any = None) -> None:
    """One entry per prompt row: ``generate()`` repeats each row's entry for the rows it expands (``num_beams``,
    ``num_return_sequences``), so a shorter list must not be stretched over the prompts.

    :raises ValueError: ``rows`` has another length than the prompt batch."""
    count = rows.numel() if isinstance(rows, torch.Tensor) else len(rows) if hasattr(rows, "__len__") else None
    if batch is not None and count is not None and count != batch:
        raise ValueError(f"{label} has {count} entries for {batch} prompts: pass one per prompt row "
                         f"({_row_entry(label, task_names)}); generate() repeats it for num_beams and "
                         "num_return_sequences itself.")


def _row_entry(label: str, task_names: Any) -> str:
    """What one entry of ``adapter_names`` / ``task_ids`` names, for error messages."""
    if label == "adapter_names":
        return f"an adapter name or '{BASE_ROW}'"
    return f"a name of {list(task_names)} or its index" if task_names else "a task name or index"


def rows_table(state: Any, adapter_names: Any) -> tuple[PlanTable, list[int] | None]:
    """The plan table and per-row task ids of a call with ``adapter_names=[...]``: one adapter name per row,
    :data:`BASE_ROW` (``"__base__"``) for a row that runs the base model alone.

    The table is a ``MultiTask`` over every adapter of the model whose methods support ``MultiTask`` (in the
    order they were added) plus a last identity child for base rows. Every such call therefore shares one
    table, whatever subset of adapters it names (cached in the state's plan cache, which is emptied when
    adapters, fusions or merges change), and LoRA's gathered path keeps one stack per layer. Rows that all
    name the base model run the plain base table (no routing).

    :returns: ``(table, ids)``: ``ids`` a list of row indices into the table, ``None`` when no row needs routing.
    :raises ValueError: ``adapter_names`` is not a list of names.
    :raises AdapterNotFoundError: a name the model does not have.
    :raises CompositionError: a named adapter's method does not support ``MultiTask``, or adapters are merged
        into the base weights (merged weights act on every row).
    """
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
        raise ValueError(f"adapter_names must be a list with one adapter name per row ('{BASE_ROW}' for the base "
                         f"model), not {adapter_names!r}.")
    cached = state._plan_cache.get(_ROWS_KEY)
    if cached is None:
        cached = _build_rows_table(state)
    table, index = cached
    ids = []
    for name in adapter_names:
        slot = index.get(name) if isinstance(name, str) else None
        if slot is None:
            if not isinstance(name, str):
                raise ValueError(f"adapter_names entries must be adapter names or '{BASE_ROW}', got {name!r}.")
            record = state.record(name)  # an unknown name raises here
            unsupported = [m.name for m in record.methods if "MultiTask" not in m.supported_blocks]
            raise CompositionError(f"adapter_names: adapter '{name}' uses method(s) {unsupported}, which cannot route "
                                   "rows (no MultiTask support).")
        ids.append(slot)
    if table is None or all(slot == len(index) - 1 for slot in ids):
        return state.table(None), None  # every row runs the base model
    return table, ids


@torch.compiler.disable  # builds blocks and tables (once per adapter set): never traced
def _build_rows_table(state: Any) -> tuple[PlanTable | None, dict[str, int]]:
    """``(table, row index of each name)`` for :func:`rows_table`, stored in the state's plan cache."""
    if state.merged:
        raise CompositionError(f"adapter_names routes each row to its own adapter, but adapter(s) {state.merged} "
                               "are merged into the base weights, which act on every row; call "
                               "model.reset_adapter() first.")
    children = tuple(name for name, record in state.adapters.items()
                     if all("MultiTask" in m.supported_blocks for m in record.methods))
    table = None
    if children:
        inner = state.table(ac.MultiTask(*children))
        plans = tuple(None if p is None else MultiTaskPlan(children=(*p.children, IDENTITY), tasks=(*p.tasks, BASE_ROW))
                      for p in inner.plans)
        table = replace(inner, plans=plans, task_names=(*children, BASE_ROW))
    index = {name: i for i, name in enumerate(children)}
    index[BASE_ROW] = len(children)
    state._plan_cache[_ROWS_KEY] = (table, index)
    return table, index
