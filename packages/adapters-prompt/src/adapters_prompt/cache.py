"""Prefix keys and values inside an attention call: a per-call stand-in for the module's cache, and the
attention mask (and T5's position bias) widened by the prefix.

Every transformers 5.x attention module that keeps a key/value cache computes its keys and values,
then (when it has a cache) calls ``cache.update(k, v, layer_idx)`` and attends to what that returns.
The prefix pre-hook passes a :class:`PrefixedCache` in the cache argument, for this call only: its
``update`` returns ``[prefix; cached keys; new keys]`` (``B × H_kv × (P + K) × D``) and stores only the
tokens' own keys in the real cache (so cache lengths, positions and masks of later calls are the
model's own). Cross-attention is the exception: modules reuse the stored encoder keys on later decode
steps without calling ``update``, so there the prefix is stored with them (once, when they are
computed), and each decode step finds it.

A real :class:`~transformers.EncoderDecoderCache` is represented by an instance of a subclass (modules
check ``isinstance``) that shares its ``is_updated`` record and wraps the part the attention uses.
"""

from __future__ import annotations

from typing import Any

import torch

from adapters.plugin import AdapterError

__all__ = ["PrefixedCache", "wrap_cache", "fixed_size", "pad_mask", "pad_position_bias"]

_ENC_DEC: type | None = None


class PrefixedCache:
    """The cache argument of one attention call: ``update`` prepends this call's prefix.

    :param real: the caller's cache for this attention (``None``: no caching).
    :param keys: prefix keys ``B × H_kv × P × D``; :param values: prefix values, same shape.
    :param store: keep the prefix in ``real`` together with the keys (cross-attention).
    """

    def __init__(self, real: Any, keys: torch.Tensor, values: torch.Tensor, store: bool) -> None:
        self.real = real
        self.keys = keys
        self.values = values
        self.store = store
        self.is_updated: dict = {}

    def _with_prefix(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        want = self.keys.shape
        if k.dim() != 4 or k.shape[0] != want[0] or k.shape[1] != want[1] or k.shape[3] != want[3]:
            raise AdapterError(
                f"Prefix tuning cannot join its keys/values (batch × kv heads × positions × head dim = "
                f"{tuple(want)}) to this attention's {tuple(k.shape)}: the attention stores keys in another "
                "layout (multi-query or ALiBi attention such as Falcon's or Bloom's, or heads repeated before "
                "the cache). Prefix tuning supports attentions that cache batch × kv heads × positions × head dim; "
                "use prompt tuning or LoRA on this model.")
        return (torch.cat([self.keys.to(k.dtype), k], dim=-2), torch.cat([self.values.to(v.dtype), v], dim=-2))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys / values to attend to: ``[prefix; cached; new]``."""
        if self.real is None:
            return self._with_prefix(key_states, value_states)
        if self.store:
            return self.real.update(*self._with_prefix(key_states, value_states), layer_idx, *args, **kwargs)
        k, v = self.real.update(key_states, value_states, layer_idx, *args, **kwargs)
        return self._with_prefix(k, v)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens the real cache holds (the prefix is not counted: it is not a token)."""
        return 0 if self.real is None else self.real.get_seq_length(layer_idx)

    @property
    def cross_attention_cache(self) -> PrefixedCache:  # BERT's cross-attention reads it from its cache
        return self

    @property
    def self_attention_cache(self) -> PrefixedCache:
        return self

    @property
    def layers(self) -> Any:
        if self.real is None:
            raise AttributeError("layers")
        return self.real.layers

    def __getattr__(self, name: str) -> Any:
        real = self.__dict__.get("real")
        if real is None:
            raise AttributeError(name)
        return getattr(real, name)


def _enc_dec_class() -> type:
    global _ENC_DEC
    if _ENC_DEC is None:
        from transformers import EncoderDecoderCache

        class PrefixedEncoderDecoderCache(EncoderDecoderCache):
            """An encoder-decoder cache whose self- or cross-attention part adds the prefix."""

            def __init__(self, real: Any, self_cache: Any, cross_cache: Any) -> None:
                self.self_attention_cache = self_cache
                self.cross_attention_cache = cross_cache
                self.is_updated = real.is_updated

        _ENC_DEC = PrefixedEncoderDecoderCache
    return _ENC_DEC


def fixed_size(cache: Any) -> bool:
    """Whether ``cache`` (or a part of an encoder-decoder cache) has a fixed size: transformers' compileable
    caches (``cache_implementation="static"``), which ``generate()`` sizes for the text tokens only."""
    parts = [getattr(cache, p, None) for p in ("self_attention_cache", "cross_attention_cache")]
    return any(getattr(part, "is_compileable", False) for part in (parts if parts[0] is not None else [cache]))


def wrap_cache(real: Any, keys: torch.Tensor, values: torch.Tensor, cross: bool) -> Any:
    """The stand-in to pass as one attention call's cache (see the module docstring)."""
    if real is not None and hasattr(real, "self_attention_cache") and hasattr(real, "cross_attention_cache"):
        if cross:
            part = PrefixedCache(real.cross_attention_cache, keys, values, store=True)
            return _enc_dec_class()(real, real.self_attention_cache, part)
        part = PrefixedCache(real.self_attention_cache, keys, values, store=False)
        return _enc_dec_class()(real, part, real.cross_attention_cache)
    return PrefixedCache(real, keys, values, store=cross and real is not None)


def pad_mask(mask: Any, length: int, query: int, past: int, causal: bool, implementation: str,
             like: torch.Tensor) -> Any:
    """The attention mask of a call whose keys got ``length`` prefix positions in front.

    4-D masks (``B|1 × 1|H × Q × K``) get ``length`` visible columns in front (``True`` for boolean
    masks, ``0`` for additive ones), 2-D key masks (flash attention) ``length`` ones. A causal call
    without a mask (sdpa's ``is_causal`` shortcut, whose alignment would hide the text behind the
    prefix) gets an explicit one: every query sees the prefix, its own past and itself.

    A mask built here takes ``like``'s device (and its dtype, for an additive mask).

    :raises ValueError: a mask type this cannot widen (flex attention's ``BlockMask``).
    """
    if mask is None:
        if not causal or query <= 1 or "flash" in implementation:
            return None  # full attention, one query, or flash's bottom-right causal alignment: correct as is
        device = like.device
        cols = torch.arange(past + query, device=device).unsqueeze(0)
        rows = torch.arange(query, device=device).unsqueeze(1) + past
        prefix = torch.ones(query, length, dtype=torch.bool, device=device)
        allowed = torch.cat([prefix, cols <= rows], dim=1)[None, None]
        if implementation == "eager":
            dtype = like.dtype if like.is_floating_point() else torch.float32
            return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        return allowed
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"Prefix tuning cannot widen an attention mask of type {type(mask).__name__}; use the "
                         "eager or sdpa attention implementation.")
    if mask.dim() == 2:
        return torch.cat([mask.new_ones(mask.shape[0], length), mask], dim=-1)
    fill = True if mask.dtype == torch.bool else 0
    front = mask.new_full((*mask.shape[:-1], length), fill)
    return torch.cat([front, mask], dim=-1)


def pad_position_bias(bias: torch.Tensor, length: int, keys: int) -> torch.Tensor:
    """T5's relative position bias (``1|B × H × Q × K``) for keys with a prefix: the tokens' own bias (the last
    ``keys`` columns) and zero bias for the ``length`` prefix keys, which have no position."""
    own = bias[..., bias.shape[-1] - keys:] if bias.shape[-1] != keys else bias
    return torch.cat([own.new_zeros((*own.shape[:-1], length)), own], dim=-1)
