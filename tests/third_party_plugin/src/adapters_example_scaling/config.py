"""Configuration of the ``channel_scale`` method."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from adapters.plugin import AdapterConfig

__all__ = ["ChannelScaleConfig"]


@dataclasses.dataclass
class ChannelScaleConfig(AdapterConfig):
    """A learned scale per output channel of each layer's FFN output projection.

    :param init_scale: initial value of every scale (``1.0``: the adapter starts as the identity).
    :param leave_out: indices of layers that get no scaling.
    :param dtype: dtype of the scales (``None``: the dtype of the projection's weight).
    """

    method: ClassVar[str] = "channel_scale"
    init_scale: float = 1.0
    leave_out: list[int] = dataclasses.field(default_factory=list)
    dtype: str | None = None
