"""Exceptions raised by the model API. Each message says what is wrong and how to fix it."""

from __future__ import annotations

__all__ = ["AdapterError", "AdapterNotFoundError", "CompositionError", "CheckpointError"]


class AdapterError(ValueError):
    """An adapter operation cannot be carried out; the model is left unchanged."""


class AdapterNotFoundError(AdapterError, KeyError):
    """An adapter name that the model does not have."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CompositionError(AdapterError):
    """A composition setup that is malformed or that a method does not support."""


class CheckpointError(AdapterError):
    """A saved adapter that is missing, corrupt or does not fit the model."""
