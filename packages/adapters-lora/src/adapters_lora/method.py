"""The LoRA-family method: where its layers go on a model, and what it supports."""

from __future__ import annotations

from typing import Any, ClassVar

from adapters.plugin import (
    LINEAR_HOOK_POINTS,
    AdapterError,
    AdapterMethod,
    AdapterState,
    AttachSite,
    LinearTarget,
    ModelPoints,
    check_linear_placement,
    linear_targets,
    names_match,
    target_config,
)

from .config import DoRAConfig, IA3Config, LoRAConfig, MTLLoRAConfig
from .embedding import LoRAEmbedding, check_embedding_config
from .formats import read_adapterhub_lora, read_peft, save_peft
from .layer import LoRALinear

__all__ = ["LoRAMethod"]


class LoRAMethod(AdapterMethod):
    """LoRA, DoRA, IA3 (and MTL-LoRA) on attention projections and FFN projections."""

    name: ClassVar[str] = "lora"
    config_classes = (LoRAConfig, DoRAConfig, IA3Config, MTLLoRAConfig)
    presets = {"lora": LoRAConfig, "dora": DoRAConfig, "ia3": IA3Config, "mtl_lora": MTLLoRAConfig}
    supported_blocks = frozenset({"Stack", "BatchSplit", "Average", "MultiTask", "Parallel"})
    hook_points = LINEAR_HOOK_POINTS
    can_merge = True
    formats = {"peft": (read_peft, save_peft), "adapterhub": (read_adapterhub_lora, None)}

    def average_config(self, config: LoRAConfig, combine_strategy: str, **kwargs: Any) -> LoRAConfig:
        """``lora_delta_w_svd`` takes ``svd_rank`` (the new adapter's rank, default: the sources'); the
        other strategies take no arguments."""
        if combine_strategy == "lora_delta_w_svd" and set(kwargs) <= {"svd_rank"}:
            rank = kwargs.get("svd_rank")
            if rank is None:
                return config
            if not isinstance(rank, int) or rank < 1:
                raise AdapterError(f"average_adapter: svd_rank must be a positive int, got {rank!r}.")
            return config.replace(r=rank)
        return super().average_config(config, combine_strategy, **kwargs)

    def targets(self, points: ModelPoints, config: LoRAConfig) -> list[LinearTarget]:
        """Every projection (part) and embedding table the config adapts, in a fixed order; changes nothing."""
        return linear_targets(points, config, "LoRA", LoRALinear, LoRAEmbedding)

    @staticmethod
    def scales_input(config: LoRAConfig, target: LinearTarget) -> bool:
        """Whether IA3 scales this target's input (``feedforward_modules`` names it)."""
        return config.feedforward_modules is not None and names_match(config.feedforward_modules, target.names)

    def validate(self, config: LoRAConfig, points: ModelPoints) -> None:
        check_linear_placement(config, points, "LoRA")
        inputs = 0
        for target in self.targets(points, config):  # every target must be a linear projection or an embedding
            if target.kind == "embedding":
                check_embedding_config(config, target.point.path)
            target_config(config, target)  # rank / alpha patterns give valid configs
            if self.scales_input(config, target):
                inputs += 1
                if target.which is not None or target.kind != "linear":
                    raise AdapterError(f"feedforward_modules names '{target.point.path}', which this config adapts "
                                       "in parts (a fused q|k|v) or as an embedding; IA3 scales whole projections' "
                                       "inputs only.")
        if config.feedforward_modules is not None and not inputs:
            raise AdapterError(f"feedforward_modules={config.feedforward_modules!r} names none of the adapted "
                               "modules.")

    def share_parameters(self, state: AdapterState, adapter_names: list[str], name: str,
                         reference: str | None) -> None:
        """Tie ``A`` and ``B`` (MTL-LoRA: ``A`` and every ``B_i``) of ``adapter_names`` at every layer.

        After the call the adapters hold the *same* Parameter objects, with the values of
        ``reference`` (default: the first adapter). Task-specific tensors (MTL-LoRA ``Λ_t`` and
        ``w_t``, DoRA magnitudes, gates) stay per adapter. All adapters must sit on the same layers.
        """
        if len(adapter_names) < 2:
            raise AdapterError("share_parameters needs at least two adapters.")
        reference = reference or adapter_names[0]
        if reference not in adapter_names:
            raise AdapterError(f"reference_adapter_name '{reference}' is not one of {adapter_names}.")
        layers = {id(layer): layer for n in adapter_names for layer in state.layers(n)}
        for layer in layers.values():
            missing = [n for n in adapter_names if n not in layer.adapters]
            if missing:
                raise AdapterError(f"share_parameters: adapters {missing} are not at {layer.location}; adapters "
                                   "must have the same placement (same config) to share parameters.")
        # validate everything before changing anything, so a failure leaves the model as it was
        for layer in layers.values():
            for n in adapter_names:
                ref_units, units = layer.units(reference), layer.units(n)
                if set(ref_units) != set(units) or any(
                    type(ref_units[k]) is not type(u)
                    or any(getattr(ref_units[k], a).shape != getattr(u, a).shape for a in u.shareable)
                    for k, u in units.items()
                ):
                    raise AdapterError(f"share_parameters: '{n}' and '{reference}' differ in structure at "
                                       f"{layer.location}.")
        for layer in layers.values():
            layer.share_parameters(list(adapter_names), reference)

    def unshare_parameters(self, state: AdapterState, adapter_names: list[str]) -> None:
        """Give every adapter in ``adapter_names`` its own copy of its (possibly shared) ``A`` and ``B``."""
        layers = {id(layer): layer for n in adapter_names for layer in state.layers(n)}
        for layer in layers.values():
            layer.unshare_parameters([n for n in adapter_names if n in layer.adapters])

    def attach(self, site: AttachSite, name: str, config: LoRAConfig) -> None:
        for target in self.targets(site.points, config):
            point, fused, own = target.point, target.fused, target_config(config, target)
            if target.kind == "embedding":
                layer = site.replace(point, LoRAEmbedding,
                                     lambda original, p=point: LoRAEmbedding(original, p.location))
                layer.add_embedding_adapter(name, own, site)
            else:
                layer = site.replace(point, LoRALinear,
                                     lambda original, p=point, f=fused: LoRALinear(original, p.location, f))
                layer.add_fused_or_plain(name, own, site, target.rows, target.which,
                                         self.scales_input(config, target))
            for alias in target.aliases:
                site.alias(alias, layer)
