"""Reading and rewriting a module call's arguments from a forward pre-hook, by parameter name.

transformers passes the same argument by keyword in one model and by position in another (BERT's
attention gets its mask positionally), and renamed some (``past_key_values`` → ``cache``, GPT-NeoX's
``layer_past``). The names of a module's ``forward`` parameters are read once, when an adapter layer is
attached (:func:`param_names`), and kept on the layer as a tuple of strings; the hooks then find and
replace values with :func:`get_arg` / :func:`set_arg`, never mutating the caller's tensors.
"""

from __future__ import annotations

import inspect
import threading
from typing import Any

from torch import nn

__all__ = ["CACHE_KEYS", "param_names", "cache_param", "get_arg", "set_arg", "push_call", "pop_call"]

#: Names under which transformers modules take a key/value cache.
CACHE_KEYS = ("cache", "past_key_values", "past_key_value", "layer_past")

_local = threading.local()


def param_names(module: nn.Module) -> tuple[str, ...]:
    """Names of ``module.forward``'s parameters that may be passed positionally or by keyword, in order
    (decorators that keep ``__wrapped__`` are looked through)."""
    try:
        sig = inspect.signature(type(module).forward)
    except (TypeError, ValueError):
        return ()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
             inspect.Parameter.KEYWORD_ONLY)
    return tuple(p.name for p in list(sig.parameters.values())[1:] if p.kind in kinds)


def cache_param(names: tuple[str, ...]) -> str | None:
    """The name under which a ``forward`` with parameters ``names`` takes its cache (``None``: it takes none)."""
    return next((n for n in CACHE_KEYS if n in names), None)


def get_arg(names: tuple[str, ...], args: tuple, kwargs: dict[str, Any], *keys: str) -> Any:
    """The value passed for the first of ``keys`` that the call has (keyword or position); ``None`` if none."""
    for key in keys:
        if key in kwargs:
            return kwargs[key]
        if key in names:
            index = names.index(key)
            if index < len(args):
                return args[index]
    return None


def set_arg(names: tuple[str, ...], args: tuple, kwargs: dict[str, Any], key: str, value: Any,
            aliases: tuple[str, ...] = ()) -> tuple:
    """Pass ``value`` for parameter ``key`` (or the alias the caller used); returns the new ``args``
    (``kwargs`` is updated in place: it is the hook's own copy)."""
    for name in (key, *aliases):
        if name in kwargs:
            kwargs[name] = value
            return args
    for name in (key, *aliases):
        if name in names and names.index(name) < len(args):
            index = names.index(name)
            return (*args[:index], value, *args[index + 1:])
    kwargs[key] = value
    return args


def push_call(module: nn.Module, value: int) -> None:
    """Remember ``value`` for the running call of ``module`` in this thread (read back by :func:`pop_call`
    in the module's forward hook). Per thread, never on the module."""
    stack = getattr(_local, "calls", None)
    if stack is None:
        stack = _local.calls = []
    stack.append((id(module), value))


def pop_call(module: nn.Module) -> int:
    """What :func:`push_call` remembered for this call of ``module`` (0 when its pre-hook did not run)."""
    stack = getattr(_local, "calls", None)
    if stack and stack[-1][0] == id(module):
        return stack.pop()[1]
    return 0
