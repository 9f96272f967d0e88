"""LoRA on an ``nn.Embedding`` (input embeddings, reached through ``target_modules=["embed_tokens"]``).

``y = E[ids] + s·(A[:, ids])ᵀ Bᵀ``: ``A`` (``r × vocab``) is looked up like an embedding table and
projected by ``B`` (``width × r``); ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). The tensor
names and shapes are PEFT's ``lora_embedding_A`` / ``lora_embedding_B`` (Hu et al. 2021, applied to the
embedding matrix as PEFT does). A fresh adapter has ``A = 0`` and ``B ~ N(0, 1)``, so it starts as the
base embedding. :class:`LoRAEmbedding` takes over the base module's ``weight`` (the same Parameter, so a
tied output head stays tied and base state-dict keys do not change).
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapters.plugin import AdapterError, AdapterLayer, AttachSite, Leaf, param

from .config import LoRAConfig

__all__ = ["LoRAEmbedding", "EmbeddingDelta", "check_embedding_config"]


def check_embedding_config(config: LoRAConfig, path: str) -> None:
    """Refuse the LoRA-family options that have no meaning on an embedding table (before anything changes).

    :raises AdapterError: IA3 (``composition_mode="scale"``), DoRA, MTL-LoRA or gating on ``path``."""
    problems = []
    if config.composition_mode != "add":
        problems.append("composition_mode='scale' (IA3)")
    if config.use_dora:
        problems.append("use_dora=True")
    if getattr(config, "n_up_projection", None) is not None:
        problems.append("MTL-LoRA")
    if config.use_gating:
        problems.append("use_gating=True")
    if problems:
        raise AdapterError(f"target_modules names the embedding '{path}', but {', '.join(problems)} cannot adapt an "
                           "embedding table; only plain LoRA can. Leave the embedding out of target_modules.")


class EmbeddingDelta(nn.Module):
    """One LoRA adapter on an embedding table: ``lora_A`` (r × vocab), ``lora_B`` (width × r)."""

    shareable = ("lora_A", "lora_B")
    straight = False
    scales_input = False
    gate = None
    rows = None

    def __init__(self, config: LoRAConfig, vocab: int, width: int, dtype: torch.dtype, device: torch.device,
                 key: str) -> None:
        super().__init__()
        self.scaling = float(config.scaling)
        self.lora_A = nn.Parameter(torch.zeros(config.r, vocab, dtype=dtype, device=device))
        b = torch.empty(width, config.r, dtype=torch.float32)
        generator = None
        if config.init_weights_seed is not None:
            seed = (int(config.init_weights_seed) * 1_000_003 + zlib.crc32(key.encode())) % (2**63 - 1)
            generator = torch.Generator().manual_seed(seed)
        b.normal_(0.0, 1.0, generator=generator)
        self.lora_B = nn.Parameter(b.to(dtype=dtype, device=device))

    def forward(self, ids: torch.Tensor, y: torch.Tensor, layer: LoRAEmbedding, owned: bool = False) -> torch.Tensor:
        h = F.embedding(ids, self.lora_A.t())  # (..., r)
        delta = F.linear(h, self.lora_B) * self.scaling
        if layer.embed_scale is not None:  # a scaled embedding scales the adapted table: (E + Δ)[ids]·c
            delta = delta * layer.embed_scale
        return y + delta.to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``s·(BA)ᵀ`` (vocab × width), float32, for merging."""
        return (self.lora_B.float() @ self.lora_A.float()).t() * self.scaling


class LoRAEmbedding(AdapterLayer):
    """An ``nn.Embedding`` with LoRA adapters; shares ``weight`` with the original module.

    Plans run on ``(y, ids)``: each adapter maps the looked-up embeddings ``y`` (``batch × seq × width``)
    to adapted ones.
    """

    def __init__(self, base: nn.Embedding, location: str) -> None:
        super().__init__(location)
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = base.padding_idx, base.max_norm, base.norm_type
        self.scale_grad_by_freq, self.sparse = base.scale_grad_by_freq, base.sparse
        self.weight = base.weight
        scale = getattr(base, "embed_scale", None) if type(base) is not nn.Embedding else None
        if isinstance(scale, torch.Tensor):
            self.register_buffer("embed_scale", scale.detach().clone(), persistent=False)
        else:
            self.embed_scale = scale  # a float, or None for a plain table
        if type(base) is not nn.Embedding:
            self._check_reproduces(base, location)
        self._backup: torch.Tensor | None = None

    def _check_reproduces(self, base: nn.Module, location: str) -> None:
        """A subclass of ``nn.Embedding`` is accepted when it is a lookup times ``embed_scale`` (BART's and
        Gemma's scaled embeddings): checked on a few ids, exactly."""
        ids = torch.arange(min(self.num_embeddings, 16), device=self.weight.device).unsqueeze(0)
        with torch.no_grad():
            same = self.embed_scale is not None and torch.equal(base(ids), self.base_forward(ids))
        if not same:
            raise AdapterError(f"LoRA adapts nn.Embedding tables (plain, or scaled by embed_scale); {location} holds "
                               f"a {type(base).__name__} whose output is not one of those.")

    def base_forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Exactly the wrapped embedding's output: the lookup (times ``embed_scale`` for a scaled one)."""
        weight = param(self, "weight")
        out = F.embedding(ids, weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                          self.sparse)
        scale = self.embed_scale
        if scale is None:
            return out
        return out * (scale.to(weight.dtype) if isinstance(scale, torch.Tensor) else scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        plan = self.active_plan()
        if plan is None:
            return self.base_forward(ids)
        if type(plan) is Leaf:
            return self.adapters[plan.name](ids, self.base_forward(ids), self)
        return self.run_plan(plan, (self.base_forward(ids), ids))

    def leaf(self, name: str, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        y, ids = inputs
        return self.adapters[name](ids, y, self)

    def add_embedding_adapter(self, name: str, config: LoRAConfig, site: AttachSite) -> None:
        """Add adapter ``name`` (a plain LoRA config; :func:`check_embedding_config` has run)."""
        dtype = site.dtype_for(self.weight, config)
        self.adapters[name] = EmbeddingDelta(config, self.num_embeddings, self.embedding_dim, dtype,
                                             self.weight.device, self.location)

    def units(self, name: str) -> dict[str, nn.Module]:
        return {"": self.adapters[name]}

    # -- merging ---------------------------------------------------------------------------------
    def merge_adapter(self, name: str) -> None:
        """``E ← E + s·(BA)ᵀ`` (an exact backup of ``E`` is kept for :meth:`unmerge_adapter`). Core refuses
        the merge first when another module shares ``E`` (a tied output head)."""
        if self._backup is None:
            self._backup = self.weight.detach().clone()
        with torch.no_grad():
            self.weight.copy_((self.weight.float() + self.adapters[name].delta_weight()).to(self.weight.dtype))

    @property
    def is_merged(self) -> bool:
        return self._backup is not None

    def unmerge_adapter(self, name: str) -> None:
        if self._backup is not None:
            with torch.no_grad():
                self.weight.copy_(self._backup)
            self._backup = None

    def keep_merged(self) -> None:
        self._backup = None

    def average_adapter(self, name: str, sources: list[tuple[str, float]], combine_strategy: str,
                        **kwargs: Any) -> None:
        if combine_strategy != "linear":
            raise AdapterError(f"LoRA on an embedding ({self.location}) averages only with combine_strategy='linear'.")
        super().average_adapter(name, sources, combine_strategy)

    def extra_repr(self) -> str:
        return f"Embedding({self.num_embeddings}, {self.embedding_dim}), location={self.location}"
