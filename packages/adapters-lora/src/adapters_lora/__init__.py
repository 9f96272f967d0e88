"""LoRA-family methods (LoRA, DoRA, IA3, MTL-LoRA) for the ``adapters`` library."""

from .config import DoRAConfig, IA3Config, LoRAConfig, MTLLoRAConfig

__all__ = ["LoRAConfig", "DoRAConfig", "IA3Config", "MTLLoRAConfig"]
