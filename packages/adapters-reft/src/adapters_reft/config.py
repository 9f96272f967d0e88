"""Configs of representation fine-tuning (SPEC §4, ReFT)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from adapters import AdapterConfig

__all__ = ["ReftConfig", "LoReftConfig", "NoReftConfig", "DiReftConfig", "NON_LINEARITIES"]

#: Names accepted by ``non_linearity`` (``None`` and ``"linear"`` / ``"identity"`` mean no activation).
NON_LINEARITIES = ("linear", "identity", "relu", "gelu", "tanh", "sigmoid", "silu", "swish")


@dataclass
class ReftConfig(AdapterConfig):
    """Representation fine-tuning: an edit of the hidden states a Transformer layer outputs.

    At the chosen positions of each chosen layer's output ``h`` (size ``d``) the adapter computes
    ``φ(h) = h + Rᵀ(act(Wh + b) − Rh)`` with ``R: r×d`` (orthonormal rows when ``orthogonality``)
    and ``W: r×d``, ``b: r``. Without ``subtract_projection`` the ``−Rh`` term is dropped
    (DiReFT: ``φ(h) = h + Rᵀ act(Wh + b)``).

    :param layers: ``"all"`` or a list of layer indices (negative indices count from the end).
    :param prefix_positions: how many of the first *real* tokens of each sequence are edited.
    :param suffix_positions: how many of the last real tokens are edited.
    :param r: rank of the intervention (rows of ``R`` and ``W``).
    :param orthogonality: keep ``R``'s rows orthonormal (recomputed from a free parameter in float32
        by Gram-Schmidt on every forward, so it holds exactly while training and after loading).
    :param tied_weights: prefix and suffix positions share one intervention; otherwise each has its own.
    :param subtract_projection: include the ``−Rh`` term (LoReFT, NoReFT); ``False`` for DiReFT.
    :param dropout: dropout on the edit ``act(Wh + b) − Rh`` while training.
    :param non_linearity: ``act``: ``None`` (identity) or one of :data:`NON_LINEARITIES`.
    :param dtype: weight dtype (``"float32"``, ``"bfloat16"`` ...); ``None`` follows the base model.
    """

    method: ClassVar[str] = "reft"

    layers: str | list[int] = "all"
    prefix_positions: int = 3
    suffix_positions: int = 0
    r: int = 1
    orthogonality: bool = True
    tied_weights: bool = False
    subtract_projection: bool = True
    dropout: float = 0.05
    non_linearity: str | None = None
    dtype: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.layers, str):
            if self.layers != "all":
                raise ValueError(f"layers must be 'all' or a list of layer indices, got {self.layers!r}.")
        else:
            if isinstance(self.layers, int):
                self.layers = [self.layers]
            self.layers = [int(i) for i in self.layers]
            if not self.layers:
                raise ValueError("layers is empty: pass 'all' or at least one layer index.")
        for name in ("prefix_positions", "suffix_positions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
        if self.prefix_positions + self.suffix_positions == 0:
            raise ValueError("ReFT needs prefix_positions or suffix_positions > 0; otherwise it edits nothing.")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be a positive integer, got {self.r!r}.")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout!r}.")
        if self.non_linearity is not None and str(self.non_linearity).lower() not in NON_LINEARITIES:
            raise ValueError(f"non_linearity must be None or one of {NON_LINEARITIES}, got {self.non_linearity!r}.")


@dataclass
class LoReftConfig(ReftConfig):
    """LoReFT: orthonormal ``R``, rank 1, the first 3 real tokens of every layer's output."""

    prefix_positions: int = 3
    r: int = 1
    orthogonality: bool = True


@dataclass
class NoReftConfig(ReftConfig):
    """NoReFT: LoReFT without the orthonormality constraint on ``R``."""

    orthogonality: bool = False


@dataclass
class DiReftConfig(ReftConfig):
    """DiReFT: ``φ(h) = h + Rᵀ act(Wh + b)``: no ``−Rh`` term and no orthonormality constraint."""

    orthogonality: bool = False
    subtract_projection: bool = False
