"""The per-call state of a forward pass: which plans it runs, how its rows are routed, where its tokens are.

Everything a forward pass reads beyond its hidden states lives in a :class:`ForwardContext` built
by the model's forward pre-hook (:mod:`adapters.forward`) when the call starts, and pushed on a
*thread-local* stack for the duration of that call. Nothing per-call is written to a module: two
threads (or two ``nn.DataParallel`` replicas, which run in their own threads) each see their own
context, and a layer module shared by them is only read.

Two module-level counters let the hot path skip the thread-local lookup when no thread has
anything open (``torch.compile`` guards on them as constants).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["ForwardContext", "current_context", "call_context", "AdapterSetup", "current_setup",
           "traced_or_transformed"]

_local = threading.local()
#: How many AdapterSetup blocks are open in any thread (read in the pre-hook: skip the lookup at 0).
OPEN_SETUPS = 0
#: How many pushed contexts carry their own plans, in any thread (read by every adapter layer).
CALL_PLANS = 0


def _stack(name: str) -> list:
    stack = getattr(_local, name, None)
    if stack is None:
        stack = []
        setattr(_local, name, stack)
    return stack


@dataclass
class ForwardContext:
    """Facts about one forward call of one adapter model, computed once when the call starts.

    :ivar token: the model's :attr:`AdapterState.token`; layers of another model ignore the context.
    :ivar plans: the per-layer plans of this call's setup, indexed by a layer's slot, when the call
        runs another setup than the model's default (``AdapterSetup``, ``generate``); else ``None``.
    :ivar attention_mask: the ``attention_mask`` passed to the model (``None`` if none).
    :ivar input_ids: the ``input_ids`` passed to the model.
    :ivar position_ids: the ``position_ids`` passed to the model (packed sequences restart at 0).
    :ivar cache_position: the ``cache_position`` passed to the model (generation).
    :ivar past_key_values: the cache passed to the model (``past_key_values``, or ``cache`` as
        transformers ≥ 5.2x calls it; generation).
    :ivar task_ids: one task index per row (``MultiTask``), on the input's device.
    :ivar task_perm: a row permutation that groups rows by task; ``task_inverse`` undoes it.
    :ivar task_sizes: how many rows each task has.
    :ivar parallel: how many copies of the batch ``Parallel`` made (1 if none).
    :ivar prompt_lengths: inside ``generate()``, the number of real prompt tokens of each row (from
        the first call, the prompt); methods that edit prompt positions only (ReFT) count within it,
        so generation with and without a cache edits the same tokens. ``None`` outside ``generate``.
    :ivar extra: room for methods to cache per-call values (e.g. intervention positions).
    """

    token: int = -1
    plans: tuple | None = None
    attention_mask: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    cache_position: torch.Tensor | None = None
    past_key_values: Any = None
    task_ids: torch.Tensor | None = None
    task_perm: torch.Tensor | None = None
    task_inverse: torch.Tensor | None = None
    task_sizes: list[int] | None = None
    parallel: int = 1
    prompt_lengths: torch.Tensor | None = None
    #: inside ``generate()``: the call continues the generation's cache (known from the generation's earlier
    #: calls, without reading the cache, whose device-side length a compiled decode step must not branch on)
    continues: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def set_task_ids(self, task_ids: torch.Tensor | list[int], num_tasks: int,
                     device: torch.device | None = None) -> None:
        """Group rows by task once per forward, on the host, in Python: no device sync for task ids given
        as a list (``adapter_names``, names or ints) or CPU tensor, one copy to the host for ids already on
        an accelerator. From a list nothing here is a tensor operation, so under ``torch.compile`` the
        grouping is a constant of the graph (dynamo guards on the list) instead of a graph break."""
        if isinstance(task_ids, torch.Tensor):
            source_device = task_ids.device
            host = [int(t) for t in task_ids.detach().reshape(-1).cpu().tolist()]
        else:
            source_device, host = torch.device("cpu"), [int(t) for t in task_ids]
        if any(t < 0 or t >= num_tasks for t in host):
            raise ValueError(f"task_ids must lie in [0, {num_tasks}); got values outside that range.")
        perm = sorted(range(len(host)), key=host.__getitem__)  # stable: rows of one task keep their order
        inverse = [0] * len(perm)
        for position, row in enumerate(perm):
            inverse[row] = position
        sizes = [0] * num_tasks
        for t in host:
            sizes[t] += 1
        self.task_sizes = sizes
        device = torch.device(device if device is not None else source_device)
        if torch.compiler.is_compiling():
            packed = torch.tensor([host, perm, inverse], dtype=torch.long, device=device)
        else:
            packed = torch.tensor([host, perm, inverse], dtype=torch.long)
            if device.type == "cuda":
                # one asynchronous copy from pinned memory: no host-device synchronisation
                packed = packed.pin_memory().to(device, non_blocking=True)
            elif device.type != "cpu":
                packed = packed.to(device)
        self.task_ids, self.task_perm, self.task_inverse = packed.unbind(0)

    def past_length(self) -> int:
        """How many tokens of each row the cache held before this call (0 without a cache).

        Read from the cache object (no device sync for transformers' dynamic cache), else from
        ``cache_position``. Computed when the call starts (the model appends to its cache during
        the call) and cached.
        """
        if "past_length" in self.extra:
            return self.extra["past_length"]
        value = 0
        cache = self.past_key_values
        if cache is not None and hasattr(cache, "get_seq_length"):
            value = int(cache.get_seq_length())
        elif isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)) and cache[0]:
            value = int(cache[0][0].shape[-2])
        elif isinstance(self.cache_position, torch.Tensor) and self.cache_position.numel():
            value = int(self.cache_position.reshape(-1)[0])
        self.extra["past_length"] = value
        return value


def traced_or_transformed() -> bool:
    """Whether the running code is traced by ``torch.compile`` or runs under a ``torch.func`` transform (``grad``,
    ``vmap``). Bookkeeping keyed by tensor storage, versions or identities is then skipped: traced, reading those
    breaks the graph; under ``torch.func`` the wrapped tensors have no storage, and a value computed from them
    must not outlive the transform in a cache."""
    return torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()


def current_context() -> ForwardContext | None:
    """The context of the innermost forward call running in this thread, or ``None``."""
    stack = _stack("contexts")
    return stack[-1] if stack else None


def call_context(token: int) -> ForwardContext | None:
    """The innermost context in this thread of the model with ``token`` (``None`` if that model is not
    running a forward call with a context here)."""
    stack = getattr(_local, "contexts", None)
    if not stack:
        return None
    for ctx in reversed(stack):
        if ctx.token == token:
            return ctx
    return None


def push_context(ctx: ForwardContext) -> None:
    global CALL_PLANS
    _stack("contexts").append(ctx)
    if ctx.plans is not None:
        CALL_PLANS += 1


def pop_context() -> None:
    global CALL_PLANS
    stack = _stack("contexts")
    if stack:
        ctx = stack.pop()
        if ctx.plans is not None:
            CALL_PLANS -= 1


class AdapterSetup:
    """Context manager that activates an adapter setup for the forward passes inside it.

    ``with adapters.AdapterSetup("a"): model(**batch)`` runs ``model`` with ``a`` active, whatever
    ``model.active_adapters`` says. Nothing on the model changes: the setup is resolved into plans
    when each forward call starts and travels with that call, so other threads using the same model
    keep their own setups. Pass ``model=`` to activate on that model only; without it, every adapter
    model that runs a forward pass in this thread inside the block uses the setup. Nests;
    thread-local (``nn.DataParallel`` replicas run in worker threads and use the model's default
    setup). ``task_ids`` routes rows for a ``MultiTask`` setup.
    """

    def __init__(self, setup: Any, model: Any = None, *, task_ids: Sequence[int] | torch.Tensor | None = None) -> None:
        self.setup = setup
        self.model = model
        self.task_ids = task_ids
        #: set by generate(): the inputs were replicated for Parallel once, before generation
        self.replicated = False
        #: set by generate(adapter_names=...): every call inside routes rows to these adapters (one per prompt
        #: row, "__base__" for the base model; see adapters.forward.rows_table)
        self.adapter_names: list[str] | None = None
        #: set by generate(): the calls inside belong to one generation (see ForwardContext.prompt_lengths)
        self.generation = False
        self.prompt_lengths: torch.Tensor | None = None
        #: set by generate(): a call of this generation already had a cache (later calls continue it)
        self.cache_started = False

    def __enter__(self) -> AdapterSetup:
        global OPEN_SETUPS
        _stack("setups").append(self)
        OPEN_SETUPS += 1
        return self

    def __exit__(self, *exc: object) -> None:
        global OPEN_SETUPS
        _stack("setups").remove(self)
        OPEN_SETUPS -= 1


def current_setup(model: Any) -> AdapterSetup | None:
    """The innermost :class:`AdapterSetup` that applies to ``model`` in this thread."""
    for entry in reversed(_stack("setups")):
        if entry.model is None or entry.model is model:
            return entry
    return None
