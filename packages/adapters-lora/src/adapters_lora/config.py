"""Configs of the LoRA family (SPEC §4)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from adapters import AdapterConfig
from adapters.plugin import check_module_fields

__all__ = ["LoRAConfig", "DoRAConfig", "IA3Config", "MTLLoRAConfig"]

ATTN_MATRICES = ("q", "k", "v", "o")
INIT_SCHEMES = ("lora", "bert", "ia3", "gaussian")


@dataclass
class LoRAConfig(AdapterConfig):
    """Low-rank adaptation: ``y = Wx + b + s·B(A·dropout(x))`` with ``s = alpha / r``.

    :param selfattn_lora: adapt the attention projections named in ``attn_matrices``.
    :param intermediate_lora: adapt the FFN up projection. :param output_lora: the FFN down projection.
    :param leave_out: layer indices to skip. :param r: rank. :param alpha: scaling numerator.
    :param dropout: dropout on the LoRA input. :param attn_matrices: any of ``q``, ``k``, ``v``, ``o``.
    :param composition_mode: ``"add"`` (LoRA) or ``"scale"`` (IA3: ``y = l ⊙ (Wx + b)``).
    :param init_weights: ``"lora"`` (A Kaiming-uniform, B zeros), ``"bert"`` (both N(0, 0.02)),
        ``"ia3"`` (scaling vector of ones), ``"gaussian"`` (A N(0, 1/r), B zeros).
    :param init_weights_seed: seed for a private generator (the global RNG is never touched).
    :param use_gating: multiply the delta by a learned per-sequence gate.
    :param use_dora: weight-decomposed LoRA. :param use_rslora: ``s = alpha / sqrt(r)``.
    :param dtype: weight dtype (``"float32"``, ``"bfloat16"`` ...); ``None`` follows the base weight.
    :param target_modules: place the adapter by module names instead of the interface fields above: a
        list of names (a module matches when its dotted path equals an entry or ends with ``"." + entry``:
        ``["q_proj", "v_proj"]``), a regular expression matching whole paths, or ``"all-linear"`` (every
        linear projection inside the Transformer layers; never the output head). Any ``nn.Linear`` /
        ``Conv1D`` (a fused q|k|v projection is adapted whole) and, for LoRA, ``nn.Embedding``
        (``embed_tokens``) and the LM head (``lm_head``). ``None``: the interface fields decide.
    :param exclude_modules: names (or a regular expression) taken out of ``target_modules``.
    :param layers_to_transform: only these layer indices (both ways of placing; ``None``: all).
    :param feedforward_modules: with ``composition_mode="scale"`` (IA3): the targets whose *input* is scaled,
        ``y = W(l ⊙ x) + b`` (names or a regular expression, as ``target_modules``; PEFT's field of this name).
    :param rank_pattern: per-module ranks, ``{pattern: r}`` (keys match like ``target_modules`` entries, or
        as a regular expression over the end of a path); :param alpha_pattern: per-module ``alpha``.
    """

    method: ClassVar[str] = "lora"

    selfattn_lora: bool = True
    intermediate_lora: bool = False
    output_lora: bool = False
    leave_out: list[int] = field(default_factory=list)
    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    attn_matrices: list[str] = field(default_factory=lambda: ["q", "v"])
    composition_mode: str = "add"
    init_weights: str = "lora"
    init_weights_seed: int | None = None
    use_gating: bool = False
    use_dora: bool = False
    use_rslora: bool = False
    dtype: str | None = None
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    feedforward_modules: list[str] | str | None = None

    @property
    def label(self) -> str:
        """``"ia3"``, ``"dora"``, ``"mtl_lora"`` or ``"lora"``: the variant this config selects (for summaries)."""
        if self.composition_mode == "scale":
            return "ia3"
        if self.use_dora:
            return "dora"
        return "mtl_lora" if getattr(self, "n_up_projection", None) is not None else "lora"

    def __post_init__(self) -> None:
        check_module_fields(self)
        if self.feedforward_modules is not None and (self.composition_mode != "scale" or self.use_gating):
            raise ValueError("feedforward_modules (IA3 scaling a module's input) needs composition_mode='scale' "
                             "and no gating.")
        self.leave_out = list(self.leave_out)
        self.attn_matrices = list(self.attn_matrices)
        bad = [m for m in self.attn_matrices if m not in ATTN_MATRICES]
        if bad:
            raise ValueError(f"attn_matrices may hold {list(ATTN_MATRICES)}, got {bad}.")
        if self.composition_mode not in ("add", "scale"):
            raise ValueError(f"composition_mode must be 'add' or 'scale', got {self.composition_mode!r}.")
        if self.init_weights not in INIT_SCHEMES:
            raise ValueError(f"init_weights must be one of {INIT_SCHEMES}, got {self.init_weights!r}.")
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be a positive integer, got {self.r!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout!r}.")
        if self.use_dora and self.composition_mode != "add":
            raise ValueError("use_dora needs composition_mode='add'.")

    @property
    def scaling(self) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA); 1 in scale mode."""
        if self.composition_mode == "scale":
            return 1.0
        return self.alpha / (self.r ** 0.5 if self.use_rslora else self.r)


@dataclass
class DoRAConfig(LoRAConfig):
    """Weight-decomposed LoRA: ``y = m ⊙ (W + s·BA)x / ‖W + s·BA‖_row + b``, ``m`` starts at ``‖W‖_row``."""

    use_dora: bool = True


@dataclass
class IA3Config(LoRAConfig):
    """IA3: a learned per-feature scaling ``y = l ⊙ (Wx + b)`` of keys, values and the FFN up projection."""

    attn_matrices: list[str] = field(default_factory=lambda: ["k", "v"])
    intermediate_lora: bool = True
    r: int = 1
    alpha: float = 1
    composition_mode: str = "scale"
    init_weights: str = "ia3"


@dataclass
class MTLLoRAConfig(LoRAConfig):
    """Multi-task LoRA: ``Δ = s·Σ_i softmax(w_t/τ)_i · B_i Λ_t A x`` for task ``t``.

    :param n_up_projection: number of up projections ``B_i`` (shared across the tasks joined by
        ``share_parameters``). :param task_specific_matrix_type: ``"singular_values"`` (diagonal
        ``Λ_t``) or ``"linear"`` (full r×r). :param weights_sharpness: temperature ``τ``.
    """

    n_up_projection: int = 1
    task_specific_matrix_type: str = "singular_values"
    weights_sharpness: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.task_specific_matrix_type not in ("singular_values", "linear"):
            raise ValueError("task_specific_matrix_type must be 'singular_values' or 'linear'.")
        if self.n_up_projection < 1:
            raise ValueError("n_up_projection must be at least 1.")
        if self.composition_mode != "add" or self.use_dora:
            raise ValueError("MTL-LoRA needs composition_mode='add' and use_dora=False.")
        if self.weights_sharpness <= 0:
            raise ValueError("weights_sharpness (the softmax temperature) must be positive.")
