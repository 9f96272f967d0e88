"""Configs of bottleneck adapters and AdapterFusion (SPEC §4).

Notation used in every docstring below, at one adapter location of one Transformer layer:

* ``h`` -- the sub-block output: the output of the attention output projection (``mh_adapter``,
  cross-attention too) or of the FFN output projection (``output_adapter``);
* ``x`` -- the residual stream entering the sub-block, captured as the input of the interface's
  ``layer_pre_self_attn`` / ``layer_pre_cross_attn`` / ``layer_pre_ffn`` module;
* ``LN`` -- the norm the interface names for the location (``layer_ln_1`` after attention,
  ``layer_ln_2`` after the FFN; identity when not named, e.g. for pre-norm models and for
  cross-attention);
* ``f(z) = up(act(down(z)))`` -- the bottleneck, ``down: d → d / reduction_factor``;
* ``s`` -- the scaling (a number, a learned scalar or a learned per-channel vector).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from adapters import AdapterConfig

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
    "NON_LINEARITIES",
    "INIT_SCHEMES",
    "load_fusion_config",
]

#: Activation names accepted by ``non_linearity`` (lower case).
NON_LINEARITIES = ("relu", "gelu", "gelu_new", "gelu_tanh", "swish", "silu", "tanh", "sigmoid", "leakyrelu",
                   "identity", "linear")
INIT_SCHEMES = ("bert", "mam_adapter", "houlsby")
PHM_INITS = ("glorot-uniform", "glorot-normal", "normal", "uniform")


@dataclass
class BnConfig(AdapterConfig):
    """A bottleneck adapter (method ``"bottleneck"``).

    **Sequential** (``is_parallel=False``)::

        h'  = LN(h + x)        if original_ln_before else h          (adapter input)
        r   = h                if residual_before_ln is True
              h + x            if residual_before_ln == "post_add"
              h'               if residual_before_ln is False          (adapter residual)
        a   = s · f(ln_before(h'))                                    (ln_before: own LayerNorm if set)
        out = ln_after(a + r)  if adapter_residual_before_ln else ln_after(a) + r

    ``ln_after`` (own LayerNorm) only applies when ``ln_after=True``. The gate (``use_gating``)
    multiplies ``a`` by ``sigmoid(g(h'))`` averaged over the sequence; ``stochastic_depth`` drops
    ``a`` for whole rows while training (rescaling the kept rows); ``dropout`` is applied to the
    bottleneck's input.

    **Parallel** (``is_parallel=True``): ``out = h + s · f(x)`` (with the same ln_before / gate /
    dropout options).

    **What happens with out** (exact semantics implemented):

    * ``original_ln_after=True``: ``out`` replaces ``h`` as the sub-block output, so the model's own
      residual add and norm follow: a pre-norm model computes ``x + out``, a post-norm model
      (BERT) ``LN(dropout(out) + x)``, Gemma-2 ``x + post_norm(out)``.
    * ``original_ln_after=False``: ``out`` itself becomes the residual stream after the sub-block
      (the value that ``LN(h + x)`` resp. ``x + h`` would have been). For models whose interface
      names the norm (post-norm: ``layer_ln_1`` / ``layer_ln_2``) the norm module's output is
      replaced by ``out``. Without a named norm the model is assumed to add the residual itself
      (``x + h``), and the adapter returns ``out - x`` as the sub-block output so that the model
      computes ``x + (out - x) = out`` (to float rounding). For models with an extra norm between
      the sub-block and the add (Gemma-2 sandwich norms) that norm is applied to ``out - x``:
      prefer ``original_ln_after=True`` there.

    :param mh_adapter: adapter after the attention output projection (self-attention).
    :param output_adapter: adapter after the FFN output projection.
    :param cross_adapter: adapter after the cross-attention output projection; ``None`` follows
        ``mh_adapter``.
    :param reduction_factor: ``d / bottleneck``; a number or a per-layer map
        ``{"3": 8, "default": 16}`` (keys are layer indices as strings).
    :param non_linearity: one of :data:`NON_LINEARITIES`.
    :param original_ln_before: see above. :param original_ln_after: see above.
    :param residual_before_ln: ``True``, ``False`` or ``"post_add"`` (see above).
    :param adapter_residual_before_ln: add the residual before ``ln_after``.
    :param ln_before: own LayerNorm on the bottleneck input. :param ln_after: own LayerNorm on the output.
    :param init_weights: ``"bert"`` (down and up N(0, 0.02)), ``"mam_adapter"`` (down Kaiming-uniform,
        up zeros: the adapter starts as the identity), ``"houlsby"`` (truncated N(0, 0.01)); biases zero.
    :param is_parallel: parallel adapter (input ``x``, see above).
    :param scaling: a number, ``"learned"`` (a scalar, init 1) or ``"channel"`` (a vector, init 1).
    :param use_gating: learned per-sequence gate on the adapter branch.
    :param dropout: dropout probability on the bottleneck input.
    :param stochastic_depth: probability of dropping the adapter branch of a row while training.
    :param leave_out: layer indices without adapters.
    :param phm_layer: Compacter: parameterised hypercomplex multiplication layers for down / up.
    :param phm_dim: number of Kronecker terms ``n`` (divides both dimensions of each projection).
    :param factorized_phm_W: factor each ``B_i`` as ``s_i t_iᵀ`` of rank ``phm_rank``.
    :param shared_W_phm: share ``B_i`` (``s_i``, ``t_i``) across the layers of one adapter.
    :param shared_phm_rule: share the rule matrices ``A_i`` (n × n) across the layers of one adapter.
    :param factorized_phm_rule: factor each ``A_i`` as ``u_i v_iᵀ`` (rank 1).
    :param phm_c_init: ``"normal"`` or ``"uniform"`` init of the rules (range ``phm_init_range``).
    :param phm_init_range: std / bound of the rule init.
    :param learn_phm: whether the rules are trainable.
    :param hypercomplex_nonlinearity: init of ``B_i`` (:data:`PHM_INITS`).
    :param phm_rank: rank of the factorised ``B_i``. :param phm_bias: bias in PHM layers.
    :param dtype: weight dtype (``"float32"`` ...); ``None`` follows the base model.
    """

    method: ClassVar[str] = "bottleneck"

    mh_adapter: bool = False
    output_adapter: bool = True
    reduction_factor: float | dict[str, float] = 16
    non_linearity: str = "relu"
    original_ln_before: bool = True
    original_ln_after: bool = True
    residual_before_ln: bool | str = True
    adapter_residual_before_ln: bool = False
    ln_before: bool = False
    ln_after: bool = False
    init_weights: str = "bert"
    is_parallel: bool = False
    scaling: float | str = 1.0
    use_gating: bool = False
    dropout: float = 0.0
    stochastic_depth: float = 0.0
    leave_out: list[int] = field(default_factory=list)
    cross_adapter: bool | None = None
    phm_layer: bool = False
    phm_dim: int = 4
    factorized_phm_W: bool = True
    shared_W_phm: bool = False
    shared_phm_rule: bool = True
    factorized_phm_rule: bool = False
    phm_c_init: str = "normal"
    phm_init_range: float = 0.0001
    learn_phm: bool = True
    hypercomplex_nonlinearity: str = "glorot-uniform"
    phm_rank: int = 1
    phm_bias: bool = True
    dtype: str | None = None

    @property
    def label(self) -> str:
        """``"compacter"``, ``"par_bn"``, ``"double_seq_bn"`` or ``"seq_bn"``: the kind of bottleneck this config
        places (for summaries)."""
        if self.phm_layer:
            return "compacter"
        if self.is_parallel:
            return "par_bn"
        return "double_seq_bn" if self.mh_adapter and self.output_adapter else "seq_bn"

    def __post_init__(self) -> None:
        self.leave_out = [int(i) for i in self.leave_out]
        self.non_linearity = str(self.non_linearity).lower()
        if self.non_linearity not in NON_LINEARITIES:
            raise ValueError(f"non_linearity must be one of {NON_LINEARITIES}, got {self.non_linearity!r}.")
        if self.init_weights not in INIT_SCHEMES:
            raise ValueError(f"init_weights must be one of {INIT_SCHEMES}, got {self.init_weights!r}.")
        if self.residual_before_ln not in (True, False, "post_add"):
            raise ValueError(f"residual_before_ln must be True, False or 'post_add', got {self.residual_before_ln!r}.")
        if isinstance(self.scaling, str) and self.scaling not in ("learned", "channel"):
            raise ValueError(f"scaling must be a number, 'learned' or 'channel', got {self.scaling!r}.")
        if isinstance(self.reduction_factor, Mapping):
            self.reduction_factor = {str(k): float(v) for k, v in self.reduction_factor.items()}
            values = list(self.reduction_factor.values())
        else:
            values = [self.reduction_factor]
        if any(not isinstance(v, (int, float)) or v <= 0 for v in values):
            raise ValueError(f"reduction_factor must be positive, got {self.reduction_factor!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout!r}.")
        if not 0.0 <= self.stochastic_depth < 1.0:
            raise ValueError(f"stochastic_depth must lie in [0, 1), got {self.stochastic_depth!r}.")
        if self.phm_layer:
            if int(self.phm_dim) < 1 or int(self.phm_rank) < 1:
                raise ValueError("phm_dim and phm_rank must be positive integers.")
            if self.hypercomplex_nonlinearity not in PHM_INITS:
                raise ValueError(f"hypercomplex_nonlinearity must be one of {PHM_INITS}.")
            if self.phm_c_init not in ("normal", "uniform"):
                raise ValueError("phm_c_init must be 'normal' or 'uniform'.")

    @property
    def adapts_cross_attention(self) -> bool:
        """Whether cross-attention gets an adapter (``cross_adapter``, defaulting to ``mh_adapter``)."""
        return self.mh_adapter if self.cross_adapter is None else bool(self.cross_adapter)

    def reduction_for(self, layer_index: int) -> float:
        """The reduction factor of layer ``layer_index``."""
        rf = self.reduction_factor
        if isinstance(rf, Mapping):
            if str(layer_index) in rf:
                return float(rf[str(layer_index)])
            if "default" in rf:
                return float(rf["default"])
            raise ValueError(f"reduction_factor {rf!r} has no entry for layer {layer_index} and no 'default'.")
        return float(rf)

    def needs_residual_input(self) -> bool:
        """Whether the residual stream ``x`` must be captured for this config."""
        return (self.is_parallel or self.original_ln_before or not self.original_ln_after
                or self.residual_before_ln == "post_add")


@dataclass
class SeqBnConfig(BnConfig):
    """Pfeiffer et al. (2020): one adapter after the FFN, ``h' = LN(h + x)``, relu, reduction 16."""


@dataclass
class DoubleSeqBnConfig(BnConfig):
    """Houlsby et al. (2019): adapters after attention and after the FFN on ``h``, swish, reduction 16."""

    mh_adapter: bool = True
    output_adapter: bool = True
    original_ln_before: bool = False
    non_linearity: str = "swish"


@dataclass
class ParBnConfig(BnConfig):
    """He et al. (2021) parallel adapter: ``h + 4·f(x)``, relu, reduction 2, ``mam_adapter`` init."""

    original_ln_before: bool = False
    is_parallel: bool = True
    reduction_factor: float | dict[str, float] = 2
    scaling: float | str = 4.0
    init_weights: str = "mam_adapter"


@dataclass
class AdapterPlusConfig(BnConfig):
    """Adapter+ (Steitz & Roth, 2024): after the FFN, gelu, reduction 96, per-channel scaling,
    Houlsby init, stochastic depth 0.1, ``original_ln_after=False``.

    With ``original_ln_before=True`` and ``residual_before_ln=False`` the result is
    ``u + s·f(u)`` with ``u = LN(h + x)``: the adapter sits after the sub-block's residual add
    (and norm, for post-norm models) and produces the layer's residual stream itself.
    """

    original_ln_after: bool = False
    residual_before_ln: bool | str = False
    reduction_factor: float | dict[str, float] = 96
    non_linearity: str = "gelu"
    scaling: float | str = "channel"
    init_weights: str = "houlsby"
    stochastic_depth: float = 0.1


@dataclass
class CompacterConfig(DoubleSeqBnConfig):
    """Compacter (Karimi Mahabadi et al., 2021): Houlsby placement with PHM layers, gelu, reduction 32."""

    phm_layer: bool = True
    reduction_factor: float | dict[str, float] = 32
    non_linearity: str = "gelu"


@dataclass
class CompacterPlusPlusConfig(SeqBnConfig):
    """Compacter++: Pfeiffer placement (after the FFN only) with PHM layers, gelu, reduction 32."""

    phm_layer: bool = True
    reduction_factor: float | dict[str, float] = 32
    non_linearity: str = "gelu"


def scaled_par_bn(**overrides: Any) -> ParBnConfig:
    """The ``scaled_par_bn`` preset: a parallel adapter with a learned scalar scaling."""
    return ParBnConfig(**{"scaling": "learned", **overrides})


# ---------------------------------------------------------------------------------------------- fusion
@dataclass
class AdapterFusionConfig:
    """AdapterFusion (Pfeiffer et al., 2021) at every location hosting a fused adapter.

    With ``h`` the sub-block output, ``u`` the query input (``h`` if ``query_before_ln`` else the
    first fused adapter's input ``h'``) and ``o_j`` the branch output of fused adapter ``j``
    (its result minus ``h``)::

        q   = Q(u)                      (identity if not query)
        k_j = K(o_j), v_j = V(o_j)      (identity if not key / value)
        p   = softmax_j(q·k_j / T)
        out = r + Σ_j p_j v_j           (value_before_softmax; else r + V(Σ_j p_j o_j))

    ``r = u`` if ``residual_before`` else ``h``.

    :param key: :param query: :param value: learn the projections (d × d, with bias).
    :param query_before_ln: query from ``h`` rather than the adapter input ``h'``.
    :param regularization: expose :meth:`~adapters_bottleneck.layer.FusionLayer.regularization_loss`
        (``‖V - I‖²``) for the trainer to add.
    :param residual_before: residual ``r = u`` instead of ``h``.
    :param temperature: ``False`` (T = 1), a number (fixed T), or ``True`` (T starts at 50 and is
        multiplied by 0.99 after every training forward, down to 1).
    :param value_before_softmax: apply ``V`` to each output before weighting.
    :param value_initialized: ``V`` starts as the identity (else N(0, 0.02)).
    :param dropout_prob: dropout on the attention probabilities.
    """

    method: ClassVar[str] = "bottleneck"

    key: bool = True
    query: bool = True
    value: bool = True
    query_before_ln: bool = False
    regularization: bool = False
    residual_before: bool = False
    temperature: bool | float = False
    value_before_softmax: bool = True
    value_initialized: bool = False
    dropout_prob: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Every field plus ``config_class``, ready for JSON."""
        data: dict[str, Any] = {"config_class": type(self).__name__}
        data.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdapterFusionConfig:
        """Build from :meth:`to_dict` output (unknown fields are an error)."""
        data = {k: v for k, v in data.items() if k not in ("config_class", "method")}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {unknown}.")
        return cls(**data)


@dataclass
class StaticAdapterFusionConfig(AdapterFusionConfig):
    """Fusion with fixed softmax temperature 1 and randomly initialised value projection."""


@dataclass
class DynamicAdapterFusionConfig(AdapterFusionConfig):
    """Fusion with identity-initialised value, ``‖V - I‖`` regularisation and annealed temperature."""

    value_initialized: bool = True
    regularization: bool = True
    temperature: bool | float = True


_FUSION_CLASSES = {c.__name__: c for c in (AdapterFusionConfig, StaticAdapterFusionConfig, DynamicAdapterFusionConfig)}
_FUSION_STRINGS = {"static": StaticAdapterFusionConfig, "dynamic": DynamicAdapterFusionConfig}


def load_fusion_config(config: Any) -> AdapterFusionConfig:
    """Resolve a fusion config: ``None`` (dynamic), ``"static"`` / ``"dynamic"``, a dict or an instance."""
    if config is None:
        return DynamicAdapterFusionConfig()
    if isinstance(config, AdapterFusionConfig):
        return config
    if isinstance(config, str):
        if config not in _FUSION_STRINGS:
            raise ValueError(f"Unknown AdapterFusion config {config!r}; use 'static' or 'dynamic'.")
        return _FUSION_STRINGS[config]()
    if isinstance(config, Mapping):
        cls = _FUSION_CLASSES.get(str(config.get("config_class", "AdapterFusionConfig")), AdapterFusionConfig)
        return cls.from_dict(config)
    raise TypeError(f"Cannot use {config!r} as an AdapterFusion config.")
