"""AdapterHub ``adapters`` 1.x checkpoints: ``adapter_config.json`` + ``pytorch_adapter.bin`` / ``adapter.safetensors``.

The config file holds ``config`` (with ``architecture``: ``"lora"``, ``"union"``, ``"reft"``, or none for
bottleneck adapters), ``name``, ``model_type``, ``model_class``, ``model_name`` and ``version``
(``"adapters.1.x"``). Weight keys name the module path in the model they were saved from, e.g.
``bert.encoder.layer.0.attention.self.query.loras.<name>.lora_A``; this reader maps each module path to
one of our hook points (AdapterHub attaches by module, not by role: on Llama its ``intermediate_lora``
sits on ``mlp.down_proj``, which is our FFN output projection, and this reader follows the module).

Supported: LoRA (``composition_mode="add"``) and IA3 (``"scale"``; AdapterHub multiplies by ``alpha``,
folded into the stored vector); bottleneck adapters (``seq_bn``, ``double_seq_bn``, ``par_bn`` and other
``BnConfig`` settings without invertible adapters; ``adapter_down.0`` / ``adapter_up`` become ``down`` /
``up``); ReFT (``units.0`` / ``units.1`` become the prefix / suffix interventions; the orthogonal
projection is rebuilt from its stored parametrization with torch's own ``orthogonal`` and stored as the
orthonormal matrix itself). The ``.bin`` file is read with ``torch.load(weights_only=True)`` only.
Other architectures, gating, DoRA and VeRA raise :class:`~adapters.errors.CheckpointError` saying so.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from torch import nn

from ..checkpoint_io import CONFIG_FILE, LoadedCheckpoint, detect_format
from ..errors import CheckpointError
from ._common import method_config_class, read_json, read_tensors

__all__ = ["AH_WEIGHTS", "AH_WEIGHTS_ST", "read_adapterhub"]

AH_WEIGHTS = "pytorch_adapter.bin"
AH_WEIGHTS_ST = "adapter.safetensors"

#: LoRA config fields of adapters 1.x; anything else set to a non-default value is refused.
_LORA_FIELDS = {"alpha", "architecture", "attn_matrices", "composition_mode", "dropout", "dtype", "init_weights",
                "init_weights_seed", "intermediate_lora", "leave_out", "output_lora", "r", "selfattn_lora",
                "use_dora", "use_gating", "vera_b", "vera_d"}
_LORA_KEY = re.compile(r"^(?P<path>.+)\.loras\.(?P<name>[^.]+)\.(?P<param>lora_A|lora_B)$")


def _is_adapterhub(meta: dict[str, Any]) -> bool:
    return detect_format(meta) == "adapterhub"


def read_adapterhub(directory: str) -> LoadedCheckpoint | None:
    """Recognise an AdapterHub 1.x checkpoint directory; ``None`` if it is not one."""
    cfg_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(cfg_path):
        return None
    meta = read_json(cfg_path)
    if not _is_adapterhub(meta):
        return None
    cfg = meta["config"]
    arch = cfg.get("architecture")
    weights = [os.path.join(directory, f) for f in (AH_WEIGHTS_ST, AH_WEIGHTS)]
    existing = [w for w in weights if os.path.exists(w)]
    if not existing:
        raise CheckpointError(f"{directory} has an AdapterHub {CONFIG_FILE} but no {AH_WEIGHTS} or {AH_WEIGHTS_ST}.")
    name = str(meta.get("name") or os.path.basename(os.path.normpath(directory)))
    if arch == "lora":
        return _read_lora(cfg_path, meta, cfg, existing[0], name, directory)
    if arch in (None, "bottleneck"):
        return _read_bottleneck(cfg_path, meta, cfg, existing[0], name, directory)
    if arch == "reft":
        return _read_reft(cfg_path, meta, cfg, existing[0], name, directory)
    raise CheckpointError(f"{cfg_path}: AdapterHub architecture {arch!r} is not supported by this reader "
                          "(supported: 'lora' for LoRA and IA3, bottleneck adapters, 'reft').")


def _check_lora_config(cfg_path: str, cfg: dict[str, Any]) -> None:
    problems = []
    for key, value in cfg.items():
        if key not in _LORA_FIELDS and value not in (None, False, [], {}, ""):
            problems.append(f"{key}={value!r} (unknown field; saved by a newer adapters version?)")
    for key in ("use_gating", "use_dora"):
        if cfg.get(key):
            problems.append(f"{key}=True")
    if cfg.get("vera_b") is not None or cfg.get("vera_d") is not None:
        problems.append("VeRA (vera_b / vera_d)")
    if cfg.get("composition_mode", "add") not in ("add", "scale"):
        problems.append(f"composition_mode={cfg.get('composition_mode')!r}")
    for key in ("r", "alpha"):
        if key in cfg and (not isinstance(cfg[key], (int, float)) or isinstance(cfg[key], bool)):
            problems.append(f"{key}={cfg[key]!r} (not a number)")
    if problems:
        raise CheckpointError(f"{cfg_path}: AdapterHub LoRA options that cannot be loaded: {'; '.join(problems)}.")


def _read_lora(cfg_path: str, meta: dict[str, Any], cfg: dict[str, Any], weights_path: str, name: str,
               directory: str) -> LoadedCheckpoint:
    _check_lora_config(cfg_path, cfg)
    tensors = read_tensors(weights_path)
    scale = cfg.get("composition_mode", "add") == "scale"
    alpha = cfg.get("alpha", 8)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise CheckpointError(f"{weights_path}: unexpected key '{key}' for an AdapterHub LoRA adapter "
                                  "(expected '<module>.loras.<name>.lora_A' / 'lora_B').")
        modules.setdefault(match["path"], {})[match["param"]] = tensor
    if not modules:
        raise CheckpointError(f"{weights_path} holds no LoRA weights.")
    for path, parts in modules.items():
        want = {"lora_B"} if scale else {"lora_A", "lora_B"}
        if set(parts) != want:
            raise CheckpointError(f"{weights_path}: module '{path}' has {sorted(parts)}, expected {sorted(want)}.")
        b = parts["lora_B"]
        if scale:
            if b.dim() != 2 or b.shape[1] != 1:
                raise CheckpointError(f"{weights_path}: IA3 vector of '{path}' has shape {list(b.shape)}, "
                                      "expected [features, 1].")
            parts["lora_B"] = b.reshape(-1) * alpha  # AdapterHub computes y * (l * alpha)
        else:
            a = parts["lora_A"]
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise CheckpointError(f"{weights_path}: module '{path}' has lora_A {list(a.shape)} and lora_B "
                                      f"{list(b.shape)}, which do not form a rank-r pair.")
            if cfg.get("r") is not None and a.shape[0] != cfg["r"]:
                raise CheckpointError(f"{weights_path}: module '{path}' has rank {a.shape[0]}, the config says "
                                      f"r={cfg['r']}.")
    saved_type = meta.get("model_type")

    def resolve(model: nn.Module) -> LoadedCheckpoint:
        from .peft import lora_from_modules

        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if saved_type and model_type and saved_type != model_type:
            raise CheckpointError(f"{cfg_path}: the adapter was saved from a '{saved_type}' model; this model is "
                                  f"'{model_type}'.")
        loaded = lora_from_modules(model, modules, weights_path, name, alpha=alpha,
                                   dropout=float(cfg.get("dropout", 0.0) or 0.0),
                                   composition_mode="scale" if scale else "add", what="AdapterHub LoRA")
        loaded.meta.update({"model_type": saved_type, "hidden_size": meta.get("hidden_size"),
                            "format": "adapterhub"})
        return loaded

    return LoadedCheckpoint(name=name, config=None, tensors={}, meta={"format": "adapterhub", **meta},
                            source=directory, resolve=resolve)


# ------------------------------------------------------------------------------------------- bottleneck
#: Where AdapterHub keeps bottleneck adapters inside a Transformer layer -> our location suffix.
_BN_SITES = (("attention.output.adapters.", "attn"), ("attention_adapters.adapters.", "attn"),
             ("output.adapters.", "output"), ("output_adapters.adapters.", "output"))
_BN_PARAMS = {"adapter_down.0.": "down.", "adapter_up.": "up.", "adapter_norm_before.": "ln_before.",
              "adapter_norm_after.": "ln_after.", "gate.": "gate.", "scaling": "scaling"}
_BN_AH_ONLY = {"architecture", "inv_adapter", "inv_adapter_reduction_factor"}


def _check_model_type(cfg_path: str, saved_type: str | None, model: nn.Module) -> None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if saved_type and model_type and saved_type != model_type:
        raise CheckpointError(f"{cfg_path}: the adapter was saved from a '{saved_type}' model; this model is "
                              f"'{model_type}'.")


def _read_bottleneck(cfg_path: str, meta: dict[str, Any], cfg: dict[str, Any], weights_path: str, name: str,
                     directory: str) -> LoadedCheckpoint:
    import dataclasses

    BnConfig = method_config_class("BnConfig", "adapters-bottleneck", cfg_path)
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
        _check_model_type(cfg_path, saved_type, model)
        layer_paths = {path + ".": index for path, index in _layer_indices(model).items()}
        out: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            out[_bn_location(key, name, layer_paths, weights_path)] = tensor
        return LoadedCheckpoint(name=name, config=config, tensors=out, source=weights_path,
                                meta={"format": "adapterhub", "model_type": saved_type,
                                      "hidden_size": meta.get("hidden_size")})

    return LoadedCheckpoint(name=name, config=None, tensors={}, meta={"format": "adapterhub", **meta},
                            source=directory, resolve=resolve)


def _layer_indices(model: nn.Module) -> dict[str, int]:
    """Layer index by module path, both from the model's root and from inside its base model."""
    points = model._adapters_state.points
    base_path = points.base_path
    paths: dict[str, int] = {}
    for lp in points.layers:
        paths[lp.module.path] = lp.index
        if base_path and lp.module.path.startswith(base_path + "."):
            paths[lp.module.path[len(base_path) + 1:]] = lp.index
    return paths


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

    ReftConfig = method_config_class("ReftConfig", "adapters-reft", cfg_path)
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
        _check_model_type(cfg_path, saved_type, model)
        paths = _layer_indices(model)
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
