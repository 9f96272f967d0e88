"""Helpers for plugins that read or write foreign checkpoint formats (PEFT, AdapterHub 1.x): our
projection hook points keyed by module path, path matching across task classes, fused q|k|v rows, the
name of an adapter directory, and the common steps of reading an AdapterHub directory. Exported through
:mod:`adapters.plugin`; the format readers themselves live in the method packages (``adapters.formats``
entry points)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .checkpoint_io import CONFIG_FILE, detect_format, read_json, read_tensors
from .errors import CheckpointError
from .points import FusedQKV

__all__ = ["PEFT_WEIGHTS", "PEFT_WEIGHTS_PT", "PEFT_PREFIX", "peft_weights_path",
           "Target", "module_targets", "match_module", "local_module_path", "task_model_path", "rows_of",
           "layer_index", "default_name",
           "check_model_type", "layer_indices", "read_config", "adapterhub_directory", "read_json", "read_tensors",
           "AH_WEIGHTS", "AH_WEIGHTS_ST"]

AH_WEIGHTS = "pytorch_adapter.bin"
#: PEFT's weights files (safetensors first) and the prefix of every tensor key (``PeftModel`` over the model)
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_WEIGHTS_PT = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
AH_WEIGHTS_ST = "adapter.safetensors"

#: What a module path of the foreign format can be on our model.
KINDS = ("q", "k", "v", "qkv", "o", "intermediate", "output")


@dataclass
class Target:
    """One of our LoRA-capable hook points: its portable location, its kind and (for qkv) the fused layout."""

    location: str
    kind: str  # one of KINDS
    layer: int
    path: str  # full dotted path from the model root
    fused: FusedQKV | None = None
    out_features: int = 0


def module_targets(model: nn.Module) -> dict[str, Target]:
    """Every projection hook point of ``model`` keyed by its full module path (self- and cross-attention:
    a native LoRA's ``attn_matrices`` adapt both, as PEFT's ``target_modules`` names match both)."""
    state = getattr(model, "_adapters_state", None)
    if state is None:
        raise CheckpointError("This model was not prepared for adapters; call adapters.init(model) first.")
    return {point.path: Target(point.location, which, lp.index, point.path,
                               attn.fused if which == "qkv" else None)
            for lp, which, point, attn in state.points.projections()}


def match_module(targets: dict[str, Target], path: str, base_path: str) -> Target | None:
    """Our hook point for a foreign module ``path``; tolerates a task-model prefix on either side.

    A path saved from ``Qwen3ForCausalLM`` (``model.layers.0...``) matches ``Qwen3Model`` (``layers.0...``)
    and vice versa, as does a ``bert.`` prefix against a bare ``BertModel``.
    """
    if path in targets:
        return targets[path]
    if base_path and f"{base_path}.{path}" in targets:
        return targets[f"{base_path}.{path}"]
    _, _, rest = path.partition(".")
    if rest:
        if rest in targets:
            return targets[rest]
        if base_path and f"{base_path}.{rest}" in targets:
            return targets[f"{base_path}.{rest}"]
    return None


def peft_weights_path(directory: str) -> str:
    """The weights file of the PEFT adapter in ``directory`` (``adapter_model.safetensors``, else ``.bin``).

    :raises CheckpointError: neither exists."""
    for name in (PEFT_WEIGHTS, PEFT_WEIGHTS_PT):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    raise CheckpointError(f"{directory} has a PEFT {CONFIG_FILE} but no {PEFT_WEIGHTS}.")


def local_module_path(model: nn.Module, path: str) -> str | None:
    """Our model's path of the module a foreign checkpoint names ``path`` (``None``: no such module).

    Tolerates a task-model prefix on either side: ``model.layers.0.mlp.up_proj`` (saved from
    ``Qwen3ForCausalLM``) is ``layers.0.mlp.up_proj`` on a ``Qwen3Model`` and vice versa."""
    base_path = model._adapters_state.points.base_path
    candidates = [path]
    if base_path:
        candidates.append(f"{base_path}.{path}")
    _, _, rest = path.partition(".")
    if rest:
        candidates += [rest] + ([f"{base_path}.{rest}"] if base_path else [])
    for candidate in candidates:
        try:
            model.get_submodule(candidate)
        except AttributeError:
            continue
        return candidate
    return None


def task_model_path(model: nn.Module, path: str) -> str:
    """``path`` as the task-model class names it: a bare base model whose task classes hold it under
    ``base_model_prefix`` (``Qwen3Model`` in ``Qwen3ForCausalLM.model``, ``BertModel`` in ``.bert``) gets
    that prefix, so an exported adapter fits the classes servers (vLLM, TGI) and PEFT load. A base class its
    task classes do not wrap (``T5Model``: ``T5ForConditionalGeneration`` holds ``encoder`` / ``decoder``
    itself) keeps its paths."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    bare = prefix and getattr(model, "base_model", None) is model and not hasattr(model, prefix)
    return f"{prefix}.{path}" if bare and _task_class_wraps(type(model), prefix) else path


