"""Config of VeRA (SPEC §4)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from adapters import AdapterConfig
from adapters.plugin import check_module_fields

__all__ = ["VeraConfig"]

ATTN_MATRICES = ("q", "k", "v", "o")


@dataclass
class VeraConfig(AdapterConfig):
    """Vector-based random matrix adaptation: ``y = Wx + b + s·λ_b ⊙ B(λ_d ⊙ A·dropout(x))``.

    ``A`` (``r × max_in``) and ``B`` (``max_out × r``) are frozen random matrices shared by every
    layer of the adapter, generated from ``projection_prng_key`` and sliced to each layer's widths;
    only the vectors ``λ_d`` (``r``) and ``λ_b`` (one entry per output feature) are trained.

    :param r: rank of the shared random projections.
    :param vera_d: initial value of every ``λ_d`` entry. :param vera_b: initial value of every
        ``λ_b`` entry (0 makes a fresh adapter a no-op).
    :param projection_prng_key: seed of the private CPU generator that draws ``A`` and ``B``
        (the same key gives the same projections on every machine; the global RNG is never touched).
    :param save_projection: store ``A`` and ``B`` in checkpoints; with ``False`` they are left out
        (smaller files) and regenerated from the key when the adapter is loaded.
    :param selfattn_lora: adapt the attention projections named in ``attn_matrices``.
    :param intermediate_lora: adapt the FFN up projection. :param output_lora: the FFN down projection.
    :param leave_out: layer indices to skip.
    :param attn_matrices: any of ``q``, ``k``, ``v``, ``o``.
    :param alpha: scaling numerator, ``s = alpha / r``. The default ``None`` means ``alpha = r``,
        i.e. ``s = 1``: as in the VeRA paper, the trained vectors carry the scale.
    :param dropout: dropout on the adapter's input.
    :param dtype: dtype of the vectors and projections (``"float32"``, ``"bfloat16"`` ...); ``None``
        follows the base weight.
    :param target_modules: place the adapter by module names (a list, a regular expression or
        ``"all-linear"``), as in :class:`adapters.LoRAConfig`; ``None``: the interface fields decide.
    :param exclude_modules: names taken out of ``target_modules``.
    :param layers_to_transform: only these layer indices (``None``: all).
    """

    method: ClassVar[str] = "vera"

    r: int = 256
    vera_d: float = 0.1
    vera_b: float = 0.0
    projection_prng_key: int = 0
    save_projection: bool = True
    selfattn_lora: bool = True
    intermediate_lora: bool = False
    output_lora: bool = False
    leave_out: list[int] = field(default_factory=list)
    attn_matrices: list[str] = field(default_factory=lambda: ["q", "v"])
    alpha: float | None = None
    dropout: float = 0.0
    dtype: str | None = None
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | None = None

    def __post_init__(self) -> None:
        check_module_fields(self)
        self.leave_out = [int(i) for i in self.leave_out]
        self.attn_matrices = list(self.attn_matrices)
        bad = [m for m in self.attn_matrices if m not in ATTN_MATRICES]
        if bad:
            raise ValueError(f"attn_matrices may hold {list(ATTN_MATRICES)}, got {bad}.")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be a positive integer, got {self.r!r}.")
        if isinstance(self.projection_prng_key, bool) or not isinstance(self.projection_prng_key, int):
            raise ValueError(f"projection_prng_key must be an integer, got {self.projection_prng_key!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout!r}.")

    @property
    def scaling(self) -> float:
        """``alpha / r`` (1 when ``alpha`` is ``None``)."""
        return 1.0 if self.alpha is None else float(self.alpha) / self.r
