"""Layer frames: per-call scratch space of one Transformer layer's forward, and recomputation.

Core registers two hooks on a Transformer layer module (``model_layers[i]``) when a method asks
for frames (:meth:`adapters.method.AttachSite.layer_frames`) or when a forward call carries a
context while training. They are plain module-level functions (no closure over a module), so
``nn.DataParallel`` replicas, deep copies and pickles see ordinary hooks:

* on entry, a :class:`LayerFrame` for *the module actually called* (the replica, the copy) is
  pushed on a thread-local stack; hooks of the layer's inner modules find their adapter layer
  through :func:`frame_child` and keep per-call tensors in ``frame.scratch``, never on a module;
* gradient checkpointing runs a layer again in the backward pass (reentrant or not, on any
  thread), where no forward call is running. The call's context and frame travel with the graph:
  transformers' checkpointing function on the layer (``_gradient_checkpointing_func``, which
  checkpoints ``forward`` only, outside the layer's hooks) is wrapped by
  :class:`CallContextCheckpoint`, which binds the running call's context and frame to the function
  it checkpoints; a checkpoint around the whole module call (``torch.utils.checkpoint`` on the
  module, activation-checkpoint wrappers), which runs the hooks again, finds the context remembered
  under the layer's input tensor, an entry that lives exactly as long as autograd keeps that tensor.
  Either way any number of forward calls may precede one backward.
"""

from __future__ import annotations

import threading
import weakref
from functools import partial
from typing import Any

import torch
from torch import nn

from .context import ForwardContext, current_context, pop_context, push_context, traced_or_transformed

__all__ = ["LayerFrame", "CallContextCheckpoint", "current_frame", "frame_child", "install_layer_frames",
           "remove_layer_frames"]

_local = threading.local()
_saved: dict[tuple, tuple[int, ForwardContext]] = {}
_ids = iter(range(1 << 62))
#: attribute marking a Transformer layer whose frame hooks are installed (a plain bool in __dict__)
_MARK = "_adapters_frames"


class LayerFrame:
    """One running forward call of one Transformer layer: the module called and its scratch space."""

    __slots__ = ("owner", "restored", "scratch")

    def __init__(self, owner: nn.Module, restored: bool) -> None:
        self.owner = owner
        self.scratch: dict[str, Any] = {}
        self.restored = restored


def _frames() -> list[LayerFrame]:
    stack = getattr(_local, "frames", None)
    if stack is None:
        stack = _local.frames = []
    return stack


def current_frame() -> LayerFrame | None:
    """The innermost Transformer layer call running in this thread (``None`` outside one)."""
    stack = getattr(_local, "frames", None)
    return stack[-1] if stack else None


def frame_child(attr: str) -> tuple[LayerFrame, nn.Module] | tuple[None, None]:
    """The innermost running layer that has a child ``attr`` and that child (of the called module)."""
    stack = getattr(_local, "frames", None)
    if stack:
        for frame in reversed(stack):
            child = frame.owner._modules.get(attr)
            if child is not None:
                return frame, child
    return None, None


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    value = args[0] if args else kwargs.get("hidden_states")
    return value if isinstance(value, torch.Tensor) else None


def _key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), t.dtype, t.device)


def _forget(key: tuple, ident: int) -> None:
    entry = _saved.get(key)
    if entry is not None and entry[0] == ident:
        del _saved[key]


def _remember(t: torch.Tensor, ctx: ForwardContext) -> None:
    key = _key(t)
    entry = _saved.get(key)
    if entry is not None and entry[1] is ctx:
        return
    ident = next(_ids)
    _saved[key] = (ident, ctx)
    weakref.finalize(t, _forget, key, ident)


class CallContextCheckpoint:
    """Wraps a layer's checkpointing function so the recomputation runs in the forward call's context
    and frame (both captured when the checkpointed function is handed over, i.e. with the graph)."""

    def __init__(self, original: Any) -> None:
        self.original = original

    def __call__(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        return self.original(partial(_run_in_call, current_context(), current_frame(), function), *args, **kwargs)


def _run_in_call(ctx: ForwardContext | None, frame: LayerFrame | None, function: Any, *args: Any,
                 **kwargs: Any) -> Any:
    push = ctx is not None and current_context() is not ctx
    enter = frame is not None and current_frame() is not frame
    if push:
        push_context(ctx)
    if enter:
        _frames().append(frame)
    try:
        return function(*args, **kwargs)
    finally:
        if enter:
            _frames().pop()
        if push:
            pop_context()


def _wrap_checkpointing(module: nn.Module) -> None:
    checkpointing = module.__dict__.get("_gradient_checkpointing_func")
    if checkpointing is not None and type(checkpointing) is not CallContextCheckpoint:
        module.__dict__["_gradient_checkpointing_func"] = CallContextCheckpoint(checkpointing)


def _enter_layer(module: nn.Module, args: tuple, kwargs: dict) -> None:
    if module.training:
        _wrap_checkpointing(module)
    if traced_or_transformed():
        # traced, or under torch.func (grad, vmap: wrapped tensors have no storage address): no tensor-keyed
        # bookkeeping (addresses, weak references and the id counter cannot be traced; a checkpointed region
        # the graph keeps recomputes inside it, and one it leaves to eager code finds its context through the
        # wrapped checkpointing function above)
        _frames().append(LayerFrame(module, False))
        return None
    ctx = current_context()
    restored = False
    if ctx is None:
        if _saved:
            t = _first_tensor(args, kwargs)
            entry = _saved.get(_key(t)) if t is not None else None
            if entry is not None:  # gradient checkpointing recomputes this layer: use its call's context
                push_context(entry[1])
                restored = True
    elif module.training:
        t = _first_tensor(args, kwargs)
        if t is not None:
            _remember(t, ctx)
    _frames().append(LayerFrame(module, restored))
    return None


def _exit_layer(module: nn.Module, args: tuple, output: Any) -> None:
    stack = _frames()
    if stack:
        frame = stack.pop()
        if frame.restored:
            pop_context()
    return None


def install_layer_frames(owner: nn.Module) -> list[Any]:
    """Register the frame hooks on Transformer layer ``owner`` (once); return the new hook handles.

    The entry hook goes first among the pre-hooks and the exit hook last among the forward hooks
    registered so far; a method that hooks the layer's output itself registers with ``prepend=True``.
    """
    if owner.__dict__.get(_MARK):
        return []
    handles = [owner.register_forward_pre_hook(_enter_layer, with_kwargs=True, prepend=True),
               owner.register_forward_hook(_exit_layer, always_call=True)]
    owner.__dict__[_MARK] = True
    return handles


def remove_layer_frames(owners: list[nn.Module], handles: list[Any]) -> None:
    """Undo :func:`install_layer_frames` on ``owners`` (remove ``handles``)."""
    for handle in handles:
        handle.remove()
    for owner in owners:
        owner.__dict__.pop(_MARK, None)
