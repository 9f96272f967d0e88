"""AdapterHub ``adapters`` 1.x bottleneck checkpoints, read into native bottleneck adapters (``seq_bn``,
``double_seq_bn``, ``par_bn`` and other ``BnConfig`` settings without invertible adapters;
``adapter_down.0`` / ``adapter_up`` become ``down`` / ``up``). Registered for core's format dispatch
through the ``adapters.formats`` entry point ``adapterhub:bottleneck``."""

from __future__ import annotations

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

from .config import BnConfig

__all__ = ["read_adapterhub_bottleneck"]

# ------------------------------------------------------------------------------------------- bottleneck
#: Where AdapterHub keeps bottleneck adapters inside a Transformer layer -> our location suffix.
_BN_SITES = (("attention.output.adapters.", "attn"), ("attention_adapters.adapters.", "attn"),
             ("output.adapters.", "output"), ("output_adapters.adapters.", "output"))
_BN_PARAMS = {"adapter_down.0.": "down.", "adapter_up.": "up.", "adapter_norm_before.": "ln_before.",
              "adapter_norm_after.": "ln_after.", "gate.": "gate.", "scaling": "scaling"}
_BN_AH_ONLY = {"architecture", "inv_adapter", "inv_adapter_reduction_factor"}


def _read_bottleneck(cfg_path: str, meta: dict[str, Any], cfg: dict[str, Any], weights_path: str, name: str,
                     directory: str) -> LoadedCheckpoint:
    import dataclasses

    ours = {f.name for f in dataclasses.fields(BnConfig)}
    problems = [f"{k}={v!r}" for k, v in cfg.items() if k not in ours and v not in (None, False, [], {}, "")]
    if problems:
        raise CheckpointError(f"{cfg_path}: AdapterHub bottleneck options that cannot be loaded: "
                              f"{'; '.join(problems)} (invertible adapters and fields of newer versions are "
                              "not supported).")
    try:
        config = BnConfig(**{k: v for k, v in cfg.items() if k in ours and k not in _BN_AH_ONLY})
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{cfg_path}: the bottleneck config cannot be used: {exc}") from None
    tensors = read_tensors(weights_path)
    saved_type = meta.get("model_type")

    def resolve(model: nn.Module) -> LoadedCheckpoint:
        check_model_type(cfg_path, saved_type, model)
        layer_paths = {path + ".": index for path, index in layer_indices(model).items()}
        out: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            out[_bn_location(key, name, layer_paths, weights_path)] = tensor
        return LoadedCheckpoint(name=name, config=config, tensors=out, source=weights_path,
                                meta={"format": "adapterhub", "model_type": saved_type,
                                      "hidden_size": meta.get("hidden_size")})

    return LoadedCheckpoint(name=name, config=None, tensors={}, meta={"format": "adapterhub", **meta},
                            source=directory, resolve=resolve)


def _bn_location(key: str, name: str, layer_paths: dict[str, int], weights_path: str) -> str:
    for prefix, index in layer_paths.items():
        rest = None
        if key.startswith(prefix):
            rest = key[len(prefix):]
        elif "." in key and key.split(".", 1)[1].startswith(prefix):
            rest = key.split(".", 1)[1][len(prefix):]
        if rest is None:
            continue
        for site, kind in _BN_SITES:
            if rest.startswith(site + name + "."):
                param = rest[len(site) + len(name) + 1:]
                for theirs, mine in _BN_PARAMS.items():
                    if param.startswith(theirs):
                        return f"layers.{index}.bottleneck_{kind}.{mine}{param[len(theirs):]}"
    raise CheckpointError(f"{weights_path}: key '{key}' is not a bottleneck adapter weight of '{name}' at any layer "
                          "of this model.")


# ------------------------------------------------------------------------------------------------- ReFT


def read_adapterhub_bottleneck(directory: str) -> LoadedCheckpoint | None:
    """An AdapterHub 1.x bottleneck checkpoint (no ``architecture`` or ``"bottleneck"``); else ``None``."""
    found = adapterhub_directory(directory, (None, "bottleneck"))
    if found is None:
        return None
    cfg_path, meta, cfg, weights_path, name = found
    return _read_bottleneck(cfg_path, meta, cfg, weights_path, name, directory)
