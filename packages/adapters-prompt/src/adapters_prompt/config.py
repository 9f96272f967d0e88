"""Configs of prompt tuning (Lester et al. 2021) and prefix tuning (Li & Liang 2021).

Field names follow AdapterHub's ``PromptTuningConfig`` / ``PrefixTuningConfig`` so their configs load
unchanged; the few additions (``tokenizer_name_or_path``, ``offset_positions``, ``dtype``) are documented
on each class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from adapters import AdapterConfig

__all__ = ["PromptTuningConfig", "PrefixTuningConfig", "NON_LINEARITIES", "PROMPT_INITS"]

#: ``prompt_init`` values.
PROMPT_INITS = ("random_uniform", "from_string")
#: ``non_linearity`` values of the prefix MLP.
NON_LINEARITIES = ("tanh", "relu", "gelu", "gelu_new", "silu", "swish", "sigmoid", "linear", "identity")


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


@dataclass
class PromptTuningConfig(AdapterConfig):
    """Prompt tuning: ``prompt_length`` trained vectors prepended to the input embeddings.

    The model's own embedding pipeline (position embeddings, scaling, norm) then runs on
    ``[prompt; tokens]``; the virtual positions are dropped from the base model's outputs, so hidden
    states, logits and token-level heads keep the input's length. In an encoder-decoder model the
    prompt goes in front of the encoder's input and the decoder attends to it (the encoder's output
    keeps it). Source: Lester, Al-Rfou & Constant (2021), *The Power of Scale for Parameter-Efficient
    Prompt Tuning*.

    :param prompt_length: number of virtual tokens ``P``.
    :param prompt_init: ``"random_uniform"`` (``U(-random_uniform_scale, random_uniform_scale)``) or
        ``"from_string"``: the embeddings of ``prompt_init_text``'s tokens, repeated or cut to ``P``.
    :param prompt_init_text: the text for ``"from_string"``.
    :param random_uniform_scale: bound of the uniform initialisation.
    :param combine: where the prompt goes; ``"prefix"`` (in front of every token) is the one supported.
    :param tokenizer_name_or_path: tokenizer for ``"from_string"`` (a local directory or model id);
        ``None`` uses the model's ``config.name_or_path`` (or ``tokenizer_name_or_path``).
    :param init_weights_seed: seed of a private generator for the initialisation (global RNG untouched).
    :param dtype: weight dtype (``"float32"`` ...); ``None`` follows the input embeddings.
    """

    method: ClassVar[str] = "prompt_tuning"

    prompt_length: int = 10
    prompt_init: str = "random_uniform"
    prompt_init_text: str | None = None
    random_uniform_scale: float = 0.5
    combine: str = "prefix"
    tokenizer_name_or_path: str | None = None
    init_weights_seed: int | None = None
    dtype: str | None = None

    def __post_init__(self) -> None:
        _positive_int("prompt_length", self.prompt_length)
        if self.prompt_init not in PROMPT_INITS:
            raise ValueError(f"prompt_init must be one of {PROMPT_INITS}, got {self.prompt_init!r}.")
        if self.prompt_init == "from_string" and not self.prompt_init_text:
            raise ValueError("prompt_init='from_string' needs prompt_init_text (the text whose token embeddings "
                             "initialise the prompt).")
        if self.combine != "prefix":
            raise ValueError(f"combine={self.combine!r} is not supported; the prompt is prepended ('prefix').")
        if float(self.random_uniform_scale) <= 0:
            raise ValueError(f"random_uniform_scale must be positive, got {self.random_uniform_scale!r}.")


@dataclass
class PrefixTuningConfig(AdapterConfig):
    """Prefix tuning: trained key/value vectors in front of every attention's keys and values.

    Each chosen attention module of each layer attends to ``prefix_length`` extra key/value pairs
    (per key/value head, after rotary embeddings: they have no position). While training, the
    prefixes of all layers of one attention kind come from one MLP (``flat=False``): a ``P × d``
    table through ``Linear(d, bottleneck_size) → non_linearity → Linear(bottleneck_size,
    layers·2·heads·head_dim)``; :func:`adapters_prompt.eject_prefix` replaces the MLP by its output
    (plain prefixes) for inference. ``flat=True`` trains the prefixes directly. Source: Li & Liang
    (2021), *Prefix-Tuning: Optimizing Continuous Prompts for Generation*.

    :param prefix_length: number of prefix key/value pairs ``P`` per attention module.
    :param bottleneck_size: hidden width of the reparameterisation MLP (``flat=False``).
    :param non_linearity: activation of the MLP, one of :data:`NON_LINEARITIES`.
    :param flat: train the prefixes themselves instead of the MLP.
    :param dropout: dropout on the prefixes while training.
    :param use_gating: scale each layer's keys / values by ``mean_t σ(g(h_t))`` of the attention's
        input ``h`` (AdapterHub's gate); its value depends on the tokens of the call, so with a cache
        each decode step gates by its own token.
    :param shared_gating: one gate value for keys and values (else one each).
    :param encoder_prefix: prefixes in the encoder's self-attention (encoder-decoder models).
    :param cross_prefix: prefixes in the decoder's cross-attention (encoder-decoder models).
    :param leave_out: layer indices (numbered across stacks, encoder first) without prefixes.
    :param offset_positions: the tokens' positions start at ``P`` (after the prefix), as in peft, whose
        prefixes sit in the key/value cache; ``False`` (default, AdapterHub's behaviour): tokens keep the
        positions they have without a prefix. Needs a base model whose forward takes ``position_ids``.
    :param init_weights_seed: seed of a private generator for the initialisation.
    :param dtype: weight dtype; ``None`` follows the attention's weights.
    """

    method: ClassVar[str] = "prefix_tuning"

    prefix_length: int = 30
    bottleneck_size: int = 512
    non_linearity: str = "tanh"
    flat: bool = False
    dropout: float = 0.0
    use_gating: bool = False
    shared_gating: bool = True
    encoder_prefix: bool = True
    cross_prefix: bool = True
    leave_out: list[int] = field(default_factory=list)
    offset_positions: bool = False
    init_weights_seed: int | None = None
    dtype: str | None = None

    def __post_init__(self) -> None:
        _positive_int("prefix_length", self.prefix_length)
        _positive_int("bottleneck_size", self.bottleneck_size)
        if str(self.non_linearity).lower() not in NON_LINEARITIES:
            raise ValueError(f"non_linearity must be one of {NON_LINEARITIES}, got {self.non_linearity!r}.")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout!r}.")
        self.leave_out = [int(i) for i in self.leave_out]
