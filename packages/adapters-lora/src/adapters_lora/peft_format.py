"""PEFT checkpoints of the LoRA family, both ways: ``adapter_config.json`` (``peft_type`` ``"LORA"`` -- DoRA
included -- or ``"IA3"``) + ``adapter_model.safetensors`` (format of Hugging Face PEFT, ``PeftModel.save_pretrained``).

Every shape PEFT writes for these types reads as one native adapter placed by ``target_modules``: LoRA on
any linear module (``"all-linear"`` adapters: gate/up/down included; fused projections like GPT-2 ``c_attn``
whole), on input embeddings (``lora_embedding_A`` / ``lora_embedding_B``) and on the LM head; per-module
ranks and alphas (``rank_pattern`` / ``alpha_pattern``, or ranks that differ in the tensors); task heads
and trained embeddings as ``modules_to_save``; IA3 scaling outputs (``ia3_l`` of shape ``out × 1``) and
inputs (``feedforward_modules``: ``ia3_l`` of shape ``1 × in``).
The mapping comes from the weight keys (``target_modules`` patterns are not re-interpreted), so every
spelling of the targets reads alike; modules this model lacks and options whose effect we do not
reproduce raise a :class:`~adapters.errors.CheckpointError` naming them.

Writing names modules as the task-model class does (a ``Qwen3Model`` adapter gets ``model.layers...``,
what ``Qwen3ForCausalLM``, PEFT and vLLM expect), states ``r`` as the largest real tensor rank with
``lora_alpha`` giving the adapter's scaling (servers read only ``r`` and ``lora_alpha``), adds
``rank_pattern`` / ``alpha_pattern`` for modules of other ranks or scalings, and carries the task head
and trained embeddings as ``modules_to_save``. An interface-placed LoRA on a fused q|k|v projection (one
part per matrix) is written as one LoRA of rank ``k·r`` with a block-diagonal ``B``, which is exact.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from typing import Any

import torch
from torch import nn

from adapters.plugin import (
    CONFIG_FILE,
    PEFT_PREFIX,
    PEFT_WEIGHTS,
    PEFT_WEIGHTS_PT,
    AdapterError,
    CheckpointError,
    LoadedCheckpoint,
    default_name,
    embedding_tensors,
    head_tensors,
    local_module_path,
    pattern_value,
    peft_weights_path,
    read_config,
    read_tensors,
    rows_of,
    select_modules,
    task_model_path,
)

from .config import IA3Config, LoRAConfig

__all__ = ["PEFT_WEIGHTS", "PEFT_WEIGHTS_PT", "read_peft", "save_peft"]

#: PEFT tensor suffix -> (our tensor name, whether it belongs to an embedding)
SUFFIXES = {"lora_A.weight": ("lora_A", False), "lora_B.weight": ("lora_B", False),
            "lora_magnitude_vector": ("magnitude", False), "lora_embedding_A": ("lora_A", True),
            "lora_embedding_B": ("lora_B", True), "ia3_l": ("lora_B", False)}

#: Config keys read or safely ignored (initialisation-only options, bookkeeping).
_IGNORED = {
    "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "corda_config", "ensure_weight_tying",
    "eva_config", "exclude_modules", "fan_in_fan_out", "inference_mode", "init_lora_weights", "layers_pattern",
    "layers_to_transform", "loftq_config", "lora_alpha", "lora_dropout", "lora_ga_config", "megatron_core",
    "peft_type", "peft_version", "qalora_group_size", "r", "rank_pattern", "revision", "target_modules",
    "task_type", "use_dora", "use_rslora", "modules_to_save", "init_ia3_weights", "feedforward_modules",
}
#: Options that change the forward pass in ways we do not reproduce: they must be off.
_MUST_BE_OFF = {
    "alora_invocation_tokens", "arrow_config", "kasa_config", "layer_replication", "lora_bias", "megatron_config",
    "monteclora_config", "target_parameters", "trainable_token_indices", "use_bdlora", "use_qalora", "velora_config",
}


def _check_options(path: str, cfg: dict[str, Any]) -> None:
    problems = []
    for key, kinds in (("rank_pattern", dict), ("alpha_pattern", dict), ("target_modules", (list, str, type(None))),
                       ("use_dora", bool), ("use_rslora", bool)):
        if key in cfg and not isinstance(cfg[key], kinds):
            problems.append(f"{key}={cfg[key]!r} (wrong type)")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias={cfg['bias']!r} (trained base-model biases)")
    for key in ("r", "lora_alpha", "lora_dropout"):
        if key in cfg and (not isinstance(cfg[key], (int, float)) or isinstance(cfg[key], bool)):
            problems.append(f"{key}={cfg[key]!r} (not a number)")
    for key, value in cfg.items():
        if key in _IGNORED:
            continue
        if key in _MUST_BE_OFF:
            if value not in (None, False, {}, [], ""):
                problems.append(f"{key}={value!r}")
        elif value not in (None, False, {}, [], ""):
            problems.append(f"{key}={value!r} (an option this reader does not know; saved by a newer PEFT?)")
    if problems:
        raise CheckpointError(f"{path}: PEFT options that cannot be loaded as a native adapter: {'; '.join(problems)}.")


def _split(weights_path: str, tensors: dict[str, torch.Tensor], to_save: list[str], ia3: bool,
           ) -> tuple[dict[str, dict[str, torch.Tensor]], set[str], dict[str, torch.Tensor]]:
    """Per-module adapter tensors (our names), the modules that are embeddings, and ``modules_to_save`` copies."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    embeddings: set[str] = set()
    whole: dict[str, torch.Tensor] = {}
    base_copies: dict[str, torch.Tensor] = {}
    allowed = {"ia3_l"} if ia3 else set(SUFFIXES) - {"ia3_l"}
    for key, tensor in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise CheckpointError(f"{weights_path}: unexpected key '{key}' (PEFT keys start with '{PEFT_PREFIX}').")
        rest = key[len(PEFT_PREFIX):]
        suffix = next((s for s in allowed if rest.endswith("." + s)), None)
        if suffix is not None:
            module = rest[: -len(suffix) - 1]
            ours, is_embedding = SUFFIXES[suffix]
            modules.setdefault(module, {})[ours] = tensor
            if is_embedding:
                embeddings.add(module)
            continue
        if rest.endswith(".base_layer.weight"):  # PEFT's save_embedding_layers: the base table of an adapted
            base_copies[rest[: -len(".base_layer.weight")]] = tensor  # embedding / head, checked in resolve
            continue
        owner = rest.rsplit(".", 1)[0]
        if any(owner == m or owner.endswith("." + m) for m in to_save):
            whole[rest] = tensor
            continue
        raise CheckpointError(f"{weights_path}: key '{key}' is neither an adapter weight ({sorted(allowed)}) nor "
                              "in modules_to_save.")
    if not modules:
        raise CheckpointError(f"{weights_path} holds no adapter weights.")
    whole.update({f"{path}.weight": tensor for path, tensor in base_copies.items()})
    return modules, embeddings, whole


