"""Prompt tuning (Lester et al. 2021) and prefix tuning (Li & Liang 2021) for the ``adapters`` library."""

from .config import PrefixTuningConfig, PromptTuningConfig
from .prefix import eject_prefix

__all__ = ["PromptTuningConfig", "PrefixTuningConfig", "eject_prefix"]
