"""Bottleneck adapter layers, PHM (Compacter) projections and AdapterFusion.

A :class:`BottleneckLayer` is installed as a child module of a Transformer layer (so the base
model's state-dict keys stay as they were) and hosts every bottleneck adapter and fusion at one
location (``attn``, ``cross`` or ``output``). It works through three torch hooks, tied to its
lifetime by the attach site. The hooks are plain functions of the layer's attribute name: they
find the adapter layer, and keep per-call tensors, in the running Transformer layer's frame
(:mod:`adapters.frames`), never on a module, so threads and ``nn.DataParallel`` replicas each use
their own:

* a forward pre-hook on the ``layer_pre_*`` module stores the residual stream ``x`` (its first
  positional argument or ``hidden_states`` keyword) in the frame for the rest of the layer's
  forward; only while a plan is active, and consumed by the next hook;
* a forward hook on the output projection (attention ``o`` or FFN ``output``) replaces the
  sub-block output ``h`` by the adapted one;
* for ``original_ln_after=False`` on models whose interface names the norm (post-norm), a forward
  hook on that norm replaces its output by the adapter's output (see :class:`~.config.BnConfig`).

Hooks stay valid when another method (LoRA) later replaces the projection module, since core's
:meth:`~adapters.method.AttachSite.replace` moves hooks to the new module.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from adapters.plugin import (
    IDENTITY,
    AdapterError,
    AdapterLayer,
    AttachSite,
    FusePlan,
    Leaf,
    ModulePoint,
    PlanNode,
    PlanOps,
    adapter_dtype_at,
    frame_child,
)

from . import fused
from .config import AdapterFusionConfig, BnConfig
from .units import Bottleneck, FusionLayer, PHMLinear, PHMRule, PHMWeight, activation, need_residual

__all__ = ["Bottleneck", "BottleneckLayer", "FusionLayer", "PHMLinear", "PHMRule", "PHMWeight", "activation"]

Norm = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------- layer
class _BnOps(PlanOps):
    """Leaf, identity and fuse semantics of bottleneck adapters for :func:`adapters.plan.execute`
    (made per call: it carries the call's norm)."""

    def __init__(self, layer: BottleneckLayer, norm: Norm, final_space: bool, scratch: dict | None = None) -> None:
        self.layer = layer
        self.norm = norm
        self.final_space = final_space
        self.scratch = scratch

    def leaf(self, name: str, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.layer.run_adapter(name, inputs[0], inputs[1] if len(inputs) > 1 else None, self.norm,
                                      self.final_space)

    def identity(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if self.final_space:
            return self.norm(inputs[0] + need_residual(inputs[1] if len(inputs) > 1 else None))
        return inputs[0]

    def fuse(self, node: FusePlan, inputs: tuple[torch.Tensor, ...], run: Any) -> torch.Tensor:
        layer = self.layer
        if node.fusion not in layer.fusions:
            raise AdapterError(f"AdapterFusion '{node.fusion}' has no layer at {layer.location}.")
        h = inputs[0]
        x = inputs[1] if len(inputs) > 1 else None
        kids = [c for c in node.children if c is not IDENTITY]
        fusion = layer.fusions[node.fusion]
        branches = torch.stack([run(c, inputs) - h for c in kids], dim=-2)
        query_input = h
        if not fusion.config.query_before_ln:
            first = kids[0].leaves()[0]
            query_input = layer.adapters[first].adapter_input(h, x, self.norm)
        key = f"{layer.attr}.temperature.{node.fusion}"
        return fusion(h, query_input, branches, fusion.temperature_for_call(self.scratch, key))


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _relative(point: ModulePoint | None, owner: ModulePoint, what: str) -> str | None:
    """``point``'s path inside the Transformer layer ``owner`` (refused when it lies outside)."""
    if point is None:
        return None
    prefix = owner.path + "."
    if not point.path.startswith(prefix):
        raise AdapterError(f"Bottleneck adapters need the {what} inside the Transformer layer '{owner.path}'; "
                           f"the interface puts it at '{point.path}'.")
    return point.path[len(prefix):]


class BottleneckLayer(AdapterLayer):
    """Every bottleneck adapter (and fusion) at one location of one Transformer layer.

    Installed as the child ``attr`` of the Transformer layer. Its hooks on modules inside that layer
    (residual capture, projection output, norm output) are plain functions of ``attr``: they find
    the layer through the running layer's frame (:func:`adapters.frames.frame_child`), so a replica
    or copy of the model uses its own adapters, and keep the captured residual in the frame.
    """

    def __init__(self, location: str, kind: str, attr: str, hidden: int, owner: ModulePoint, proj: ModulePoint,
                 pre: ModulePoint | None, norm: ModulePoint | None) -> None:
        super().__init__(location)
        self.kind = kind
        self.attr = attr
        self.hidden = hidden
        self.fusions = nn.ModuleDict()
        self.configs: dict[str, BnConfig] = {}
        # paths inside the Transformer layer, resolved on the module each call runs
        self.proj_path = _relative(proj, owner, "output projection")
        self.pre_path = _relative(pre, owner, "module before the sub-block (layer_pre_*)")
        self.norm_path = _relative(norm, owner, "norm after the sub-block")
        self._final_space: dict[Any, bool] = {}  # plan -> whether it works in the norm's output space
        self._hooked = False
        self._norm_hooked = False

    # -- placement ------------------------------------------------------------------------------
    def install_hooks(self, site: AttachSite, owner: nn.Module) -> None:
        """Register the capture and output hooks (once per layer)."""
        if self._hooked:
            return
        site.layer_frames()
        if self.pre_path is not None:
            pre = owner.get_submodule(self.pre_path)
            site.register_hook(self, pre.register_forward_pre_hook(partial(_capture, self.attr), with_kwargs=True))
        proj = owner.get_submodule(self.proj_path)
        site.register_hook(self, proj.register_forward_hook(partial(_after_projection, self.attr)))
        self._hooked = True

    def add_adapter(self, name: str, config: BnConfig, site: AttachSite, owner: nn.Module | None = None) -> None:
        """Create adapter ``name`` here (sizes from the config and the layer index)."""
        if owner is None:
            raise AdapterError("BottleneckLayer.add_adapter needs the Transformer layer module (owner=...).")
        self.install_hooks(site, owner)
        layer_index = int(self.location.split(".")[1])
        bottleneck = max(1, int(self.hidden // config.reduction_for(layer_index)))
        proj = owner.get_submodule(self.proj_path)
        dtype = adapter_dtype_at(site, proj, config)  # a quantized projection: its compute dtype
        device = next((p.device for p in proj.parameters()), None)
        shared: dict[str, nn.Module] = {}
        if config.phm_layer:
            if config.shared_phm_rule:
                for role in ("down", "up"):
                    shared[f"rule_{role}"] = site.shared(f"phm_rule_{role}", lambda: PHMRule(config, dtype, device))
            if config.shared_W_phm:
                shared["W_down"] = site.shared(f"phm_W_{self.hidden}x{bottleneck}",
                                               lambda: PHMWeight(config, self.hidden, bottleneck, dtype, device))
                shared["W_up"] = site.shared(f"phm_W_{bottleneck}x{self.hidden}",
                                             lambda: PHMWeight(config, bottleneck, self.hidden, dtype, device))
        module = Bottleneck(config, self.hidden, bottleneck, dtype, device, shared)
        module.train(self.training)
        self.adapters[name] = module
        self.configs[name] = config
        self._final_space.clear()
        if not config.original_ln_after and self.norm_path is not None and not self._norm_hooked:
            norm = owner.get_submodule(self.norm_path)
            site.register_hook(self, norm.register_forward_hook(partial(_replace_norm_output, self.attr)))
            self._norm_hooked = True

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.configs.pop(name, None)
        self._final_space.clear()

    def add_fusion(self, fusion_name: str, config: AdapterFusionConfig, names: list[str]) -> None:
        """Create the fusion layer ``fusion_name`` here."""
        ref = next(self.adapters[n] for n in names if n in self.adapters)
        param = next(ref.parameters())
        self.fusions[fusion_name] = FusionLayer(config, self.hidden, param.dtype, param.device)
        self.fusions[fusion_name].train(self.training)

    def delete_fusion(self, fusion_name: str) -> None:
        """Remove the fusion layer ``fusion_name`` (if here)."""
        if fusion_name in self.fusions:
            del self.fusions[fusion_name]

    # -- forward --------------------------------------------------------------------------------
    def final_space(self, plan: PlanNode) -> bool:
        """Whether ``plan`` has an adapter with ``original_ln_after=False``: then every branch works in
        the output space of the norm after the sub-block (memoised per plan; plans are values)."""
        value = self._final_space.get(plan)
        if value is None:
            value = any(not self.configs[n].original_ln_after for n in plan.leaves() if n in self.configs)
            if not torch.compiler.is_compiling():  # a traced write: a recompile per layer, unsafe in checkpointing
                self._final_space[plan] = value
        return value

    def norm_of(self, owner: nn.Module) -> Norm:
        """The model's norm at this location in the Transformer layer ``owner`` (identity without one)."""
        return owner.get_submodule(self.norm_path) if self.norm_path is not None else _identity

    def run_adapter(self, name: str, h: torch.Tensor, x: torch.Tensor | None, norm: Norm,
                    final_space: bool) -> torch.Tensor:
        """Adapter ``name`` on ``(h, x)``, in the layer's output convention (see :meth:`final_space`)."""
        adapter = self.adapters[name]
        out = fused.bottleneck(adapter, h, x, norm is _identity)  # training on CUDA with Triton (None: not covered)
        if out is None:
            out = adapter(h, x, norm)
        if final_space and self.configs[name].original_ln_after:
            out = norm(out + need_residual(x))
        return out

    def adapt(self, plan: PlanNode, h: torch.Tensor, x: torch.Tensor | None, norm: Norm,
              final_space: bool, scratch: dict | None = None) -> torch.Tensor:
        """The sub-block output ``h`` with ``plan`` applied (``x``: the captured residual stream;
        ``scratch``: the running layer frame's per-call storage)."""
        if x is not None and x.shape != h.shape:
            x = x.reshape(h.shape)
        if isinstance(plan, Leaf):
            return self.run_adapter(plan.name, h, x, norm, final_space)
        return self.run_plan(plan, (h,) if x is None else (h, x), _BnOps(self, norm, final_space, scratch))

    def forward(self, h: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Apply this call's plan to a sub-block output ``h`` outside a model forward (no norm)."""
        plan = self.active_plan()
        if plan is None:
            return h
        return self.adapt(plan, h, x, _identity, False)


# -- hooks: plain functions of the layer's attribute name, no reference to any module ------------------
def _capture(attr: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
    frame, layer = frame_child(attr)
    if layer is not None and layer.active_plan() is not None:
        frame.scratch[attr] = args[0] if args else kwargs.get("hidden_states")
    return None


def _after_projection(attr: str, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    frame, layer = frame_child(attr)
    if layer is None:
        return None
    plan = layer.active_plan()
    if plan is None:
        return None
    x = frame.scratch.pop(attr, None)
    final_space = layer.final_space(plan)
    norm = layer.norm_of(frame.owner)
    y = layer.adapt(plan, output, x, norm, final_space, frame.scratch)
    if not final_space:
        return y
    if layer.norm_path is not None:
        frame.scratch[attr + ".final"] = y
        return None
    return y - need_residual(x)


def _replace_norm_output(attr: str, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    frame, _ = frame_child(attr)
    if frame is None:
        return None
    return frame.scratch.pop(attr + ".final", None)
