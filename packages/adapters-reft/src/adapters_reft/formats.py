"""AdapterHub ``adapters`` 1.x ReFT checkpoints, read into native ReFT adapters (``units.0`` /
``units.1`` become the prefix / suffix interventions; the orthogonal projection is rebuilt from its
stored parametrization with torch's own ``orthogonal`` and stored as the orthonormal matrix itself).
Registered for core's format dispatch through the ``adapters.formats`` entry point ``adapterhub:reft``."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from adapters.plugin import (
    CheckpointError,
    LoadedCheckpoint,
    adapterhub_directory,
    check_model_type,
    layer_indices,
    read_tensors,
)

from .config import ReftConfig

__all__ = ["read_adapterhub_reft"]

_REFT_AH_ONLY = {"architecture", "output_reft", "init_weights_seed"}


def _orthogonal_weight(parts: dict[str, torch.Tensor], where: str) -> torch.Tensor:
    """The effective ``R`` of an AdapterHub ReFT unit (torch's orthogonal parametrization, evaluated once)."""
    if "weight" in parts:
        return parts["weight"]
    original, base = parts.get("parametrizations.weight.original"), parts.get("parametrizations.weight.0.base")
    if original is None or base is None or original.dim() != 2:
        raise CheckpointError(f"{where}: the ReFT projection has {sorted(parts)}; expected 'weight' or an "
                              "orthogonal parametrization ('original' and 'base').")
    linear = nn.Linear(original.shape[1], original.shape[0], bias=False, dtype=torch.float32)
    linear = nn.utils.parametrizations.orthogonal(linear)
    try:
        linear.load_state_dict({"parametrizations.weight.original": original.float(),
                                "parametrizations.weight.0.base": base.float()})
    except RuntimeError as exc:
        raise CheckpointError(f"{where}: the ReFT projection cannot be rebuilt: {exc}") from None
    with torch.no_grad():
        return linear.weight.detach().clone().to(original.dtype)


def _read_reft(cfg_path: str, meta: dict[str, Any], cfg: dict[str, Any], weights_path: str, name: str,
               directory: str) -> LoadedCheckpoint:
    import dataclasses

    ours = {f.name for f in dataclasses.fields(ReftConfig)}
    problems = [f"{k}={v!r}" for k, v in cfg.items()
                if k not in ours and k not in _REFT_AH_ONLY and v not in (None, False, [], {}, "")]
    if cfg.get("output_reft", True) is not True:
        problems.append(f"output_reft={cfg.get('output_reft')!r}")
    if problems:
        raise CheckpointError(f"{cfg_path}: AdapterHub ReFT options that cannot be loaded: {'; '.join(problems)}.")
    try:
        config = ReftConfig(**{k: v for k, v in cfg.items() if k in ours})
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{cfg_path}: the ReFT config cannot be used: {exc}") from None
    tensors = read_tensors(weights_path)
    if config.tied_weights:
        slots = {0: "shared"}
    else:
        slots = {i: s for i, s in ((0, "prefix"), (1, "suffix"))
                 if (config.prefix_positions if s == "prefix" else config.suffix_positions)}
    pattern = re.compile(rf"^(?P<layer>.+)\.reft_layer\.refts\.{re.escape(name)}\.units\.(?P<unit>\d+)\."
                         r"(?P<module>learned_source|projection)\.(?P<param>.+)$")
    units: dict[tuple[str, int], dict[str, dict[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        match = pattern.match(key)
        if match is None:
            raise CheckpointError(f"{weights_path}: key '{key}' is not a ReFT weight of adapter '{name}'.")
        units.setdefault((match["layer"], int(match["unit"])), {}).setdefault(match["module"], {})[
            match["param"]] = tensor
    saved_type = meta.get("model_type")

    def resolve(model: nn.Module) -> LoadedCheckpoint:
        check_model_type(cfg_path, saved_type, model)
        paths = layer_indices(model)
        out: dict[str, torch.Tensor] = {}
        for (layer_path, unit), modules in units.items():
            index = paths.get(layer_path)
            if index is None and "." in layer_path:
                index = paths.get(layer_path.split(".", 1)[1])
            if index is None:
                raise CheckpointError(f"{weights_path}: ReFT weights for '{layer_path}', which is no layer of "
                                      "this model.")
            if unit not in slots:
                if unit > 1:
                    raise CheckpointError(f"{weights_path}: ReFT unit {unit} at '{layer_path}' does not exist in "
                                          "this config.")
                continue  # AdapterHub keeps an unused suffix (or prefix) unit when its positions are 0
            prefix = f"layers.{index}.reft.interventions.{slots[unit]}."
            source = modules.get("learned_source", {})
            for param in ("weight", "bias"):
                if param in source:
                    out[prefix + "learned_source." + param] = source[param]
            out[prefix + "rotate_weight"] = _orthogonal_weight(modules.get("projection", {}),
                                                               f"{weights_path} ({layer_path}, unit {unit})")
        return LoadedCheckpoint(name=name, config=config, tensors=out, source=weights_path,
                                meta={"format": "adapterhub", "model_type": saved_type,
                                      "hidden_size": meta.get("hidden_size")})

    return LoadedCheckpoint(name=name, config=None, tensors={}, meta={"format": "adapterhub", **meta},
                            source=directory, resolve=resolve)


def read_adapterhub_reft(directory: str) -> LoadedCheckpoint | None:
    """An AdapterHub 1.x ReFT checkpoint (``architecture: "reft"``); else ``None``."""
    found = adapterhub_directory(directory, ("reft",))
    if found is None:
        return None
    cfg_path, meta, cfg, weights_path, name = found
    return _read_reft(cfg_path, meta, cfg, weights_path, name, directory)