def _check_shapes(weights_path: str, modules: dict[str, dict[str, torch.Tensor]], embeddings: set[str],
                  use_dora: bool, ia3: bool) -> None:
    for path, parts in modules.items():
        want = {"lora_B"} if ia3 else {"lora_A", "lora_B"}
        if use_dora and not ia3 and path not in embeddings:
            want.add("magnitude")
        if set(parts) != want:
            raise CheckpointError(f"{weights_path}: module '{path}' has {sorted(parts)}, expected {sorted(want)}.")
        if ia3:
            continue
        a, b = parts["lora_A"], parts["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise CheckpointError(f"{weights_path}: module '{path}' has A {list(a.shape)} and B {list(b.shape)}, "
                                  "which do not form a rank-r pair.")


def read_peft(directory: str) -> LoadedCheckpoint | None:
    """Recognise a PEFT LoRA / DoRA / IA3 checkpoint directory; ``None`` if it is not a PEFT checkpoint.

    :raises CheckpointError: another PEFT type, options we do not reproduce, malformed tensors."""
    found = read_config(directory, "peft")
    if found is None:
        return None
    cfg_path, cfg = found
    if cfg["peft_type"] not in ("LORA", "IA3"):
        return None  # another method's reader may know it (VERA: adapters-vera)
    ia3 = cfg["peft_type"] == "IA3"
    _check_options(cfg_path, cfg)
    weights_path = peft_weights_path(directory)
    modules, embeddings, whole = _split(weights_path, read_tensors(weights_path), cfg.get("modules_to_save") or [], ia3)
    use_dora = bool(cfg.get("use_dora", False))
    _check_shapes(weights_path, modules, embeddings, use_dora, ia3)
    name = default_name(directory)

    def resolve(model: nn.Module) -> LoadedCheckpoint:
        loaded = _resolve(model, cfg, modules, embeddings, weights_path, name, ia3)
        loaded.head = dict(whole) or None  # loaded by name, like a native head.safetensors
        return loaded

    return LoadedCheckpoint(name=name, config=None, tensors={}, meta={"format": "peft", "name": name,
                                                                      "peft_config": cfg},
                            source=directory, resolve=resolve)


