"""Foreign prompt-learning checkpoints read into native adapters (registered for core's format dispatch
through the ``adapters.formats`` entry points ``peft:prompt_tuning``, ``peft:prefix_tuning`` and
``adapterhub:prefix_tuning``).

PEFT (``peft_type`` ``PROMPT_TUNING`` / ``PREFIX_TUNING``)
    One tensor, ``prompt_embeddings``. Prompt tuning: ``P × d``, our prompt. Prefix tuning: PEFT saves the
    prefixes themselves (its MLP's output when ``prefix_projection``), ``P × (layers · 2 · H_kv · D)`` in the
    column layout our pools use; it becomes a flat adapter with ``offset_positions`` (PEFT's prefixes sit in
    the key/value cache, so the tokens' positions start at ``P``). Only models with one stack of layers
    (``num_transformer_submodules == 1``; PEFT also prompts the decoder of encoder-decoder models).

AdapterHub 1.x (``architecture: "prefix_tuning"``)
    The pool ``prefix_tuning.prefix_tunings.<name>.<kind>_prefix.…`` (``wte``, ``control_trans.0`` / ``.2``,
    or the flat ``control_trans`` vector) becomes ``shared.prefix_<kind>``; gates
    ``<layer>.<attention>.prefix_tuning.prefix_gates.<name>`` become each layer's ``gate``. AdapterHub sizes
    prefixes by ``num_attention_heads``; models with fewer key/value heads are refused.
"""

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
    default_name,
    layer_indices,
    peft_weights_path,
    read_config,
    read_tensors,
)

from .config import PrefixTuningConfig, PromptTuningConfig

__all__ = ["read_peft_prompt_learning", "read_adapterhub_prefix"]

_PEFT_TYPES = ("PROMPT_TUNING", "PREFIX_TUNING")
_CROSS_MARKERS = ("crossattention", "encdecattention", "encoder_attn", "cross_attn")


def _sites(model: nn.Module, config: PrefixTuningConfig) -> list[Any]:
    from .method import prefix_sites

    return prefix_sites(model._adapters_state.points, config)


def read_peft_prompt_learning(directory: str) -> LoadedCheckpoint | None:
    """A PEFT prompt-tuning or prefix-tuning directory as a native checkpoint; ``None`` for other PEFT types.

    :raises CheckpointError: several transformer submodules (encoder-decoder prompts), no weights, a tensor
        of the wrong shape for the model."""
    found = read_config(directory, "peft")
    if found is None or found[1].get("peft_type") not in _PEFT_TYPES:
        return None
    cfg_path, cfg = found
    kind = cfg["peft_type"]
    if int(cfg.get("num_transformer_submodules") or 1) != 1:
        raise CheckpointError(f"{cfg_path}: a PEFT {kind} checkpoint of an encoder-decoder model (prompts for "
                              "encoder and decoder) cannot be loaded; prompts on one stack are supported.")
    weights = [peft_weights_path(directory)]
    tensors = read_tensors(weights[0])
    if set(tensors) != {"prompt_embeddings"}:
        raise CheckpointError(f"{weights[0]}: expected one tensor 'prompt_embeddings', found {sorted(tensors)}.")
    values = tensors["prompt_embeddings"]
    length = int(cfg.get("num_virtual_tokens") or values.shape[0])
    if values.dim() != 2 or values.shape[0] != length:
        raise CheckpointError(f"{weights[0]}: prompt_embeddings has shape {list(values.shape)}; expected "
                              f"[{length}, ...] (num_virtual_tokens rows).")
    name = default_name(directory)
    meta = {"format": "peft", "name": name, "peft_config": cfg}
    if kind == "PROMPT_TUNING":
        config: Any = PromptTuningConfig(prompt_length=length)
        return LoadedCheckpoint(name=name, config=config, tensors={"prompt_tuning.embedding": values}, meta=meta,
                                source=directory)
    config = PrefixTuningConfig(prefix_length=length, flat=True, offset_positions=True)

    def resolve(model: nn.Module) -> LoadedCheckpoint:
        sites = _sites(model, config)
        width = sum(2 * s.heads * s.head_dim for s in sites)
        if values.shape[1] != width:
            raise CheckpointError(f"{weights[0]}: prompt_embeddings has {values.shape[1]} columns; this model's "
                                  f"{len(sites)} attention modules need {width} (layers · 2 · key/value heads · "
                                  "head size). Was it saved from a different model?")
        return LoadedCheckpoint(name=name, config=config, tensors={"shared.prefix_self.control_trans": values},
                                meta=meta, source=weights[0])

    return LoadedCheckpoint(name=name, config=None, tensors={}, meta=meta, source=directory, resolve=resolve)


