"""LoRA-family checkpoints of AdapterHub adapters 1.x (``architecture: "lora"``: LoRA and IA3), read into a
native adapter placed through the model's interface (:func:`lora_from_modules`). PEFT's format lives in
:mod:`.peft_format` (re-exported here: :func:`read_peft`, :func:`save_peft`).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from adapters.plugin import (
    CheckpointError,
    LoadedCheckpoint,
    Target,
    adapterhub_directory,
    check_model_type,
    match_module,
    module_targets,
    read_tensors,
    rows_of,
)

from .config import LoRAConfig
from .peft_format import PEFT_WEIGHTS, PEFT_WEIGHTS_PT, read_peft, save_peft

__all__ = ["PEFT_WEIGHTS", "PEFT_WEIGHTS_PT", "read_peft", "save_peft", "read_adapterhub_lora", "lora_from_modules"]


def lora_from_modules(model: nn.Module, modules: dict[str, dict[str, torch.Tensor]], weights_path: str, name: str,
                      *, alpha: float, dropout: float = 0.0, use_dora: bool = False, use_rslora: bool = False,
                      composition_mode: str = "add", what: str = "LoRA") -> LoadedCheckpoint:
    """Native LoRA checkpoint from per-module tensors (``lora_A``, ``lora_B``, ``magnitude``) keyed by module path."""
    targets = module_targets(model)
    base_path = model._adapters_state.points.base_path
    num_layers = model._adapters_state.points.num_layers
    matched: dict[str, Target] = {}
    unknown = []
    for path in modules:
        target = match_module(targets, path, base_path)
        if target is None:
            unknown.append(path)
        else:
            matched[path] = target
    if unknown:
        raise CheckpointError(
            f"{weights_path}: {what} on modules with no hook point on this model ({type(model).__name__}): "
            f"{unknown[:4]}{' ...' if len(unknown) > 4 else ''}. Supported are the attention q/k/v/o and FFN "
            "up/down projections named by the model's interface."
        )
    per_layer: dict[int, set[str]] = {}
    for target in matched.values():
        kinds = {"q", "k", "v"} if target.kind == "qkv" else {target.kind}
        if target.kind == "qkv" and (use_dora or composition_mode != "add"):
            raise CheckpointError(f"{weights_path}: DoRA/IA3 on a fused q/k/v projection ({target.path}) "
                                  "is not supported.")
        per_layer.setdefault(target.layer, set()).update(kinds)
    kind_sets = {frozenset(k) for k in per_layer.values()}
    if len(kind_sets) != 1:
        detail = {i: sorted(k) for i, k in sorted(per_layer.items())}
        raise CheckpointError(f"{weights_path}: the {what} adapts different projections in different layers "
                              f"({detail}); a native LoRA adapts the same ones in every layer it covers.")
    kinds = next(iter(kind_sets))
    if composition_mode == "add":
        ranks = {p: m["lora_A"].shape[0] for p, m in modules.items()}
        if len(set(ranks.values())) != 1:
            raise CheckpointError(f"{weights_path}: modules have different ranks ({sorted(set(ranks.values()))}); "
                                  "a per-module rank is not supported.")
        r = next(iter(ranks.values()))
    else:
        r = 1
    try:
        config = LoRAConfig(
            selfattn_lora=bool(kinds & {"q", "k", "v", "o"}),
            attn_matrices=[m for m in ("q", "k", "v", "o") if m in kinds] or ["q", "v"],
            intermediate_lora="intermediate" in kinds,
            output_lora="output" in kinds,
            leave_out=[i for i in range(num_layers) if i not in per_layer],
            r=int(r), alpha=alpha, dropout=dropout,
            use_dora=use_dora, use_rslora=use_rslora, composition_mode=composition_mode,
            init_weights="lora" if composition_mode == "add" else "ia3",
        )
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{weights_path}: the adapter config cannot be used: {exc}") from None
    tensors: dict[str, torch.Tensor] = {}
    for path, parts in modules.items():
        target = matched[path]
        if target.kind == "qkv":
            width = parts["lora_B"].shape[0]
            for which in ("q", "k", "v"):
                rows = rows_of(target.fused, which, width)
                if int(rows.max()) >= width:
                    raise CheckpointError(f"{weights_path}: lora_B of '{path}' has {width} rows; this model's fused "
                                          "projection is wider.")
                tensors[f"{target.location}.parts.{which}.lora_A"] = parts["lora_A"]
                tensors[f"{target.location}.parts.{which}.lora_B"] = parts["lora_B"][rows]
        else:
            for key, tensor in parts.items():
                tensors[f"{target.location}.{key}"] = tensor
    meta = {"format": what, "name": name, "model_type": None}
    return LoadedCheckpoint(name=name, config=config, tensors=tensors, meta=meta, source=weights_path)


# ------------------------------------------------------------------------------------------- AdapterHub 1.x
#: LoRA config fields of adapters 1.x; anything else set to a non-default value is refused.
_LORA_FIELDS = {"alpha", "architecture", "attn_matrices", "composition_mode", "dropout", "dtype", "init_weights",
                "init_weights_seed", "intermediate_lora", "leave_out", "output_lora", "r", "selfattn_lora",
                "use_dora", "use_gating", "vera_b", "vera_d"}
_LORA_KEY = re.compile(r"^(?P<path>.+)\.loras\.(?P<name>[^.]+)\.(?P<param>lora_A|lora_B)$")


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
        check_model_type(cfg_path, saved_type, model)
        loaded = lora_from_modules(model, modules, weights_path, name, alpha=alpha,
                                   dropout=float(cfg.get("dropout", 0.0) or 0.0),
                                   composition_mode="scale" if scale else "add", what="AdapterHub LoRA")
        loaded.meta.update({"model_type": saved_type, "hidden_size": meta.get("hidden_size"),
                            "format": "adapterhub"})
        return loaded

    return LoadedCheckpoint(name=name, config=None, tensors={}, meta={"format": "adapterhub", **meta},
                            source=directory, resolve=resolve)


def read_adapterhub_lora(directory: str) -> LoadedCheckpoint | None:
    """An AdapterHub 1.x LoRA / IA3 checkpoint (``architecture: "lora"``); ``None`` for anything else."""
    found = adapterhub_directory(directory, ("lora",))
    if found is None:
        return None
    cfg_path, meta, cfg, weights_path, name = found
    return _read_lora(cfg_path, meta, cfg, weights_path, name, directory)
