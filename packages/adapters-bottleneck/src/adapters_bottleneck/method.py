"""The bottleneck method: where its layers go on a model, what it supports, and AdapterFusion."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from adapters.plugin import (
    ALL_BLOCKS,
    AdapterError,
    AdapterMethod,
    AttachSite,
    LayerPoints,
    ModelPoints,
    ModulePoint,
    check_layer_indices,
    linear_features,
)

from .config import (
    AdapterFusionConfig,
    AdapterPlusConfig,
    BnConfig,
    CompacterConfig,
    CompacterPlusPlusConfig,
    DoubleSeqBnConfig,
    DynamicAdapterFusionConfig,
    ParBnConfig,
    SeqBnConfig,
    StaticAdapterFusionConfig,
    load_fusion_config,
    scaled_par_bn,
)
from .formats import read_adapterhub_bottleneck
from .layer import BottleneckLayer

__all__ = ["BottleneckMethod", "locations"]

#: Attribute of the Transformer layer holding the adapter layer of each location.
CHILD_ATTR = {"attn": "bottleneck_adapters_attn", "cross": "bottleneck_adapters_cross",
              "output": "bottleneck_adapters_output"}


def locations(lp: LayerPoints, config: BnConfig) -> list[tuple[str, ModulePoint, ModulePoint | None,
                                                                 ModulePoint | None, str]]:
    """``(kind, projection, pre point, norm, pre field)`` of every location ``config`` adapts in layer ``lp``."""
    found = []
    if config.mh_adapter and lp.self_attn is not None and lp.self_attn.o is not None:
        found.append(("attn", lp.self_attn.o, lp.pre_self_attn, lp.ln_1, "layer_pre_self_attn"))
    if config.adapts_cross_attention and lp.cross_attn is not None and lp.cross_attn.o is not None:
        found.append(("cross", lp.cross_attn.o, lp.pre_cross_attn, None, "layer_pre_cross_attn"))
    if config.output_adapter and lp.output is not None:
        found.append(("output", lp.output, lp.pre_ffn, lp.ln_2, "layer_pre_ffn"))
    return found


class BottleneckMethod(AdapterMethod):
    """Sequential and parallel bottleneck adapters (Pfeiffer, Houlsby, Adapter+, Compacter) and AdapterFusion."""

    name: ClassVar[str] = "bottleneck"
    config_classes = (BnConfig, SeqBnConfig, DoubleSeqBnConfig, ParBnConfig, AdapterPlusConfig, CompacterConfig,
                      CompacterPlusPlusConfig)
    presets = {
        "bottleneck": BnConfig,
        "seq_bn": SeqBnConfig,
        "pfeiffer": SeqBnConfig,
        "double_seq_bn": DoubleSeqBnConfig,
        "houlsby": DoubleSeqBnConfig,
        "par_bn": ParBnConfig,
        "parallel": ParBnConfig,
        "scaled_par_bn": scaled_par_bn,
        "adapterplus": AdapterPlusConfig,
        "compacter": CompacterConfig,
        "compacter++": CompacterPlusPlusConfig,
    }
    extra_exports = {c.__name__: c for c in (AdapterFusionConfig, StaticAdapterFusionConfig,
                                             DynamicAdapterFusionConfig)}
    supported_blocks = ALL_BLOCKS
    formats = {"adapterhub": (read_adapterhub_bottleneck, None)}
    hook_points = frozenset({"layer_self_attn", "layer_cross_attn", "attn_o_proj", "layer_output_proj",
                             "layer_pre_self_attn", "layer_pre_cross_attn", "layer_pre_ffn", "layer_ln_1",
                             "layer_ln_2"})

    # -- lifecycle ------------------------------------------------------------------------------
    def validate(self, config: BnConfig, points: ModelPoints) -> None:
        interface = points.interface
        if config.mh_adapter and not interface.attn_o_proj:
            raise AdapterError("mh_adapter=True needs attn_o_proj in the model's interface.")
        if config.output_adapter and not interface.layer_output_proj:
            raise AdapterError("output_adapter=True needs layer_output_proj in the model's interface.")
        check_layer_indices(config, [lp.index for lp in points.layers], "This bottleneck config")
        leave_out = set(config.leave_out)
        placed = 0
        for lp in points.layers:
            if lp.index in leave_out:
                continue
            for kind, proj, pre, _norm, pre_field in locations(lp, config):
                placed += 1
                if pre is None and config.needs_residual_input():
                    raise AdapterError(
                        f"This bottleneck config (is_parallel={config.is_parallel}, original_ln_before="
                        f"{config.original_ln_before}, original_ln_after={config.original_ln_after}, "
                        f"residual_before_ln={config.residual_before_ln!r}) reads the residual stream at the "
                        f"'{kind}' location of layer {lp.index}, but the interface names no {pre_field}."
                    )
                if kind == "cross" and not config.original_ln_after and (lp.ln_1 is not None or lp.ln_2 is not None):
                    raise AdapterError(
                        "original_ln_after=False at cross-attention needs the norm after the cross-attention "
                        "residual add, which the interface cannot name for this post-norm model; set "
                        "cross_adapter=False or original_ln_after=True."
                    )
                hidden = linear_features(proj.module)[1]
                bottleneck = max(1, int(hidden // config.reduction_for(lp.index)))
                if config.phm_layer and (hidden % config.phm_dim or bottleneck % config.phm_dim):
                    raise AdapterError(
                        f"Compacter: hidden size {hidden} and bottleneck size {bottleneck} (reduction_factor "
                        f"{config.reduction_for(lp.index)}) must both be divisible by phm_dim={config.phm_dim}."
                    )
        if placed == 0:
            raise AdapterError("This bottleneck config places no adapter: enable mh_adapter / output_adapter / "
                               "cross_adapter, or leave out fewer layers.")

    def attach(self, site: AttachSite, name: str, config: BnConfig) -> None:
        leave_out = set(config.leave_out)
        for lp in site.points.layers:
            if lp.index in leave_out:
                continue
            owner = lp.module.module
            for kind, proj, pre, norm, _ in locations(lp, config):
                hidden = linear_features(proj.module)[1]
                location = f"{lp.module.location}.bottleneck_{kind}"

                def factory(location=location, kind=kind, hidden=hidden, proj=proj, pre=pre, norm=norm,
                            layer_point=lp.module):
                    return BottleneckLayer(location, kind, CHILD_ATTR[kind], hidden, layer_point, proj, pre, norm)

                layer = site.add_child(owner, CHILD_ATTR[kind], BottleneckLayer, factory)
                layer.add_adapter(name, config, site, owner)

    # -- fusion ---------------------------------------------------------------------------------
    def add_fusion(self, state: Any, fusion_name: str, adapter_names: list[str], config: Any) -> None:
        """Create a :class:`~.layer.FusionLayer` at every location hosting one of ``adapter_names``."""
        cfg = load_fusion_config(config)
        for n in adapter_names:
            for single in state.record(n).config.configs:
                if isinstance(single, BnConfig) and not single.original_ln_after:
                    raise AdapterError(f"AdapterFusion over '{n}' is not supported: it has original_ln_after=False.")
        made = 0
        for layer in state.layers():
            if isinstance(layer, BottleneckLayer) and any(n in layer.adapters for n in adapter_names):
                layer.add_fusion(fusion_name, cfg, adapter_names)
                made += 1
        if not made:
            raise AdapterError(f"AdapterFusion '{fusion_name}': none of {adapter_names} is a bottleneck adapter.")

    def delete_fusion(self, state: Any, fusion_name: str) -> None:
        """Remove the fusion layers of ``fusion_name`` everywhere."""
        for layer in state.layers():
            if isinstance(layer, BottleneckLayer):
                layer.delete_fusion(fusion_name)

    def fusion_modules(self, state: Any, fusion_name: str) -> dict[str, nn.Module]:
        """``{location: FusionLayer}`` of ``fusion_name``."""
        return {layer.location: layer.fusions[fusion_name] for layer in state.layers()
                if isinstance(layer, BottleneckLayer) and fusion_name in layer.fusions}