def read_adapterhub_prefix(directory: str) -> LoadedCheckpoint | None:
    """An AdapterHub 1.x prefix-tuning directory as a native checkpoint; else ``None``.

    :raises CheckpointError: options we do not have, keys that are not this adapter's, prefixes sized for more
        key/value heads than the model has."""
    found = adapterhub_directory(directory, ("prefix_tuning",))
    if found is None:
        return None
    cfg_path, meta, cfg, weights_path, name = found
    import dataclasses

    ours = {f.name for f in dataclasses.fields(PrefixTuningConfig)}
    unknown = [f"{k}={v!r}" for k, v in cfg.items() if k not in ours and k != "architecture"]
    if unknown:
        raise CheckpointError(f"{cfg_path}: options of an AdapterHub 'prefix_tuning' adapter that cannot be loaded: "
                              f"{'; '.join(unknown)}.")
    try:
        config = PrefixTuningConfig(**{k: v for k, v in cfg.items() if k in ours})
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{cfg_path}: the 'prefix_tuning' config cannot be used: {exc}") from None
    tensors = read_tensors(weights_path)
    pool_re = re.compile(rf"(^|\.)prefix_tuning\.prefix_tunings\.{re.escape(name)}\.(?P<kind>\w+)_prefix\.(?P<p>.+)$")
    gate_re = re.compile(rf"^(?P<path>.+)\.prefix_tuning\.prefix_gates\.{re.escape(name)}\.(?P<p>weight|bias)$")
    pools: dict[str, dict[str, torch.Tensor]] = {}
    gates: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if ".prefix_tuning.pool.prefix_tunings." in key:
            continue  # the model-level pool again, through a layer's reference to it
        match = pool_re.search(key)
        if match:
            pools.setdefault(match["kind"], {})[match["p"]] = tensor
            continue
        match = gate_re.match(key)
        if match is None:
            raise CheckpointError(f"{weights_path}: key '{key}' is not a prefix-tuning weight of adapter '{name}'.")
        gates.setdefault(match["path"], {})[match["p"]] = tensor
    saved_type = meta.get("model_type")

    def resolve(model: nn.Module) -> LoadedCheckpoint:
        check_model_type(cfg_path, saved_type, model)
        sites = _sites(model, config)
        out: dict[str, torch.Tensor] = {}
        for kind, parts in pools.items():
            group = {"self": "self", "encoder": "encoder", "cross": "cross"}.get(kind)
            chosen = [s for s in sites if s.group == group]
            if not chosen:
                raise CheckpointError(f"{weights_path}: a '{kind}_prefix' pool, but this model has no such attention.")
            width = len(chosen) * 2 * chosen[0].heads * chosen[0].head_dim
            if config.flat:
                flat = parts.get("control_trans")
                if flat is None or flat.numel() != config.prefix_length * width:
                    raise _heads_error(weights_path, kind, flat, config.prefix_length * width, chosen[0])
                out[f"shared.prefix_{group}.control_trans"] = flat.reshape(config.prefix_length, width)
            else:
                last = parts.get("control_trans.2.weight")
                if last is None or last.shape[0] != width:
                    raise _heads_error(weights_path, kind, last, width, chosen[0])
                out.update({f"shared.prefix_{group}.{k}": v for k, v in parts.items()})
        paths = layer_indices(model)
        for path, parts in gates.items():
            index, rest = _layer_of(path, paths)
            if index is None:
                raise CheckpointError(f"{weights_path}: a gate at '{path}', which is in no layer of this model.")
            kind = "cross_attn" if any(m in rest.lower() for m in _CROSS_MARKERS) else "self_attn"
            out.update({f"layers.{index}.{kind}.prefix_tuning.gate.{p}": v for p, v in parts.items()})
        return LoadedCheckpoint(name=name, config=config, tensors=out, source=weights_path,
                                meta={"format": "adapterhub", "model_type": saved_type,
                                      "hidden_size": meta.get("hidden_size")})

    return LoadedCheckpoint(name=name, config=None, tensors={}, meta={"format": "adapterhub", **meta},
                            source=directory, resolve=resolve)


def _layer_of(path: str, paths: dict[str, int]) -> tuple[int | None, str]:
    """``(layer index, path inside the layer)`` of a module path (a task-model prefix tolerated)."""
    for candidate in (path, path.split(".", 1)[-1]):
        for layer_path in sorted(paths, key=len, reverse=True):
            if candidate.startswith(layer_path + "."):
                return paths[layer_path], candidate[len(layer_path) + 1:]
    return None, ""


def _heads_error(weights_path: str, kind: str, tensor: torch.Tensor | None, expected: int,
                 site: Any) -> CheckpointError:
    got = "nothing" if tensor is None else f"shape {list(tensor.shape)}"
    return CheckpointError(f"{weights_path}: the '{kind}_prefix' pool has {got}; this model needs {expected} "
                           f"prefix values per layer group ({site.heads} key/value heads of {site.head_dim}). "
                           "AdapterHub sizes prefixes by num_attention_heads, so a model with grouped-query "
                           "attention (fewer key/value heads) cannot use its prefixes.")
