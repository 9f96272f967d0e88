"""Plugin entry point of adapters-prompt: registers prompt tuning and prefix tuning with core."""

from __future__ import annotations

from collections.abc import Callable

from adapters import hookimpl


@hookimpl
def adapters_register_methods(register: Callable) -> None:
    """Register :class:`~adapters_prompt.method.PromptTuningMethod` and
    :class:`~adapters_prompt.method.PrefixTuningMethod`."""
    from .method import PrefixTuningMethod, PromptTuningMethod

    register(PromptTuningMethod())
    register(PrefixTuningMethod())