def _resolve(model: nn.Module, cfg: dict[str, Any], modules: dict[str, dict[str, torch.Tensor]], embeddings: set[str],
             weights_path: str, name: str, ia3: bool) -> LoadedCheckpoint:
    points = model._adapters_state.points
    prefix = points.base_path + "." if points.base_path else ""
    local: dict[str, str] = {}
    unknown = []
    for path in modules:
        found = local_module_path(model, path)
        if found is None:
            unknown.append(path)
        else:
            local[path] = found[len(prefix):] if prefix and found.startswith(prefix) else found
    if unknown:
        raise CheckpointError(f"{weights_path}: adapter weights for modules this model ({type(model).__name__}) does "
                              f"not have: {unknown[:4]}{' ...' if len(unknown) > 4 else ''}.")
    targets = sorted(set(local.values()))
    inputs = {p for p, parts in modules.items() if ia3 and tuple(parts["lora_B"].shape)[:1] == (1,)
              and parts["lora_B"].dim() == 2 and parts["lora_B"].shape[1] != 1}
    if ia3:  # an ia3_l of shape (1, in) scales the module's input (PEFT's feedforward_modules)
        config: LoRAConfig = IA3Config(target_modules=targets,
                                       feedforward_modules=sorted(local[p] for p in inputs) or None)
    else:
        ranks = {path: parts["lora_A"].shape[0] for path, parts in modules.items()}
        alpha = cfg.get("lora_alpha", 8)
        # PEFT's per-module value: the first key equal to the path, a dotted suffix of it, or a regular
        # expression matching its end (what pattern_value does)
        alphas = {path: pattern_value(cfg.get("alpha_pattern") or {}, (path,), alpha) for path in modules}
        counts = Counter(ranks.values())
        r = max(counts, key=lambda k: (counts[k], k))
        try:
            config = LoRAConfig(
                target_modules=targets, r=int(r), alpha=alpha, dropout=float(cfg.get("lora_dropout", 0.0) or 0.0),
                use_dora=bool(cfg.get("use_dora", False)), use_rslora=bool(cfg.get("use_rslora", False)),
                rank_pattern={re.escape(local[p]): int(v) for p, v in ranks.items() if v != r},
                alpha_pattern={re.escape(local[p]): v for p, v in alphas.items() if v != alpha})
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{weights_path}: the adapter config cannot be used: {exc}") from None
    locations = {n.names[-1]: n.point.location for n in select_modules(points, config, "PEFT adapter")}
    tensors: dict[str, torch.Tensor] = {}
    for path, parts in modules.items():
        location = locations[local[path]]
        for key, tensor in parts.items():
            key = "input_scale" if path in inputs else key
            tensors[f"{location}.{key}"] = tensor.reshape(-1) if ia3 else tensor
    return LoadedCheckpoint(name=name, config=config, tensors=tensors,
                            meta={"format": "PEFT", "name": name, "model_type": None}, source=weights_path)