_WRAPS: dict[type, bool] = {}


def _task_class_wraps(cls: type, prefix: str) -> bool:
    """Whether the causal-LM (else seq2seq-LM, else sequence-classification) class of ``cls``'s model type
    holds the base model under ``prefix`` (built once per class on the meta device: no memory, no weights)."""
    original = getattr(cls, "_adapters_original_class", cls)
    if original not in _WRAPS:
        _WRAPS[original] = True  # the common case, if the task class cannot be found
        config_class = getattr(original, "config_class", None)
        try:
            import transformers
            from transformers.utils import logging as hf_logging

            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # building a causal-LM class of an encoder warns; it is only looked at
        except ImportError:
            return True
        try:
            for auto in ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModelForSequenceClassification"):
                mapping = getattr(transformers, auto)._model_mapping
                if config_class is not None and config_class in mapping:
                    with torch.device("meta"):
                        task = mapping[config_class]._from_config(config_class())
                    _WRAPS[original] = hasattr(task, prefix)
                    break
        except Exception:  # noqa: BLE001 - an unusual model class keeps the default
            pass
        finally:
            hf_logging.set_verbosity(verbosity)
    return _WRAPS[original]


def layer_index(targets: dict[str, Target]) -> int:
    """Number of layers the targets span."""
    return 1 + max((t.layer for t in targets.values()), default=-1)


def rows_of(fused: FusedQKV, which: str, width: int) -> torch.Tensor:
    """Output feature indices of ``which`` in a fused projection of ``width`` outputs."""
    rows = fused.index(which)
    if isinstance(rows, slice):
        return torch.arange(rows.start, rows.stop)
    return rows


def default_name(directory: str) -> str:
    """Adapter name for a directory: the repo name for a Hub cache snapshot, else the folder name."""
    norm = os.path.normpath(os.path.abspath(directory))
    parent, leaf = os.path.split(norm)
    grand, parent_name = os.path.split(parent)
    if parent_name == "snapshots" and os.path.basename(grand).startswith("models--"):
        return os.path.basename(grand).split("--")[-1]
    return leaf


def check_model_type(cfg_path: str, saved_type: str | None, model: nn.Module) -> None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if saved_type and model_type and saved_type != model_type:
        raise CheckpointError(f"{cfg_path}: the adapter was saved from a '{saved_type}' model; this model is "
                              f"'{model_type}'.")


def layer_indices(model: nn.Module) -> dict[str, int]:
    """Layer index by module path, both from the model's root and from inside its base model."""
    points = model._adapters_state.points
    base_path = points.base_path
    paths: dict[str, int] = {}
    for lp in points.layers:
        paths[lp.module.path] = lp.index
        if base_path and lp.module.path.startswith(base_path + "."):
            paths[lp.module.path[len(base_path) + 1:]] = lp.index
    return paths


def read_config(directory: str, kind: str) -> tuple[str, dict[str, Any]] | None:
    """``(config path, parsed adapter_config.json)`` when ``directory`` holds a checkpoint of format
    ``kind`` (:func:`~adapters.checkpoint_io.detect_format`), else ``None``."""
    cfg_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(cfg_path):
        return None
    meta = read_json(cfg_path)
    return (cfg_path, meta) if detect_format(meta) == kind else None


def adapterhub_directory(directory: str, architectures: tuple[str | None, ...],
                         ) -> tuple[str, dict[str, Any], dict[str, Any], str, str] | None:
    """``(config path, meta, config, weights path, name)`` of an AdapterHub 1.x directory whose
    ``architecture`` is one of ``architectures`` (``None``: AdapterHub's bottleneck default), or ``None``
    when ``directory`` is not such a checkpoint.

    :raises CheckpointError: it is one, but has no weights file."""
    found = read_config(directory, "adapterhub")
    if found is None or found[1]["config"].get("architecture") not in architectures:
        return None
    cfg_path, meta = found
    weights = [os.path.join(directory, f) for f in (AH_WEIGHTS_ST, AH_WEIGHTS)]
    existing = [w for w in weights if os.path.exists(w)]
    if not existing:
        raise CheckpointError(f"{directory} has an AdapterHub {CONFIG_FILE} but no {AH_WEIGHTS} or {AH_WEIGHTS_ST}.")
    name = str(meta.get("name") or os.path.basename(os.path.normpath(directory)))
    return cfg_path, meta, meta["config"], existing[0], name
