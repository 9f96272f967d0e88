"""The primitives of checkpoint files, shared by the native format (:mod:`adapters.checkpoint`) and the
foreign-format readers (:mod:`adapters.compat`): file names, the in-memory :class:`LoadedCheckpoint`, the
reader registry, and safe JSON / tensor reading. It imports nothing else of core's, so both sides can
depend on it without depending on each other."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "WEIGHTS_FILE_PT", "HEAD_FILE", "EMBEDDINGS_FILE", "FUSION_CONFIG_FILE",
           "FUSION_WEIGHTS_FILE", "LoadedCheckpoint", "READERS", "read_json", "read_tensors", "head_tensors",
           "embedding_tensors", "detect_format", "tensor_shapes"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
WEIGHTS_FILE_PT = "adapter.bin"
HEAD_FILE = "head.safetensors"
EMBEDDINGS_FILE = "embeddings.safetensors"
FUSION_CONFIG_FILE = "adapter_fusion_config.json"
FUSION_WEIGHTS_FILE = "adapter_fusion.safetensors"


@dataclass
class LoadedCheckpoint:
    """A checkpoint read into memory, in native form, before anything is applied to a model."""

    name: str
    config: Any  # AdapterConfig
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    head: dict[str, torch.Tensor] | None = None
    #: the input embeddings' tensors (keys relative to the interface's ``model_embeddings``), when trained
    embeddings: dict[str, torch.Tensor] | None = None
    source: str = ""
    #: For formats whose mapping depends on the target model (PEFT module paths): called by
    #: :func:`apply_checkpoint` before anything changes; returns the checkpoint in native form.
    resolve: Callable[[nn.Module], LoadedCheckpoint] | None = None


Reader = Callable[[str], "LoadedCheckpoint | None"]
#: Checkpoint readers tried in order; the first that returns a checkpoint wins.
READERS: list[Reader] = []


def read_json(path: str) -> dict[str, Any]:
    """A JSON object from ``path``, or a :class:`CheckpointError` naming the file."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the checkpoint is corrupt.") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object; the checkpoint is corrupt.")
    return data


def tensor_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """The shape of every named tensor in a weights file: read from a safetensors header without loading the
    data (a ``torch.save``'d file is loaded, :func:`read_tensors`)."""
    if path.endswith(".safetensors") and os.path.exists(path):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as fh:
                return {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}
        except Exception as exc:  # noqa: BLE001 - safetensors raises several error types
            raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); the file is corrupt or "
                                  "truncated.") from None
    return {key: tuple(t.shape) for key, t in read_tensors(path).items()}


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    """Named tensors from a safetensors file, or from a ``torch.save``'d dict loaded with
    ``weights_only=True`` (no arbitrary objects are unpickled); a :class:`CheckpointError` otherwise."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist.")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            data = load_file(path)
        except Exception as exc:  # noqa: BLE001 - safetensors raises several error types
            raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); the file is corrupt or "
                                  "truncated.") from None
    else:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch.load raises many types
            raise CheckpointError(f"{path} could not be read as a tensor file ({exc}).") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                             for k, v in data.items()):
        raise CheckpointError(f"{path} does not hold a dict of named tensors.")
    return data


def head_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The task head: parameters outside the base model, skipping any tied to a base-model tensor, the
    output embeddings (``lm_head``: frozen by ``train_adapter``, so unchanged) unless made trainable on
    purpose after ``train_adapter``, and every adapter's own parameters (a LoRA on the LM head lives in it:
    it is saved as the adapter's, never as a head)."""
    state = model._adapters_state
    base_ptrs = {p.data_ptr() for p in state.points.base_model.parameters()}
    base_ids = {id(p) for p in state.points.base_model.parameters()} | state.owned_parameter_ids()
    getter = getattr(model, "get_output_embeddings", None)
    output = getter() if callable(getter) else None
    frozen_output = set()
    if isinstance(output, nn.Module):  # trained only when unfrozen on purpose after train_adapter
        frozen_output = {id(p) for p in output.parameters() if state.training is None or not p.requires_grad}
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        skip = id(p) in base_ids or id(p) in frozen_output or p.data_ptr() in base_ptrs
        if skip or name.startswith("adapters_shared."):
            continue
        out[name] = p.detach().clone().contiguous()
    return out


def embedding_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The input embeddings' tensors when a training setup made them trainable (``train_embeddings=True``,
    or unfrozen by hand after ``train_adapter``)."""
    state = model._adapters_state
    point = state.points.embeddings
    if state.training is None or point is None:
        return {}
    owned = state.owned_parameter_ids()  # a LoRA on the embeddings lives in them: its tensors are the adapter's
    params = list(point.module.named_parameters(remove_duplicate=False))
    if not any(p.requires_grad for _, p in params if id(p) not in owned):
        return {}
    adapter_keys = {name for name, p in params if id(p) in owned}
    return {k: v.detach().clone().contiguous() for k, v in point.module.state_dict().items() if k not in adapter_keys}


def detect_format(meta: dict[str, Any]) -> str | None:
    """The format of an ``adapter_config.json`` (its parsed ``meta``): ``"native"``, ``"peft"``,
    ``"adapterhub"`` (AdapterHub ``adapters`` 1.x) or ``None``. The one rule every reader and
    ``adapters summary`` use."""
    cfg = meta.get("config")
    if isinstance(cfg, dict) and "method" in cfg:
        return "native"
    if "peft_type" in meta:
        return "peft"
    if isinstance(cfg, dict) and (str(meta.get("version", "")).startswith("adapters.") or "architecture" in cfg):
        return "adapterhub"
    return None
