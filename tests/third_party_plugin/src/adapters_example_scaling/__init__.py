"""An example third-party method plugin for ``adapters``: learned per-channel FFN output scaling."""

from .config import ChannelScaleConfig

__all__ = ["ChannelScaleConfig"]
__version__ = "0.1.0"
