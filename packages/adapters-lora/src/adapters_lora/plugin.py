"""Plugin entry point of adapters-lora: registers the LoRA-family method with core."""

from __future__ import annotations

from collections.abc import Callable

from adapters import hookimpl


@hookimpl
def adapters_register_methods(register: Callable) -> None:
    """Register :class:`~adapters_lora.method.LoRAMethod`."""
    from .method import LoRAMethod

    register(LoRAMethod())