# ---------------------------------------------------------------------------------------------- writing
def _writable(model: nn.Module, name: str) -> LoRAConfig:
    state = model._adapters_state
    config = state.record(name).config
    problems = []
    if not isinstance(config, LoRAConfig) or hasattr(config, "n_up_projection"):
        problems.append(f"a {type(config).__name__} adapter")
    elif config.use_gating:
        problems.append("use_gating=True")
    if state.shared_modules(name):
        problems.append("model-level shared modules")
    if problems:
        raise AdapterError(f"Adapter '{name}' cannot be written in PEFT's format: {', '.join(problems)}.")
    return config


def _fused_tensors(layer: nn.Module, params: dict[str, torch.Tensor], use_dora: bool) -> dict[str, torch.Tensor]:
    """An interface-placed LoRA on a fused q|k|v projection as one LoRA: ``A`` stacked (shared when the parts
    share it), ``B`` block-diagonal on each part's rows."""
    if use_dora:
        raise AdapterError("DoRA on a fused q/k/v projection (one part per matrix) cannot be written in PEFT's format.")
    parts = [w for w in ("q", "k", "v") if f"parts.{w}.lora_A" in params]
    width = layer.out_features
    a_list = [params[f"parts.{w}.lora_A"] for w in parts]
    shared_a = len(parts) == 3 and all(torch.equal(a_list[0], a) for a in a_list[1:])
    r = a_list[0].shape[0]
    a_full = a_list[0] if shared_a else torch.cat(a_list, dim=0)
    b_full = torch.zeros(width, a_full.shape[0], dtype=a_full.dtype)
    for i, w in enumerate(parts):
        cols = slice(0, r) if shared_a else slice(i * r, (i + 1) * r)
        b_full[rows_of(layer.fused, w, width), cols] = params[f"parts.{w}.lora_B"]
    return {"lora_A.weight": a_full.contiguous(), "lora_B.weight": b_full}


