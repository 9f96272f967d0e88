"""The LoRA-family adapters at one projection: each maps ``(x, y)`` -- the projection's input and output --
to the adapted output. :class:`LoRADelta` (``y + s·B A x``), :class:`MTLLoRADelta` (MTL-LoRA),
:class:`IA3Scale` (``l ⊙ y``), :class:`DoRADelta` (DoRA) (on a fused q|k|v projection, one per
part inside core's :class:`~adapters.plugin.FusedParts`). :mod:`.layer` hosts them on a projection."""

from __future__ import annotations

import math
import zlib
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from adapters.plugin import Rows, row_index, traced_or_transformed

from .config import LoRAConfig

if TYPE_CHECKING:
    from .layer import LoRALinear

__all__ = ["LoRADelta", "MTLLoRADelta", "IA3Scale", "IA3InputScale", "DoRADelta"]


def _generator(config: LoRAConfig, key: str = "") -> torch.Generator | None:
    """A private generator for ``init_weights_seed``: one stream per (seed, location), so layers differ."""
    if config.init_weights_seed is None:
        return None
    seed = (int(config.init_weights_seed) * 1_000_003 + zlib.crc32(key.encode())) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def _init_pair(a: torch.Tensor, b: torch.Tensor, config: LoRAConfig, key: str = "") -> None:
    """Initialise ``A`` and ``B`` (any number of up projections) on CPU float32, then copy.

    With ``init_weights_seed`` set, a private generator is used and the global RNG is untouched.
    """
    gen = _generator(config, key)
    a32 = torch.empty(a.shape, dtype=torch.float32)
    b32 = torch.zeros(b.shape, dtype=torch.float32)
    if config.init_weights == "bert":
        a32.normal_(0.0, 0.02, generator=gen)
        b32.normal_(0.0, 0.02, generator=gen)
    elif config.init_weights == "gaussian":
        a32.normal_(0.0, 1.0 / config.r, generator=gen)
    else:
        nn.init.kaiming_uniform_(a32, a=math.sqrt(5), generator=gen)
    with torch.no_grad():
        a.copy_(a32)
        b.copy_(b32)


def _add_low_rank(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scaling: float,
                  index: torch.Tensor | None, owned: bool = False) -> torch.Tensor:
    """``y + scaling · h Bᵀ`` on the output features ``index`` (all when ``None``), in one fused op.

    ``owned``: ``y`` is a fresh tensor nobody else reads (the layer's own base output on the
    single-adapter path). Without autograd the update is then done in place (``addmm_`` /
    ``index_add_``): no output-sized allocation beyond the base projection. With autograd the
    out-of-place op is used: an in-place update of a view makes the backward pass copy the
    output several times (measured on an H200: ~5 device copies per adapted projection).
    """
    owned = owned and not torch.is_grad_enabled()
    if b.dtype != y.dtype:  # adapter kept in another dtype (config.dtype): compute there, add in y's dtype
        delta = F.linear(h, b) * scaling
        delta = delta.to(y.dtype)
        return y + delta if index is None else y.index_add(-1, index, delta)
    if h.dtype != y.dtype:
        h = h.to(y.dtype)
    if index is None:
        flat_h = h.reshape(-1, h.shape[-1])
        if owned and y.is_contiguous():
            y.view(-1, y.shape[-1]).addmm_(flat_h, b.t(), alpha=scaling)
            return y
        return torch.addmm(y.reshape(-1, y.shape[-1]), flat_h, b.t(), alpha=scaling).view(y.shape)
    if owned:
        return y.index_add_(-1, index, F.linear(h, b), alpha=scaling)
    return y.index_add(-1, index, F.linear(h, b), alpha=scaling)


