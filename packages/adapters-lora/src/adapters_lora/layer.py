"""The LoRA-family layer: a drop-in replacement of an ``nn.Linear`` or GPT-2 ``Conv1D``.

:class:`LoRALinear` takes over the original module's ``weight`` and ``bias`` parameters (the same
tensors, no copy), so the base model's state-dict keys are unchanged, and hosts every LoRA-family
adapter placed at that projection. Each adapter is a small module (:class:`LoRADelta`,
:class:`IA3Scale`, :class:`DoRADelta`) that maps ``(x, y)`` -- the projection's input and output --
to the adapted output. The forward pass is ``y = base(x)`` followed by, for a single active
adapter, one call; other plans go through :meth:`~adapters.plugin.AdapterLayer.run_plan`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adapters.plugin import (
    AdapterError,
    AdapterLinear,
    AttachSite,
    FusedParts,
    Leaf,
    Rows,
    count_rows,
    param,
    row_index,
)

from . import fused, fused_decode, fused_dora
from .config import LoRAConfig
from .deltas import DoRADelta, IA3InputScale, IA3Scale, LoRADelta, MTLLoRADelta
from .gathered import CACHE, ROUTED, gathered_forward
from .hotswap import hotswap_values

__all__ = ["LoRALinear", "MergedLoRALinear", "LoRADelta", "MTLLoRADelta", "IA3Scale", "DoRADelta", "FusedParts"]


class LoRALinear(AdapterLinear):
    """A linear projection with LoRA-family adapters. Shares ``weight``/``bias`` with the original.

    Plans run on ``(y, x)``: each adapter maps the projection's output ``y`` to an adapted output
    (:meth:`leaf`), so ``Stack`` adds deltas and ``Average`` averages outputs. A row-routing plan
    (``MultiTask``, per-row ``adapter_names``, ``BatchSplit``, ``Parallel``) over plain LoRA adapters runs
    without autograd on the gathered path (:mod:`.gathered`: three operations whatever the number of
    adapters). While every adapter here is merged, the layer is a :class:`MergedLoRALinear`.
    """

    def leaf(self, name: str, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        y, x = inputs
        return self.adapters[name](x, y, self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.active_plan()
        if plan is None:
            return self.base_forward(x)
        if CACHE in self.__dict__ and torch.is_grad_enabled():
            self.clear_gathered()  # a training step may follow (fused optimizers write without a version bump)
        if type(plan) is Leaf:
            module = self._modules["adapters"]._modules[plan.name]
            if module.scales_input:  # IA3 on the input, alone: the base on l ⊙ x
                return self.base_forward(x * module.input_scale.to(x.dtype))
            # a lone plain LoRA adapter on a float nn.Linear: the straight-line path (the in-place update
            # is not autocast-aware: under autocast the general path runs; a quantized base is called)
            if module.straight and not torch.is_autocast_enabled(x.device.type):
                lora_a = param(module, "lora_A")
                if x.dtype == lora_a.dtype:
                    return self._straight_line(x, lora_a, param(module, "lora_B"), module.scaling)
            if type(module) is DoRADelta and torch.is_grad_enabled():  # training on CUDA with Triton: fused DoRA
                out = fused_dora.dora_layer(self, module, x)
                if out is not None:
                    return out
            # one adapter: y is ours, so it is updated in place; .forward skips the module-call
            # machinery (adapter modules carry no hooks)
            return module.forward(x, self.base_forward(x), self, True)
        if type(plan) in ROUTED and not torch.is_grad_enabled():  # several adapters, one per row
            out = gathered_forward(self, plan, x)
            if out is not None:
                return out
        return self.run_plan(plan, (self.base_forward(x), x))

    def _straight_line(self, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                       scaling: float) -> torch.Tensor:
        """``y = Wx + b + s·B(Ax)`` on 2-D views: the base GEMM (bias in its epilogue), the rank-r GEMM
        and one fused ``addmm`` (in place without autograd, eagerly); with ``ADAPTERS_FUSED`` on CUDA, Triton kernels
        for training (:mod:`.fused`) and for inference at few rows (:mod:`.fused_decode`). Flat views keep
        autograd's graph small (no per-linear view nodes); a frozen W's transpose records nothing."""
        weight, bias = param(self, "weight"), param(self, "bias")
        x2 = x.reshape(-1, self.in_features)
        if torch.is_grad_enabled():  # training on CUDA with Triton: the fused kernels (None: not covered)
            y2 = fused.lora_linear(x2, weight, bias, lora_a, lora_b, scaling)
        else:  # inference at few rows (decode) on CUDA with Triton: one launch
            y2 = fused_decode.lora_decode(x2, weight, bias, lora_a, lora_b, scaling)
        if y2 is not None:
            return y2.view(*x.shape[:-1], self.out_features)
        y2 = x2.mm(weight.t()) if bias is None else torch.addmm(bias, x2, weight.t())
        h2 = x2.mm(lora_a.t())
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            # compiled: out of place (inductor would copy the in-place result back: one more kernel a site)
            y2 = torch.addmm(y2, h2, lora_b.t(), alpha=scaling)
        else:
            y2.addmm_(h2, lora_b.t(), alpha=scaling)
        return y2.view(*x.shape[:-1], self.out_features)

    # -- derived state: the gathered stacks, the merged class ------------------------------------
    def clear_gathered(self) -> None:
        """Drop the stacked weights of the gathered path (rebuilt on the next routed call)."""
        self.__dict__.pop(CACHE, None)

    def _sync_merged_class(self) -> None:
        """Be a :class:`MergedLoRALinear` exactly while every adapter here is merged (then every valid setup's
        plan here is ``None``: merged adapters are pruned from plans, and no other adapter is hosted)."""
        merged = self.__dict__.get("_merged_names", ())
        fully = self._backup is not None and len(self.adapters) > 0 and all(n in merged for n in self.adapters)
        cls = MergedLoRALinear if fully else LoRALinear
        if type(self) is not cls:
            self.__class__ = cls

    def _apply(self, fn: Any, recurse: bool = True) -> nn.Module:  # .to(), .cuda(), .half(): stacks are stale
        self.clear_gathered()
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> nn.Module:  # model.train() / .eval(): a training loop's boundaries
        self.clear_gathered()
        return super().train(mode)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        if CACHE in state:  # a cache of derived weights: pickles and deep copies rebuild it
            state = {k: v for k, v in state.items() if k != CACHE}
        return state

    # -- adapters --------------------------------------------------------------------------------
    def add_adapter(self, name: str, config: LoRAConfig, site: AttachSite) -> None:
        self.adapters[name] = self._build(config, site, None, "")
        self.clear_gathered()
        self._sync_merged_class()

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.clear_gathered()
        self._sync_merged_class()

    def load_adapter_state_dict(self, name: str, state: Any) -> None:
        super().load_adapter_state_dict(name, state)
        self.clear_gathered()

    def hotswap_values(self, source: str, target: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """What :func:`adapters.hotswap.hotswap_adapter` writes to give adapter ``target`` the weights of
        ``source`` in place: ``(parameter of target, new value)`` pairs; a smaller rank is zero-padded and its
        scaling folded into ``B`` (see :func:`.hotswap.hotswap_values`).

        :raises AdapterError: the two differ in kind, rows, gate or shape, or ``source`` has the larger rank.
        """
        return hotswap_values(self, source, target)

    def add_fused_or_plain(self, name: str, config: LoRAConfig, site: AttachSite, rows: Rows,
                           which: str | None, scales_input: bool = False) -> None:
        """Add adapter ``name``; for a fused projection, its part for matrix ``which`` on output ``rows``.
        ``scales_input``: IA3 on the projection's input (a whole projection only)."""
        if scales_input:
            self.adapters[name] = IA3InputScale(config, self.in_features, self.out_features,
                                                self.adapter_dtype(site, config), self.weight.device, self.location)
        elif which is None:
            self.adapters[name] = self._build(config, site, None, "")
        else:
            if name not in self.adapters:
                self.adapters[name] = FusedParts()
            self.adapters[name].parts[which] = self._build(config, site, rows, which)
        self.clear_gathered()
        self._sync_merged_class()

    def _build(self, config: LoRAConfig, site: AttachSite, rows: Rows, which: str) -> nn.Module:
        dtype = self.adapter_dtype(site, config)
        device = self.weight.device
        out_rows = count_rows(rows, self.out_features)
        key = f"{self.location}.{which}" if which else self.location
        if config.composition_mode == "scale":
            return IA3Scale(config, self.in_features, out_rows, rows, dtype, device, key)
        if config.use_dora:
            return DoRADelta(config, self.in_features, out_rows, rows, dtype, device, self.weight_rows(rows), key)
        if getattr(config, "n_up_projection", None) is not None:
            return MTLLoRADelta(config, self.in_features, out_rows, rows, dtype, device, key)
        module = LoRADelta(config, self.in_features, out_rows, rows, dtype, device, key)
        module.straight = (module.dropout is None and module.gate is None and module.row_index is None
                           and not self.is_conv1d and self.quantization is None)
        return module

    def units(self, name: str) -> dict[str, nn.Module]:
        """The per-matrix modules of adapter ``name`` (``{"": module}`` on a plain projection)."""
        return FusedParts.units(self.adapters[name])

    # -- sharing ---------------------------------------------------------------------------------
    def share_parameters(self, names: list[str], reference: str) -> None:
        """Make the shareable parameters (``A``, ``B``) of ``names`` the reference adapter's objects."""
        ref_units = self.units(reference)
        for name in names:
            if name == reference:
                continue
            for key, unit in self.units(name).items():
                ref = ref_units.get(key)
                if ref is None or type(ref) is not type(unit):
                    raise AdapterError(f"share_parameters: '{name}' and '{reference}' differ at {self.location}.")
                for attr in unit.shareable:
                    if getattr(ref, attr).shape != getattr(unit, attr).shape:
                        raise AdapterError(f"share_parameters: {attr} of '{name}' and '{reference}' differ in shape "
                                           f"at {self.location}.")
                    setattr(unit, attr, getattr(ref, attr))
        self.clear_gathered()

    def unshare_parameters(self, names: list[str]) -> None:
        """Give each adapter in ``names`` its own copy of its shareable parameters."""
        for name in names:
            for unit in self.units(name).values():
                for attr in unit.shareable:
                    old = getattr(unit, attr)
                    setattr(unit, attr, nn.Parameter(old.detach().clone(), requires_grad=old.requires_grad))
        self.clear_gathered()

    # -- averaging -------------------------------------------------------------------------------
    def average_adapter(self, name: str, sources: list[tuple[str, float]], combine_strategy: str,
                        **kwargs: Any) -> None:
        """Fill adapter ``name`` from ``sources`` (``(name, weight)`` pairs).

        ``"linear"``: every tensor (``A`` and ``B`` separately) is the weighted average.
        ``"lora_linear_only_negate_b"``: like ``linear``, but ``A`` is averaged with the weights' absolute
        values, so a negative weight negates only ``B`` (``w = -1`` subtracts an adapter's delta exactly,
        as in AdapterHub's task arithmetic).
        ``"lora_delta_w_svd"``: the weighted average of the deltas ``ΔW = s·BA`` is truncated to
        the new adapter's rank ``r`` (``svd_rank``) by SVD and stored as ``A = √Σ Vᵀ``, ``B = U √Σ / s``,
        so its delta is the best rank-``r`` approximation of the averaged delta (exact when that has
        rank ≤ ``r``). Other tensors (DoRA magnitude, gates) are averaged linearly.
        """
        if combine_strategy == "linear":
            super().average_adapter(name, sources, combine_strategy)
            return
        if combine_strategy == "lora_linear_only_negate_b":
            self._average_negate_b(name, sources)
            return
        if combine_strategy != "lora_delta_w_svd":
            raise AdapterError(f"LoRA supports combine_strategy 'linear', 'lora_linear_only_negate_b' or "
                               f"'lora_delta_w_svd', not {combine_strategy!r}.")
        for key, target in self.units(name).items():  # other tensors average linearly; A, B come from the SVD
            for src, _ in sources:
                unit = self.units(src)[key]
                if type(unit) is not type(target):
                    raise AdapterError(f"combine_strategy='lora_delta_w_svd': '{src}' and '{name}' differ at "
                                       f"{self.location}.")
        with torch.no_grad():
            for key, target in self.units(name).items():
                state = target.state_dict()
                for tensor_name, tensor in state.items():
                    if tensor_name in ("lora_A", "lora_B"):
                        continue
                    mixed = sum(w * self.units(src)[key].state_dict()[tensor_name].float() for src, w in sources)
                    tensor.copy_(mixed.to(tensor.dtype))
        for key, target in self.units(name).items():
            if type(target) not in (LoRADelta, DoRADelta):
                raise AdapterError(f"combine_strategy='lora_delta_w_svd' needs plain LoRA or DoRA adapters, "
                                   f"not {type(target).__name__}.")
            mixed = sum(w * self.units(src)[key].delta_weight() for src, w in sources)
            u, sigma, vh = torch.linalg.svd(mixed, full_matrices=False)
            r = target.lora_A.shape[0]
            root = sigma[:r].sqrt()
            new_a = torch.zeros_like(target.lora_A, dtype=torch.float32)
            new_b = torch.zeros_like(target.lora_B, dtype=torch.float32)
            k = root.shape[0]
            new_a[:k] = root.unsqueeze(1) * vh[:r]
            new_b[:, :k] = u[:, :r] * root.unsqueeze(0) / target.scaling
            with torch.no_grad():
                target.lora_A.copy_(new_a)
                target.lora_B.copy_(new_b)

    def _average_negate_b(self, name: str, sources: list[tuple[str, float]]) -> None:
        with torch.no_grad():
            for key, target in self.units(name).items():
                if type(target) not in (LoRADelta, DoRADelta, MTLLoRADelta):
                    raise AdapterError("combine_strategy='lora_linear_only_negate_b' needs LoRA adapters, not "
                                       f"{type(target).__name__}.")
                for tensor_name, tensor in target.state_dict().items():
                    absolute = tensor_name == "lora_A"  # A with |w|: a negative weight flips only B
                    mixed = sum((abs(w) if absolute else w) * self.units(src)[key].state_dict()[tensor_name].float()
                                for src, w in sources)
                    tensor.copy_(mixed.to(tensor.dtype))

    # -- merging ---------------------------------------------------------------------------------
    def merge_adapter(self, name: str) -> None:
        """Fold adapter ``name`` into ``weight`` (and, for IA3, ``bias``); an exact backup is kept.

        An MTL-LoRA adapter merges its own task: ``W ← W + s·Σ_i softmax(w_t/τ)_i B_i Λ_t A``. Several
        adapters merge in order (LoRA deltas add, IA3 scales what is there); DoRA normalises by the
        weight it is merged into, so it merges only alone.

        :raises AdapterError: a DoRA adapter onto (or under) another merge, or a gated adapter.
        """
        dora = any(isinstance(unit, DoRADelta) for unit in self.units(name).values())
        if self.is_merged and (dora or self.__dict__.get("_merged_dora")):
            raise AdapterError(f"Cannot merge '{name}' at {self.location}: DoRA normalises by the weight it is merged "
                               "into, so a DoRA adapter merges only alone. Call reset_adapter() first.")
        if self.is_merged and any(unit.scales_input for unit in self.units(name).values()):
            raise AdapterError(f"Cannot merge '{name}' at {self.location} onto another merge: IA3 on the input "
                               "scales the base weight's columns, which equals the unmerged Stack only when it is "
                               "merged first. Call reset_adapter() and merge it first.")
        first = not self.is_merged
        self.begin_merge()
        try:
            for unit in self.units(name).values():
                self._merge_unit(unit)
        except BaseException:
            if first:
                self.unmerge_adapter(name)
            raise
        self.__dict__["_merged_dora"] = dora
        self.__dict__["_merged_names"] = (*self.__dict__.get("_merged_names", ()), name)
        self._sync_merged_class()

    def unmerge_adapter(self, name: str) -> None:
        super().unmerge_adapter(name)  # restores the original weights: nothing is merged here any more
        self.__dict__["_merged_dora"] = False
        self.__dict__["_merged_names"] = ()
        self._sync_merged_class()

    def keep_merged(self) -> None:
        super().keep_merged()
        self.__dict__["_merged_dora"] = False
        self.__dict__["_merged_names"] = ()
        self._sync_merged_class()

    def _merge_unit(self, module: nn.Module) -> None:
        if module.gate is not None:
            raise AdapterError("A gated LoRA adapter cannot be merged: its gate depends on the input.")
        rows = module.rows
        index = row_index(rows, self.out_features, self.weight.device)
        with torch.no_grad():
            w = self.weight_rows(rows).float()
            if isinstance(module, IA3InputScale):
                new_w = w * module.input_scale.float().unsqueeze(0)
            elif isinstance(module, IA3Scale):
                new_w = w * module.lora_B.float().unsqueeze(1)
                if self.bias is not None:
                    self.bias.index_copy_(0, index, (self.bias_rows(rows).float() * module.lora_B.float())
                                          .to(self.bias.dtype))
            elif isinstance(module, DoRADelta):
                new_w = module.merged_rows(w)  # DoRA leaves the bias as it is
            else:
                new_w = w + module.delta_weight()
            self.write_weight_rows(rows, new_w)


class MergedLoRALinear(LoRALinear):
    """A :class:`LoRALinear` whose every adapter is merged into its weights: its ``forward`` is the wrapped
    module's computation itself (:meth:`~adapters.plugin.AdapterLinear.base_forward`: one ``F.linear`` on the
    shared weight and bias, GPT-2's ``addmm``, or the quantized module's call), with no plan lookup on the path.

    Same module, state dict, adapters and merge bookkeeping as a :class:`LoRALinear`; the layer switches
    class (``LoRALinear._sync_merged_class``) when a merge, reset, ``merge_and_unload``, or an adapter added
    or deleted here changes whether everything here is merged. Every setup valid while merged has no plan
    here (merged adapters are pruned from plans, and nothing else is hosted), so nothing is skipped.
    Pickles, deep copies and ``nn.DataParallel`` replicas keep the class.
    """

    forward = AdapterLinear.base_forward
