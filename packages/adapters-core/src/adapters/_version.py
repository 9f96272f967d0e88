"""The version of adapters-core (one place, imported by modules that record it)."""

__version__ = "0.1.0"
