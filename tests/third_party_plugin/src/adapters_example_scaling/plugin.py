"""Plugin entry point of adapters-example-scaling (named by the package's entry points)."""

from __future__ import annotations

from collections.abc import Callable

from adapters import hookimpl


@hookimpl
def adapters_register_methods(register: Callable) -> None:
    """Register :class:`~adapters_example_scaling.method.ChannelScaleMethod` with core."""
    from .method import ChannelScaleMethod

    register(ChannelScaleMethod())
