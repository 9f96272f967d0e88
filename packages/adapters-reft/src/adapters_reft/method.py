"""The ReFT method: which Transformer layers get an intervention, and what it supports."""

from __future__ import annotations

from functools import partial
from typing import ClassVar

import torch

from adapters.plugin import AdapterError, AdapterMethod, AttachSite, ModelPoints

from .config import DiReftConfig, LoReftConfig, NoReftConfig, ReftConfig
from .formats import read_adapterhub_reft
from .layer import ReftLayer, edit_layer_output

__all__ = ["ReftMethod", "ATTR"]

#: Attribute of a Transformer layer that holds its :class:`ReftLayer`.
ATTR = "reft"


def _chosen_layers(config: ReftConfig, points: ModelPoints) -> list[int]:
    n = points.num_layers
    if config.layers == "all":
        return list(range(n))
    bad = [i for i in config.layers if not -n <= i < n]
    if bad:
        raise AdapterError(f"ReFT layers {bad} are out of range: this model has {n} layers (0..{n - 1}).")
    return sorted({i % n for i in config.layers})


class ReftMethod(AdapterMethod):
    """Representation fine-tuning on the hidden states output by Transformer layers."""

    name: ClassVar[str] = "reft"
    config_classes = (ReftConfig, LoReftConfig, NoReftConfig, DiReftConfig)
    presets = {"reft": ReftConfig, "loreft": LoReftConfig, "noreft": NoReftConfig, "direft": DiReftConfig}
    supported_blocks = frozenset({"Stack", "BatchSplit", "MultiTask"})
    hook_points = frozenset({"model_layers"})
    can_merge = False
    needs_context = True
    formats = {"adapterhub": (read_adapterhub_reft, None)}

    def validate(self, config: ReftConfig, points: ModelPoints) -> None:
        if not points.layers:
            raise AdapterError("ReFT needs Transformer layers, but the interface resolves none (model_layers).")
        _chosen_layers(config, points)
        hidden = points.hidden_size
        if hidden is None:
            raise AdapterError("ReFT cannot tell this model's hidden size (config.hidden_size / d_model / n_embd).")
        if config.r > hidden:
            raise AdapterError(f"ReFT rank r={config.r} exceeds the hidden size {hidden}.")

    def attach(self, site: AttachSite, name: str, config: ReftConfig) -> None:
        hidden = site.points.hidden_size
        for index in _chosen_layers(config, site.points):
            lp = site.points.layers[index]
            owner = lp.module.module
            ref = next((p for p in owner.parameters() if p.is_floating_point()), None)
            dtype = ref.dtype if ref is not None else torch.get_default_dtype()
            device = ref.device if ref is not None else None
            layer = site.add_child(
                owner, ATTR, ReftLayer,
                lambda loc=f"{lp.module.location}.{ATTR}", dt=dtype, dev=device: ReftLayer(loc, hidden, dt, dev),
            )
            if not layer.hooked:
                # prepend: inside core's layer frame, so a recomputing checkpoint still has the call's context
                site.register_hook(layer, owner.register_forward_hook(partial(edit_layer_output, ATTR), prepend=True))
                layer.hooked = True
            layer.base_dtype, layer.device = dtype, device  # the model may have moved since the layer was made
            layer.add_adapter(name, config, site)
