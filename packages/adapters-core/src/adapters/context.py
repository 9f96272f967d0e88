"""The per-forward context: what a forward pass knows beyond its hidden states.

The model's forward pre-hook (installed by ``adapters.init``) builds a :class:`ForwardContext`
only when the active setup needs one (``MultiTask``, ``Parallel``, methods that read the
attention mask), and pushes it on a *thread-local* stack, so two threads running forward passes
on different models never see each other's context.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["ForwardContext", "current_context", "AdapterSetup", "current_setup"]

_local = threading.local()
#: How many AdapterSetup blocks are open in any thread (a plain global, cheap to read in forward).
_OPEN_SETUPS = 0


def _stack(name: str) -> list:
    stack = getattr(_local, name, None)
    if stack is None:
        stack = []
        setattr(_local, name, stack)
    return stack


@dataclass
class ForwardContext:
    """Facts about the current forward pass, computed once in the model's pre-hook.

    :ivar attention_mask: the ``attention_mask`` passed to the model (``None`` if none).
    :ivar task_ids: one task index per row (``MultiTask``), on the input's device.
    :ivar task_rows: per task, the sorted row positions (host-side sizes, one sync per forward).
    :ivar task_perm: a row permutation that groups rows by task; ``task_inverse`` undoes it.
    :ivar task_sizes: how many rows each task has.
    :ivar parallel: how many copies of the batch ``Parallel`` made (1 if none).
    :ivar extra: room for methods to cache per-forward values (e.g. intervention positions).
    """

    attention_mask: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None
    task_ids: torch.Tensor | None = None
    task_perm: torch.Tensor | None = None
    task_inverse: torch.Tensor | None = None
    task_sizes: list[int] | None = None
    parallel: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def set_task_ids(self, task_ids: torch.Tensor, num_tasks: int, device: torch.device | None = None) -> None:
        """Group rows by task once per forward, on the host: no device sync for task ids given as a
        list or CPU tensor, one copy to the host for ids already on an accelerator."""
        host = task_ids.detach().long().reshape(-1).cpu()
        if host.numel() and (int(host.min()) < 0 or int(host.max()) >= num_tasks):
            raise ValueError(f"task_ids must lie in [0, {num_tasks}); got values outside that range.")
        perm = torch.argsort(host, stable=True)
        self.task_sizes = torch.bincount(host, minlength=num_tasks).tolist()
        device = torch.device(device if device is not None else task_ids.device)
        packed = torch.stack([host, perm, torch.argsort(perm)])
        if device.type == "cuda":
            # one asynchronous copy from pinned memory: no host-device synchronisation
            packed = packed.pin_memory().to(device, non_blocking=True)
        elif device.type != "cpu":
            packed = packed.to(device)
        self.task_ids, self.task_perm, self.task_inverse = packed.unbind(0)


def current_context() -> ForwardContext | None:
    """The context of the innermost forward pass running in this thread, or ``None``."""
    stack = _stack("contexts")
    return stack[-1] if stack else None


def push_context(ctx: ForwardContext) -> None:
    _stack("contexts").append(ctx)


def pop_context() -> None:
    stack = _stack("contexts")
    if stack:
        stack.pop()


class AdapterSetup:
    """Context manager that activates an adapter setup for the forward passes inside it.

    ``with adapters.AdapterSetup("a"): model(**batch)`` runs ``model`` with ``a`` active, whatever
    ``model.active_adapters`` says, and restores nothing afterwards because nothing else changed.
    Pass ``model=`` to activate on that model only; without it, every adapter model that runs a
    forward pass in this thread inside the block uses the setup. Nests; thread-local.
    """

    def __init__(self, setup: Any, model: Any = None, *, task_ids: Sequence[int] | torch.Tensor | None = None) -> None:
        self.setup = setup
        self.model = model
        self.task_ids = task_ids

    def __enter__(self) -> AdapterSetup:
        global _OPEN_SETUPS
        _stack("setups").append(self)
        _OPEN_SETUPS += 1
        return self

    def __exit__(self, *exc: object) -> None:
        global _OPEN_SETUPS
        _stack("setups").remove(self)
        _OPEN_SETUPS -= 1


def current_setup(model: Any) -> AdapterSetup | None:
    """The innermost :class:`AdapterSetup` that applies to ``model`` in this thread."""
    for entry in reversed(_stack("setups")):
        if entry.model is None or entry.model is model:
            return entry
    return None
