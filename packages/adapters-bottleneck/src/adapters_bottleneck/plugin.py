"""Plugin entry point of adapters-bottleneck: registers the bottleneck method with core."""

from __future__ import annotations

from collections.abc import Callable

from adapters import hookimpl


@hookimpl
def adapters_register_methods(register: Callable) -> None:
    """Register :class:`~adapters_bottleneck.method.BottleneckMethod`."""
    from .method import BottleneckMethod

    register(BottleneckMethod())
