"""Plugin entry point of adapters-reft: registers the ReFT method with core."""

from __future__ import annotations

from collections.abc import Callable

from adapters import hookimpl


@hookimpl
def adapters_register_methods(register: Callable) -> None:
    """Register :class:`~adapters_reft.method.ReftMethod`."""
    from .method import ReftMethod

    register(ReftMethod())
