"""PEFT LoRA / DoRA checkpoints: ``adapter_config.json`` (``peft_type: "LORA"``) + ``adapter_model.safetensors``.

Reading needs the target model (PEFT names weights by module path), so :func:`read_peft` returns a
:class:`~adapters.checkpoint.LoadedCheckpoint` whose ``resolve(model)`` maps each module path to one of
our hook points and builds the native :class:`LoRAConfig` and tensors. The mapping comes from the weight
keys themselves (``target_modules`` patterns are not re-interpreted), so every PEFT spelling of the
targets (lists, regexes, ``"all-linear"``) reads the same way; modules we have no hook point for, and
options whose effect we do not reproduce, raise a :class:`~adapters.errors.CheckpointError` naming them.

A PEFT LoRA on a fused q/k/v projection (GPT-2 ``c_attn``) becomes three parts sharing ``A``; on export
parts with different ``A`` are stacked into one rank-``k·r`` LoRA with a block-diagonal ``B`` and the
matching ``rank_pattern`` / ``alpha_pattern``, which is exact.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import torch
from torch import nn

from adapters.plugin import (
    CONFIG_FILE,
    AdapterError,
    CheckpointError,
    LoadedCheckpoint,
    Target,
    adapterhub_directory,
    check_model_type,
    default_name,
    embedding_tensors,
    head_tensors,
    match_module,
    module_targets,
    read_config,
    read_tensors,
    rows_of,
)

from .config import LoRAConfig

__all__ = ["PEFT_WEIGHTS", "PEFT_WEIGHTS_PT", "read_peft", "save_peft", "read_adapterhub_lora", "lora_from_modules"]

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_WEIGHTS_PT = "adapter_model.bin"
PREFIX = "base_model.model."
SUFFIXES = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_magnitude_vector": "magnitude"}

#: Config keys read or safely ignored (initialisation-only options, bookkeeping).
_IGNORED = {
    "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "corda_config", "ensure_weight_tying",
    "eva_config", "exclude_modules", "fan_in_fan_out", "inference_mode", "init_lora_weights", "layers_pattern",
    "layers_to_transform", "loftq_config", "lora_alpha", "lora_dropout", "lora_ga_config", "megatron_core",
    "peft_type", "peft_version", "qalora_group_size", "r", "rank_pattern", "revision", "target_modules",
    "task_type", "use_dora", "use_rslora", "modules_to_save",
}
#: Options that change the forward pass in ways we do not reproduce: they must be off.
_MUST_BE_OFF = {
    "alora_invocation_tokens", "arrow_config", "kasa_config", "layer_replication", "lora_bias", "megatron_config",
    "monteclora_config", "target_parameters", "trainable_token_indices", "use_bdlora",
    "use_qalora", "velora_config",
}



def _check_options(path: str, cfg: dict[str, Any]) -> None:
    problems = []
    for key, kinds in (("rank_pattern", dict), ("alpha_pattern", dict), ("target_modules", (list, str, type(None))),
                       ("use_dora", bool), ("use_rslora", bool)):
        if key in cfg and not isinstance(cfg[key], kinds):
            problems.append(f"{key}={cfg[key]!r} (wrong type)")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias={cfg['bias']!r} (trained base-model biases)")
    for key, value in cfg.items():
        if key in _IGNORED:
            continue
        if key in _MUST_BE_OFF:
            if value not in (None, False, {}, [], ""):
                problems.append(f"{key}={value!r}")
        elif value not in (None, False, {}, [], ""):
            problems.append(f"{key}={value!r} (an option this reader does not know; saved by a newer PEFT?)")
    if problems:
        raise CheckpointError(f"{path}: PEFT options that cannot be loaded as a native LoRA: {'; '.join(problems)}.")


def read_peft(directory: str) -> LoadedCheckpoint | None:
    """Recognise a PEFT LoRA checkpoint directory; ``None`` if it is not a PEFT checkpoint."""
    found = read_config(directory, "peft")
    if found is None:
        return None
    cfg_path, cfg = found
    if cfg["peft_type"] != "LORA":
        raise CheckpointError(f"{cfg_path}: PEFT type {cfg['peft_type']!r} is not supported; only 'LORA' "
                              "(including DoRA) checkpoints can be read.")
    _check_options(cfg_path, cfg)
    for key, kind in (("r", int), ("lora_alpha", (int, float)), ("lora_dropout", (int, float))):
        if key in cfg and (not isinstance(cfg[key], kind) or isinstance(cfg[key], bool)):
            raise CheckpointError(f"{cfg_path}: '{key}' must be a number, got {cfg[key]!r}.")
    weights = [os.path.join(directory, f) for f in (PEFT_WEIGHTS, PEFT_WEIGHTS_PT)]
    existing = [w for w in weights if os.path.exists(w)]
    if not existing:
        raise CheckpointError(f"{directory} has a PEFT {CONFIG_FILE} but no {PEFT_WEIGHTS}.")
    weights_path = existing[0]
    tensors = read_tensors(weights_path)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    saved_whole: dict[str, torch.Tensor] = {}  # modules_to_save: trained copies of whole modules (task heads)
    to_save = cfg.get("modules_to_save") or []
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise CheckpointError(f"{weights_path}: unexpected key '{key}' (PEFT keys start with '{PREFIX}').")
        rest = key[len(PREFIX):]
        for suffix, ours in SUFFIXES.items():
            if rest.endswith("." + suffix):
                modules.setdefault(rest[: -len(suffix) - 1], {})[ours] = tensor
                break
        else:
            owner = rest.rsplit(".", 1)[0]
            if any(owner == m or owner.endswith("." + m) for m in to_save):
                saved_whole[rest] = tensor
                continue
            raise CheckpointError(f"{weights_path}: key '{key}' is not a LoRA weight (lora_A, lora_B, "
                                  "lora_magnitude_vector) nor in modules_to_save; embedding LoRA is not supported.")
    if not modules:
        raise CheckpointError(f"{weights_path} holds no LoRA weights.")
    use_dora = bool(cfg.get("use_dora", False))
    for path, parts in modules.items():
        want = {"lora_A", "lora_B"} | ({"magnitude"} if use_dora else set())
        if set(parts) != want:
            raise CheckpointError(f"{weights_path}: module '{path}' has {sorted(parts)}, expected {sorted(want)}.")
        a, b = parts["lora_A"], parts["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise CheckpointError(f"{weights_path}: module '{path}' has lora_A {list(a.shape)} and lora_B "
                                  f"{list(b.shape)}, which do not form a rank-r pair.")
        if use_dora and tuple(parts["magnitude"].shape) != (b.shape[0],):
            raise CheckpointError(f"{weights_path}: module '{path}' has a magnitude of shape "
                                  f"{list(parts['magnitude'].shape)}; lora_B has {b.shape[0]} rows.")
    name = default_name(directory)
    meta = {"format": "peft", "name": name, "peft_config": cfg}

    def resolve(model: nn.Module) -> LoadedCheckpoint:
        loaded = _resolve(model, cfg, modules, weights_path, name, directory)
        loaded.head = dict(saved_whole) or None  # loaded by name, like a native head.safetensors
        return loaded

    return LoadedCheckpoint(name=name, config=None, tensors={}, meta=meta, source=directory, resolve=resolve)


def _resolve(model: nn.Module, cfg: dict[str, Any], modules: dict[str, dict[str, torch.Tensor]],
             weights_path: str, name: str, directory: str) -> LoadedCheckpoint:
    alpha = cfg.get("lora_alpha", 8)
    alpha_pattern = cfg.get("alpha_pattern") or {}
    rslora = bool(cfg.get("use_rslora", False))
    # PEFT matches a pattern key against the end of a module's name (or as a regular expression). What
    # counts is each module's scaling (alpha / r, or alpha / sqrt(r) with rsLoRA): a native adapter has
    # one, and modules of a smaller rank are padded with zero rows / columns (their delta is unchanged)
    alphas = {path: next((v for k, v in alpha_pattern.items() if _pattern_matches(k, path)), alpha) for path in modules}
    ranks = {path: parts["lora_A"].shape[0] for path, parts in modules.items()}
    scalings = {path: alphas[path] / (math.sqrt(ranks[path]) if rslora else ranks[path]) for path in modules}
    if max(scalings.values()) - min(scalings.values()) > 1e-9 * max(abs(v) for v in scalings.values()):
        raise CheckpointError(f"{weights_path}: modules have different LoRA scalings (lora_alpha / r, with "
                              f"alpha_pattern / rank_pattern: {sorted(set(scalings.values()))}); a native LoRA "
                              "adapter has one.")
    rank = max(ranks.values())
    scaling = next(iter(scalings.values()))
    alpha = scaling * (math.sqrt(rank) if rslora else rank)
    if float(alpha).is_integer():
        alpha = int(alpha)
    modules = {path: _pad_rank(parts, rank) for path, parts in modules.items()}
    return lora_from_modules(model, modules, weights_path, name, alpha=alpha,
                             dropout=float(cfg.get("lora_dropout", 0.0) or 0.0),
                             use_dora=bool(cfg.get("use_dora", False)),
                             use_rslora=bool(cfg.get("use_rslora", False)), what="PEFT LoRA")


def _pad_rank(parts: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """``lora_A`` / ``lora_B`` padded with zeros to ``rank`` (``B A`` unchanged)."""
    a, b = parts["lora_A"], parts["lora_B"]
    extra = rank - a.shape[0]
    if extra <= 0:
        return parts
    return {**parts, "lora_A": torch.cat([a, a.new_zeros(extra, a.shape[1])], dim=0),
            "lora_B": torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1)}


def _pattern_matches(pattern: str, path: str) -> bool:
    if path == pattern or path.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(rf"(.*\.)?{pattern}", path) is not None
    except re.error:
        return False


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


def save_peft(model: nn.Module, directory: str, name: str) -> None:
    """Write LoRA / DoRA adapter ``name`` in PEFT's format (loadable with ``PeftModel.from_pretrained``)."""
    from safetensors.torch import save_file

    state = model._adapters_state
    record = state.record(name)
    config = record.config
    problems = []
    if not isinstance(config, LoRAConfig) or hasattr(config, "n_up_projection"):
        problems.append(f"a {type(config).__name__} adapter")
    else:
        if config.composition_mode != "add":
            problems.append("composition_mode='scale' (IA3)")
        if config.use_gating:
            problems.append("use_gating=True")
    if state.shared_modules(name):
        problems.append("model-level shared modules")
    if problems:
        raise AdapterError(f"Adapter '{name}' cannot be written in PEFT's LoRA format: {', '.join(problems)}.")
    by_location = {t.location: t for t in module_targets(model).values()}
    out: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    fan_in_fan_out = False
    for layer in state.layers(name):
        target = by_location.get(layer.location)
        if target is None:
            raise AdapterError(f"Adapter '{name}' has weights at '{layer.location}', which is no projection "
                               "hook point; it cannot be written in PEFT's format.")
        fan_in_fan_out |= bool(getattr(layer, "is_conv1d", False))
        params = {k: v.detach().clone().contiguous() for k, v in layer.adapter_state_dict(name).items()}
        key = PREFIX + target.path
        if target.kind != "qkv":
            out[f"{key}.lora_A.weight"] = params["lora_A"]
            out[f"{key}.lora_B.weight"] = params["lora_B"]
            if "magnitude" in params:
                out[f"{key}.lora_magnitude_vector"] = params["magnitude"]
            continue
        if config.use_dora:
            raise AdapterError("DoRA on a fused q/k/v projection cannot be written in PEFT's format.")
        parts = [w for w in ("q", "k", "v") if f"parts.{w}.lora_A" in params]
        width = layer.out_features
        a_list = [params[f"parts.{w}.lora_A"] for w in parts]
        shared_a = len(parts) == 3 and all(torch.equal(a_list[0], a) for a in a_list[1:])
        k = 1 if shared_a else len(parts)
        r = config.r
        a_full = a_list[0] if shared_a else torch.cat(a_list, dim=0)
        b_full = torch.zeros(width, k * r, dtype=a_full.dtype)
        for i, w in enumerate(parts):
            cols = slice(0, r) if shared_a else slice(i * r, (i + 1) * r)
            b_full[rows_of(target.fused, w, width), cols] = params[f"parts.{w}.lora_B"]
        out[f"{key}.lora_A.weight"] = a_full.contiguous()
        out[f"{key}.lora_B.weight"] = b_full
        if k != 1:
            rank_pattern[target.path] = k * r
            alpha_pattern[target.path] = config.alpha * (math.sqrt(k) if config.use_rslora else k)
    # the task head and trained input embeddings travel as PEFT's modules_to_save (whole-module copies)
    whole = dict(head_tensors(model))
    embeddings = embedding_tensors(model)
    if embeddings:
        whole.update({f"{state.points.embeddings.path}.{k}": v for k, v in embeddings.items()})
    for key, tensor in whole.items():
        out[PREFIX + key] = tensor
    original = getattr(type(model), "_adapters_original_class", type(model))
    mconfig = getattr(model, "config", None)
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(mconfig, "_name_or_path", None) or None,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted({by_location[layer.location].path for layer in state.layers(name)}),
        "bias": "none",
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "fan_in_fan_out": fan_in_fan_out,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": sorted({key.rsplit(".", 1)[0] for key in whole}) or None,
        "layers_to_transform": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "auto_mapping": {"base_model_class": original.__name__, "parent_library": original.__module__},
    }
    os.makedirs(directory, exist_ok=True)
    save_file(out, os.path.join(directory, PEFT_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as fh:
        json.dump(peft_config, fh, indent=2, sort_keys=True)


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