class _AdapterBase(nn.Module):
    """Shared plumbing of one adapter at one projection: rows of the output it touches, dropout, gate.

    ``row_index`` (a non-persistent buffer, so it follows ``.to(device)`` and stays out of
    checkpoints) holds the output features of a fused projection this adapter owns; ``None``: all.
    """

    #: Parameters tied across adapters by ``share_parameters``.
    shareable: tuple[str, ...] = ()
    straight = False
    #: IA3 on the input (:class:`IA3InputScale`): the layer then calls the base on the scaled input
    scales_input = False

    def __init__(self, config: LoRAConfig, in_features: int, out_rows: int, rows: Rows,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.config_r = config.r
        self.scaling = float(config.scaling)
        #: plain LoRA without dropout, gate or row subset (set by the layer): the straight-line path
        self.straight = False
        self.out_rows = out_rows
        self.register_buffer("row_index", None if rows is None else row_index(rows, 0, device), persistent=False)
        #: the same rows as a slice when they are contiguous (weight rows are then a view, not a copy)
        self.row_slice: slice | None = rows if isinstance(rows, slice) else None
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.gate = nn.Linear(in_features, 1, dtype=dtype, device=device) if config.use_gating else None
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)

    @property
    def rows(self) -> torch.Tensor | None:
        """Output features of the wrapped projection this adapter acts on (``None``: all)."""
        return self.row_index

    def _gate_value(self, x: torch.Tensor) -> torch.Tensor:
        """The learned per-sequence gate in (0, 1): ``sigmoid(g(x))`` averaged over positions."""
        gate = torch.sigmoid(self.gate(x.to(self.gate.weight.dtype)))
        if gate.dim() >= 3:
            gate = gate.mean(dim=-2, keepdim=True)  # one gate per sequence
        return gate


class LoRADelta(_AdapterBase):
    """``y + s·B(A·dropout(x))`` on the selected output rows.

    The forward is two matmuls: ``h = A x`` (rank-sized) and one fused ``addmm`` (or ``index_add``
    for a part of a fused projection) adding ``s·h Bᵀ`` to ``y``; the gate, when used, scales the
    rank-sized ``h``.
    """

    shareable = ("lora_A", "lora_B")

    def __init__(self, config: LoRAConfig, in_features: int, out_rows: int, rows: Rows,
                 dtype: torch.dtype, device: torch.device, key: str = "") -> None:
        super().__init__(config, in_features, out_rows, rows, dtype, device)
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_rows, config.r, dtype=dtype, device=device))
        _init_pair(self.lora_A, self.lora_B, config, key)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``h = A·dropout(x)`` (times the gate, if any): the rank-sized intermediate."""
        h = x if self.dropout is None else self.dropout(x)
        h = F.linear(h.to(self.lora_A.dtype), self.lora_A)
        if self.gate is not None:
            h = h * self._gate_value(x)
        return h

    def up_weight(self) -> torch.Tensor:
        """The effective up projection ``B`` (out_rows × r)."""
        return self.lora_B

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``s·B A x`` on the adapter's rows only (out_rows features)."""
        return F.linear(self.project(x), self.up_weight()) * self.scaling

    def forward(self, x: torch.Tensor, y: torch.Tensor, layer: LoRALinear, owned: bool = False) -> torch.Tensor:
        return _add_low_rank(y, self.project(x), self.up_weight(), self.scaling, self.row_index, owned)

    def delta_weight(self) -> torch.Tensor:
        """``s·BA`` (out_rows × in), float32, for merging and averaging only."""
        return (self.up_weight().float() @ self.lora_A.float()) * self.scaling


