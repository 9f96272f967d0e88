"""VeRA's modules: the shared random projections and the layer that replaces a linear projection.

:class:`VeraProjections` is one model-level module per adapter (installed through
``site.shared("projections", ...)``) holding the frozen random matrices ``A`` (``r × max_in``) and
``B`` (``max_out × r``) as *buffers*: they are never trained, never counted as parameters, and with
``save_projection=False`` they are non-persistent, so they stay out of checkpoints and are redrawn
from ``projection_prng_key`` whenever the adapter is added (or loaded).

:class:`VeraLinear` takes over the ``weight`` and ``bias`` of an ``nn.Linear`` or GPT-2 ``Conv1D``
(the same tensors, so base state-dict keys do not change) and hosts one :class:`VeraVectors` per
adapter: the trainable ``λ_d`` (``r``) and ``λ_b`` (output features) plus a reference to the
shared projections, sliced to this layer's widths. The forward pass computes
``y + s·λ_b ⊙ B(λ_d ⊙ A x)`` with two thin matrix products; ``ΔW`` is only formed when merging.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from adapters.plugin import AdapterError, AdapterLinear, AttachSite, FusedParts, Rows, SharedRef, count_rows
from adapters.plugin import is_linear_like as _is_linear_like

from .config import VeraConfig

__all__ = ["VeraProjections", "VeraVectors", "VeraFusedParts", "VeraLinear", "generate_projections",
           "is_linear_like"]

#: re-exported from core (older imports of ``adapters_vera.layer.is_linear_like`` keep working)
is_linear_like = _is_linear_like



def generate_projections(key: int, r: int, max_in: int, max_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``A`` (``r × max_in``) and ``B`` (``max_out × r``) in float32 on CPU from ``key``.

    A private ``torch.Generator`` seeded with ``key`` draws ``A`` first, then ``B``, each uniform in
    ``±1/sqrt(fan_in)`` (``fan_in`` = ``max_in`` for ``A``, ``r`` for ``B``: Kaiming-uniform with
    ``a = √5``). The global RNG is not touched, and the result is the same on every machine.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(key))
    bound_a = 1.0 / math.sqrt(max_in)
    bound_b = 1.0 / math.sqrt(r)
    a = torch.empty(r, max_in, dtype=torch.float32).uniform_(-bound_a, bound_a, generator=gen)
    b = torch.empty(max_out, r, dtype=torch.float32).uniform_(-bound_b, bound_b, generator=gen)
    return a, b


class VeraProjections(nn.Module):
    """The frozen random projections of one VeRA adapter, shared by all its layers (buffers ``A``, ``B``)."""

    def __init__(self, config: VeraConfig, max_in: int, max_out: int, dtype: torch.dtype,
                 device: torch.device | None) -> None:
        super().__init__()
        self.key = int(config.projection_prng_key)
        self.r = int(config.r)
        self.max_in = int(max_in)
        self.max_out = int(max_out)
        a, b = generate_projections(self.key, self.r, self.max_in, self.max_out)
        persistent = bool(config.save_projection)
        self.register_buffer("A", a.to(dtype=dtype, device=device), persistent=persistent)
        self.register_buffer("B", b.to(dtype=dtype, device=device), persistent=persistent)

    def extra_repr(self) -> str:
        return f"r={self.r}, max_in={self.max_in}, max_out={self.max_out}, key={self.key}"


def _place(y: torch.Tensor, delta: torch.Tensor, rows: Rows) -> torch.Tensor:
    """``y`` plus ``delta`` on the output features ``rows`` (all features when ``None``)."""
    if rows is None:
        return y + delta
    if isinstance(rows, slice):
        pieces = []
        if rows.start:
            pieces.append(y[..., : rows.start])
        pieces.append(y[..., rows] + delta)
        if rows.stop < y.shape[-1]:
            pieces.append(y[..., rows.stop:])
        return torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0]
    return y.index_add(-1, rows, delta)


class VeraVectors(nn.Module):
    """One VeRA adapter at one projection (or one part of a fused projection).

    Parameters: ``lambda_d`` (``r``, init ``vera_d``) and ``lambda_b`` (``out_rows``, init ``vera_b``).
    The shared :class:`VeraProjections` is referenced, not owned, so it is neither part of this
    module's state dict nor of its parameters.
    """

    def __init__(self, config: VeraConfig, projections: VeraProjections, in_features: int, rows: Rows,
                 out_rows: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        if in_features > projections.max_in or out_rows > projections.max_out:
            raise AdapterError(f"VeRA projections ({projections.max_out}×{projections.r}, "
                               f"{projections.r}×{projections.max_in}) are too small for a projection "
                               f"{in_features} → {out_rows}.")
        self.in_features = int(in_features)
        self.out_rows = int(out_rows)
        # a slice stays a plain attribute; an index tensor is a non-persistent buffer, so it follows
        # .to(device) and nn.DataParallel replicas (never a tensor held outside the module's buffers)
        self.row_slice: slice | None = rows if isinstance(rows, slice) else None
        self.register_buffer("row_index", rows if isinstance(rows, torch.Tensor) else None, persistent=False)
        self.scaling = float(config.scaling)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.lambda_d = nn.Parameter(torch.full((config.r,), float(config.vera_d), dtype=dtype, device=device))
        self.lambda_b = nn.Parameter(torch.full((out_rows,), float(config.vera_b), dtype=dtype, device=device))
        self.shared = SharedRef(projections)  # a real child (replicas follow it), kept out of state dicts

    @property
    def rows(self) -> Rows:
        """Output features of the wrapped projection this adapter acts on (``None``: all)."""
        return self.row_slice if self.row_slice is not None else self.row_index

    @property
    def projections(self) -> VeraProjections:
        """The adapter's shared random projections."""
        return self.shared.module

    def sliced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A[:, :in]`` and ``B[:out_rows]``: this projection's views of the shared matrices."""
        proj = self.shared.module
        return proj.A[:, : self.in_features], proj.B[: self.out_rows]

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``s·λ_b ⊙ B(λ_d ⊙ A·dropout(x))`` for this projection's output rows."""
        a, b = self.sliced()
        h = self.dropout(x) if self.dropout is not None else x
        h = F.linear(h.to(a.dtype), a) * self.lambda_d
        scale = self.lambda_b * self.scaling if self.scaling != 1.0 else self.lambda_b
        return F.linear(h, b) * scale

    def forward(self, x: torch.Tensor, y: torch.Tensor, layer: VeraLinear) -> torch.Tensor:
        return _place(y, self.delta(x).to(y.dtype), self.rows)

    def delta_weight(self) -> torch.Tensor:
        """``s·diag(λ_b) B diag(λ_d) A`` (``out_rows × in``, float32): for merging only."""
        a, b = self.sliced()
        left = b.float() * self.lambda_b.float().unsqueeze(1)
        right = a.float() * self.lambda_d.float().unsqueeze(1)
        return (left @ right) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.lambda_d.numel()}, in={self.in_features}, out={self.out_rows}, scaling={self.scaling}"


