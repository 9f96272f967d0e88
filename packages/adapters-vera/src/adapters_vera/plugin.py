"""Plugin entry point of adapters-vera: registers the VeRA method with core."""

from __future__ import annotations

from collections.abc import Callable

from adapters import hookimpl


@hookimpl
def adapters_register_methods(register: Callable) -> None:
    """Register :class:`~adapters_vera.method.VeraMethod`."""
    from .method import VeraMethod

    register(VeraMethod())