class MTLLoRADelta(LoRADelta):
    """MTL-LoRA for one task: ``y + s·Σ_i softmax(w_t/τ)_i · B_i Λ_t A x``.

    ``lora_A`` (r × in) and ``lora_B`` (n_up × out_rows × r) are the parts shared across the tasks
    joined by ``share_parameters``; ``task_matrix`` (``Λ_t``: an r vector for
    ``"singular_values"``, an r × r matrix for ``"linear"``) and ``task_weights`` (``w_t``, the
    n_up mixing logits, zeros at init) belong to this task.
    """

    def __init__(self, config: LoRAConfig, in_features: int, out_rows: int, rows: Rows,
                 dtype: torch.dtype, device: torch.device, key: str = "") -> None:
        _AdapterBase.__init__(self, config, in_features, out_rows, rows, dtype, device)
        n_up = int(config.n_up_projection)
        self.temperature = float(config.weights_sharpness)
        self.diagonal = config.task_specific_matrix_type == "singular_values"
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(n_up, out_rows, config.r, dtype=dtype, device=device))
        _init_pair(self.lora_A, self.lora_B, config, key)
        lam = torch.ones(config.r) if self.diagonal else torch.eye(config.r)
        self.task_matrix = nn.Parameter(lam.to(dtype=dtype, device=device))
        self.task_weights = nn.Parameter(torch.zeros(n_up, dtype=dtype, device=device))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        h = super().project(x)
        return h * self.task_matrix if self.diagonal else F.linear(h, self.task_matrix)

    def mixing(self) -> torch.Tensor:
        """``softmax(w_t / τ)``: the weights of the up projections for this task."""
        return torch.softmax(self.task_weights.float() / self.temperature, dim=0).to(self.lora_B.dtype)

    def up_weight(self) -> torch.Tensor:
        """``Σ_i softmax(w_t/τ)_i · B_i`` (out_rows × r, small: never a full weight delta)."""
        return torch.einsum("i,ior->or", self.mixing(), self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        lam = self.task_matrix.float()
        a = self.lora_A.float() * lam.unsqueeze(1) if self.diagonal else lam @ self.lora_A.float()
        return (self.up_weight().float() @ a) * self.scaling


class IA3Scale(_AdapterBase):
    """``l ⊙ y`` on the selected output rows; ``l`` starts at ones."""

    shareable = ("lora_B",)

    def __init__(self, config: LoRAConfig, in_features: int, out_rows: int, rows: Rows,
                 dtype: torch.dtype, device: torch.device, key: str = "") -> None:
        super().__init__(config, in_features, out_rows, rows, dtype, device)
        init = torch.ones(out_rows)
        if config.init_weights in ("bert", "gaussian"):
            init = init + torch.empty(out_rows).normal_(0.0, 0.02, generator=_generator(config, key))
        self.lora_B = nn.Parameter(init.to(dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, y: torch.Tensor, layer: LoRALinear, owned: bool = False) -> torch.Tensor:
        scale = self.lora_B.to(y.dtype)
        if self.gate is not None:  # gated IA3: l' = 1 + g (l - 1)
            scale = 1 + (scale - 1) * self._gate_value(x).to(y.dtype)
        if self.row_index is None:
            return y * scale
        return y.index_copy(-1, self.row_index, y.index_select(-1, self.row_index) * scale)


class IA3InputScale(_AdapterBase):
    """IA3 on a projection's input (PEFT's ``feedforward_modules``): ``W(l ⊙ x) + b``; ``l`` (``in_features``)
    starts at ones. As a leaf it adds ``W((l − 1) ⊙ x)`` to what it is given, so it composes additively with
    other adapters; alone, :class:`~.layer.LoRALinear` calls the base on ``l ⊙ x`` (one GEMM)."""

    shareable = ("input_scale",)
    scales_input = True

    def __init__(self, config: LoRAConfig, in_features: int, out_rows: int, dtype: torch.dtype, device: torch.device,
                 key: str = "") -> None:
        super().__init__(config, in_features, out_rows, None, dtype, device)
        init = torch.ones(in_features)
        if config.init_weights in ("bert", "gaussian"):
            init = init + torch.empty(in_features).normal_(0.0, 0.02, generator=_generator(config, key))
        self.input_scale = nn.Parameter(init.to(dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, y: torch.Tensor, layer: LoRALinear, owned: bool = False) -> torch.Tensor:
        delta = layer.base_forward(x * (self.input_scale.to(x.dtype) - 1))
        if layer.bias is not None:
            delta = delta - layer.bias.to(delta.dtype)
        return y + delta


class DoRADelta(LoRADelta):
    """``m ⊙ (W + s·BA)x / ‖W + s·BA‖_row + b``.

    The row norms are computed from ``‖W‖²``, ``W·Aᵀ`` and the Gram matrix ``A·Aᵀ``, so the full
    ``W + s·BA`` is never built in the forward pass. As in the DoRA paper, the norm is treated as
    a constant in the backward pass.
    """

    shareable = ("lora_A", "lora_B")

    def __init__(self, config: LoRAConfig, in_features: int, out_rows: int, rows: Rows,
                 dtype: torch.dtype, device: torch.device, base_rows_weight: torch.Tensor, key: str = "") -> None:
        super().__init__(config, in_features, out_rows, rows, dtype, device, key)
        norm = base_rows_weight.detach().float().norm(dim=1)
        self.magnitude = nn.Parameter(norm.to(dtype=dtype, device=device))

    def _base_sq_norms(self, w_rows: torch.Tensor, layer: LoRALinear | None = None) -> torch.Tensor:
        """``‖W_i‖²`` per row, cached while the frozen weight is unchanged (keyed on its version
        counter and storage), so the forward pass does not re-read and square the whole ``W``. The rows of
        a quantized base are a transient dequantized copy: the key is then the layer's stored weight."""
        if traced_or_transformed():  # before any data_ptr() / _version read
            return (w_rows * w_rows).sum(dim=1)
        if layer is not None and layer.quantization is not None:
            key = (*layer.weight_key(), w_rows.shape, w_rows.dtype)
        else:
            key = (w_rows._version, w_rows.data_ptr(), w_rows.shape, w_rows.dtype, w_rows.device)
        cached = self.__dict__.get("_sq_cache")
        if cached is None or cached[0] != key:
            value = (w_rows * w_rows).sum(dim=1)
            self.__dict__["_sq_cache"] = (key, value.detach())
            return value
        return cached[1]

    def row_norm(self, w_rows: torch.Tensor, layer: LoRALinear | None = None) -> torch.Tensor:
        """``‖W + s·BA‖`` per output row, without forming ``W + s·BA`` (``layer``: where ``w_rows`` came from)."""
        a, b, s = self.lora_A, self.lora_B, self.scaling
        w_rows = w_rows.to(a.dtype)
        w_sq = self._base_sq_norms(w_rows, layer)
        cross = (b * F.linear(w_rows, a)).sum(dim=1)  # B_i · (W_i Aᵀ)
        gram = F.linear(a, a)  # A Aᵀ (r × r)
        quad = ((b @ gram) * b).sum(dim=1)
        return (w_sq + 2 * s * cross + s * s * quad).clamp_min(1e-12).sqrt()

    def forward(self, x: torch.Tensor, y: torch.Tensor, layer: LoRALinear, owned: bool = False) -> torch.Tensor:
        rows = self.row_index
        w_rows = layer.weight_rows(self.row_slice if self.row_slice is not None else rows).detach()
        factor = (self.magnitude / self.row_norm(w_rows, layer).detach()).to(y.dtype)
        bias = layer.bias_rows(rows)
        base = y if rows is None else y.index_select(-1, rows)
        if bias is not None:
            base = base - bias
        out = _add_low_rank(base, self.project(x), self.lora_B, self.scaling, None) * factor
        if bias is not None:
            out = out + bias
        return out if rows is None else y.index_copy(-1, rows, out)

    def merged_rows(self, w_rows: torch.Tensor) -> torch.Tensor:
        """The merged weight rows ``m ⊙ (W + s·BA) / ‖W + s·BA‖_row`` (float32)."""
        new = w_rows.float() + self.delta_weight()
        return new * (self.magnitude.float() / new.norm(dim=1)).unsqueeze(1)
