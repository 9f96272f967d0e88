"""New weights for an existing LoRA-family adapter, in place: what ``model.hotswap_adapter`` writes at one
projection (:func:`hotswap_values`, called through ``LoRALinear.hotswap_values``).

The adapter keeps its Parameter objects, shapes and Python attributes (``scaling`` included), so a
``torch.compile``'d model keeps its graphs. A checkpoint of smaller rank ``r' ≤ r`` fits: ``A`` gets ``r'``
rows and zeros, ``B`` gets ``r'`` columns and zeros, and the new scaling is folded into ``B``
(``B ← B' · s'/s``), so ``s · B A = s' · B' A'`` exactly up to the rounding of that product, and saving the
adapter afterwards writes a checkpoint (rank ``r``) that computes the same thing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from adapters.plugin import AdapterError

from .deltas import DoRADelta, LoRADelta

if TYPE_CHECKING:
    from .layer import LoRALinear

__all__ = ["hotswap_values"]

#: adapter kinds whose rank may shrink (A rows / B columns are all that depend on it)
_PADDED = (LoRADelta, DoRADelta)


def _exact(source: nn.Module, target: nn.Module, where: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(target tensor, source tensor)`` for every tensor of the state dict; shapes must agree."""
    src, dst = source.state_dict(keep_vars=True), target.state_dict(keep_vars=True)
    if set(src) != set(dst):
        raise AdapterError(f"hotswap_adapter: the new weights at {where} have tensors {sorted(src)}, the adapter "
                           f"{sorted(dst)}.")
    bad = [k for k in dst if src[k].shape != dst[k].shape]
    if bad:
        raise AdapterError(f"hotswap_adapter: tensor '{bad[0]}' at {where} has shape {list(src[bad[0]].shape)}, the "
                           f"adapter's is {list(dst[bad[0]].shape)}.")
    return [(dst[k], src[k]) for k in dst]


def _padded(source: LoRADelta, target: LoRADelta, where: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    new_rank, rank = source.lora_A.shape[0], target.lora_A.shape[0]
    if new_rank > rank:
        raise AdapterError(f"hotswap_adapter: the new weights at {where} have rank {new_rank}, the adapter {rank}. "
                           "A hot swap keeps the adapter's shapes (a compiled model keeps its graphs), so smaller "
                           "ranks are padded but larger ones do not fit: add the adapter with r at least the largest "
                           "rank you will swap in.")
    if target.scaling == 0:
        raise AdapterError(f"hotswap_adapter: the adapter at {where} has scaling 0 (alpha=0); no weights can be "
                           "scaled into it.")
    others = [(k, t) for k, t in target.state_dict(keep_vars=True).items() if k not in ("lora_A", "lora_B")]
    source_state = source.state_dict(keep_vars=True)
    pairs = []
    for key, tensor in others:  # DoRA's magnitude, a gate: exact shapes
        if key not in source_state or source_state[key].shape != tensor.shape:
            raise AdapterError(f"hotswap_adapter: tensor '{key}' at {where} does not match the adapter's.")
        pairs.append((tensor, source_state[key]))
    a = torch.zeros(target.lora_A.shape, dtype=torch.float32, device=target.lora_A.device)
    b = torch.zeros(target.lora_B.shape, dtype=torch.float32, device=target.lora_B.device)
    a[:new_rank] = source.lora_A.detach().float()
    b[:, :new_rank] = source.lora_B.detach().float() * (source.scaling / target.scaling)
    pairs += [(target.lora_A, a), (target.lora_B, b)]
    return pairs


def hotswap_values(layer: LoRALinear, source: str, target: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(tensor of adapter target, its new value)`` pairs that give ``target`` the weights of ``source`` at
    ``layer`` (nothing is written here; the caller writes every layer's pairs after all were checked).

    Plain LoRA and DoRA parts may have a smaller rank in ``source`` (padded, scaling folded into ``B``);
    everything else (IA3, MTL-LoRA, gates, DoRA magnitudes) must have the same shapes.

    :raises AdapterError: the adapters differ in kind, fused parts, output rows or gate, a shape does not fit,
        or ``source`` has the larger rank.
    """
    src_units, dst_units = layer.units(source), layer.units(target)
    if set(src_units) != set(dst_units):
        raise AdapterError(f"hotswap_adapter: at {layer.location} the new weights adapt parts {sorted(src_units)} of "
                           f"the fused projection, the adapter {sorted(dst_units)} (another placement).")
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    for key, dst in dst_units.items():
        src = src_units[key]
        where = f"{layer.location}.{key}" if key else layer.location
        if type(src) is not type(dst):
            raise AdapterError(f"hotswap_adapter: at {where} the new weights are a {type(src).__name__}, the adapter "
                               f"a {type(dst).__name__} (another kind of adapter).")
        same_rows = (src.row_index is None and dst.row_index is None) or (
            src.row_index is not None and dst.row_index is not None and torch.equal(src.row_index, dst.row_index))
        if not same_rows or (src.gate is None) != (dst.gate is None):
            raise AdapterError(f"hotswap_adapter: at {where} the new weights act on other output rows or differ in "
                               "gating (another placement or config).")
        pairs += _padded(src, dst, where) if type(dst) in _PADDED else _exact(src, dst, where)
    return pairs
