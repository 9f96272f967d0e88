"""Bottleneck adapters and AdapterFusion for the ``adapters`` library."""

from .config import (
    AdapterFusionConfig,
    AdapterPlusConfig,
    BnConfig,
    CompacterConfig,
    CompacterPlusPlusConfig,
    DoubleSeqBnConfig,
    DynamicAdapterFusionConfig,
    ParBnConfig,
    SeqBnConfig,
    StaticAdapterFusionConfig,
)

__all__ = [
    "BnConfig",
    "SeqBnConfig",
    "DoubleSeqBnConfig",
    "ParBnConfig",
    "AdapterPlusConfig",
    "CompacterConfig",
    "CompacterPlusPlusConfig",
    "AdapterFusionConfig",
    "StaticAdapterFusionConfig",
    "DynamicAdapterFusionConfig",
]
