"""Representation fine-tuning (ReFT: LoReFT, NoReFT, DiReFT) for the ``adapters`` library."""

from .config import DiReftConfig, LoReftConfig, NoReftConfig, ReftConfig
from .layer import prompt_lengths

__all__ = ["ReftConfig", "LoReftConfig", "NoReftConfig", "DiReftConfig", "prompt_lengths"]