#: One VeRA adapter on a fused q|k|v projection (core's FusedParts of VeraVectors).
VeraFusedParts = FusedParts


def _units(module: nn.Module) -> list[VeraVectors]:
    return list(FusedParts.units(module).values())


class VeraLinear(AdapterLinear):
    """A linear projection (``nn.Linear`` or ``Conv1D``) with VeRA adapters; shares ``weight``/``bias``.
    Plans run on ``(y, x)``: each adapter maps the base output ``y`` to an adapted output."""

    def leaf(self, name: str, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        y, x = inputs
        return self.adapters[name](x, y, self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)
        return self.run_plan(self.active_plan(), (y, x))

    # -- adapters --------------------------------------------------------------------------------
    def add_adapter(self, name: str, config: VeraConfig, site: AttachSite) -> None:
        """Add adapter ``name`` over the whole output (its projections must already exist on ``site``)."""
        self.add_part(name, config, site, site.shared("projections", _missing), None, None)

    def add_part(self, name: str, config: VeraConfig, site: AttachSite, projections: VeraProjections,
                 rows: Rows, which: str | None) -> None:
        """Add adapter ``name``; on a fused projection, its part for matrix ``which`` on output ``rows``."""
        dtype = self.adapter_dtype(site, config)
        device = self.weight.device
        if isinstance(rows, torch.Tensor):
            rows = rows.to(device)
        vectors = VeraVectors(config, projections, self.in_features, rows, count_rows(rows, self.out_features),
                              dtype, device)
        if which is None:
            self.adapters[name] = vectors
            return
        if name not in self.adapters:
            self.adapters[name] = VeraFusedParts()
        self.adapters[name].parts[which] = vectors

    # -- merging ---------------------------------------------------------------------------------
    def merge_adapter(self, name: str) -> None:
        """``W ← W + s·diag(λ_b) B diag(λ_d) A`` on the adapter's rows (a backup is kept for reset)."""
        self.begin_merge()
        try:
            with torch.no_grad():
                for unit in _units(self.adapters[name]):
                    self.write_weight_rows(unit.rows, self.weight_rows(unit.rows).float() + unit.delta_weight())
        except BaseException:
            self.unmerge_adapter(name)
            raise


def _missing() -> nn.Module:
    raise AdapterError("VeRA projections must be created by VeraMethod.attach before layers are added.")
