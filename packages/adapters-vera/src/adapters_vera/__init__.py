"""VeRA (vector-based random matrix adaptation) for the ``adapters`` library."""

from .config import VeraConfig

__all__ = ["VeraConfig"]