def _fused_ia3(layer: nn.Module, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """IA3 on parts of a fused q|k|v projection as one scaling of the whole output: each part's vector on its
    rows, 1 on the rows no part scales (the same function)."""
    width = layer.out_features
    first = next(v for k, v in params.items() if k.endswith(".lora_B"))
    full = torch.ones(width, dtype=first.dtype)
    for w in ("q", "k", "v"):
        key = f"parts.{w}.lora_B"
        if key in params:
            full[rows_of(layer.fused, w, width)] = params[key].reshape(-1)
    return full


def save_peft(model: nn.Module, directory: str, name: str) -> None:
    """Write LoRA / DoRA / IA3 adapter ``name`` in PEFT's format (``PeftModel.from_pretrained`` loads it).

    :raises AdapterError: MTL-LoRA, gated LoRA, or DoRA on fused q|k|v parts (no PEFT equivalent)."""
    from safetensors.torch import save_file

    config = _writable(model, name)
    state = model._adapters_state
    ia3 = config.composition_mode == "scale"
    paths = {id(m): p for p, m in model.named_modules()}
    out: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    scalings: dict[str, float] = {}
    adapted: list[str] = []
    inputs: list[str] = []
    for layer in state.layers(name):
        path = task_model_path(model, paths[id(layer)])
        adapted.append(path)
        params = {k: v.detach().clone().contiguous() for k, v in layer.adapter_state_dict(name).items()}
        embedding = type(layer).__name__ == "LoRAEmbedding"
        if ia3:
            if "input_scale" in params:  # IA3 on the input: PEFT's feedforward_modules, ia3_l of shape (1, in)
                out[f"{PEFT_PREFIX}{path}.ia3_l"] = params["input_scale"].reshape(1, -1)
                inputs.append(path)
            elif any(k.startswith("parts.") for k in params):  # parts of a fused q|k|v: one vector, 1 elsewhere
                out[f"{PEFT_PREFIX}{path}.ia3_l"] = _fused_ia3(layer, params).reshape(-1, 1)
            else:
                out[f"{PEFT_PREFIX}{path}.ia3_l"] = params["lora_B"].reshape(-1, 1)
            continue
        if any(k.startswith("parts.") for k in params):
            tensors = _fused_tensors(layer, params, config.use_dora)
            scaling = next(u.scaling for u in layer.units(name).values())
        else:
            unit = layer.units(name)[""]
            scaling = unit.scaling
            names = (("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight"))
            tensors = {names[0]: params["lora_A"], names[1]: params["lora_B"]}
            if "magnitude" in params:
                tensors["lora_magnitude_vector"] = params["magnitude"]
        first = next(iter(tensors.values()))
        ranks[path], scalings[path] = first.shape[0], float(scaling)
        out.update({f"{PEFT_PREFIX}{path}.{k}": v for k, v in tensors.items()})
    whole = dict(head_tensors(model))  # task head and trained input embeddings: PEFT's modules_to_save
    trained_embeddings = embedding_tensors(model)
    if trained_embeddings:
        whole.update({f"{state.points.embeddings.path}.{k}": v for k, v in trained_embeddings.items()})
    both = sorted({task_model_path(model, key).rsplit(".", 1)[0] for key in whole} & set(adapted))
    if both:
        raise AdapterError(f"Adapter '{name}' adapts {both}, whose own weights train too (modules_to_save); PEFT "
                           "holds a module either adapted or saved whole, not both. Merge the adapter into it first "
                           "(merge_adapter) or train it without train_embeddings.")
    for key, tensor in whole.items():
        out[PEFT_PREFIX + task_model_path(model, key)] = tensor
    peft_config = _peft_config(model, config, ia3, sorted(adapted), ranks, scalings, whole)
    if ia3:
        peft_config["feedforward_modules"] = sorted(inputs)
    os.makedirs(directory, exist_ok=True)
    save_file(out, os.path.join(directory, PEFT_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as fh:
        json.dump(peft_config, fh, indent=2, sort_keys=True)


def _peft_config(model: nn.Module, config: LoRAConfig, ia3: bool, targets: list[str], ranks: dict[str, int],
                 scalings: dict[str, float], whole: dict[str, torch.Tensor]) -> dict[str, Any]:
    original = getattr(type(model), "_adapters_original_class", type(model))
    mconfig = getattr(model, "config", None)
    common = {
        "task_type": None,
        "base_model_name_or_path": getattr(mconfig, "_name_or_path", None) or None,
        "target_modules": targets,
        "modules_to_save": sorted({task_model_path(model, key).rsplit(".", 1)[0] for key in whole}) or None,
        "fan_in_fan_out": any(getattr(layer, "is_conv1d", False) for layer in model._adapters_state.layers()),
        "inference_mode": True,
        "auto_mapping": {"base_model_class": original.__name__, "parent_library": original.__module__},
    }
    if ia3:
        return {"peft_type": "IA3", "feedforward_modules": [], "init_ia3_weights": True, **common}

    def alpha_for(rank: int, scaling: float) -> float:
        alpha = scaling * (math.sqrt(rank) if config.use_rslora else rank)
        return round(alpha) if abs(alpha - round(alpha)) < 1e-9 * max(1.0, abs(alpha)) else alpha

    r = max(ranks.values())
    top = Counter(s for p, s in scalings.items() if ranks[p] == r).most_common(1)[0][0]
    alpha = alpha_for(r, top)
    alphas = {p: alpha_for(ranks[p], s) for p, s in scalings.items()}
    return {
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "lora_dropout": config.dropout, "bias": "none",
        "use_rslora": config.use_rslora, "use_dora": config.use_dora,
        "rank_pattern": {re.escape(p): v for p, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(p): a for p, a in alphas.items() if a != alpha},
        "layers_to_transform": None, "init_lora_weights": True, **common,
    }
