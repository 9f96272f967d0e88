"""The native checkpoint format: ``adapter_config.json`` + ``adapter.safetensors``.

Weight keys are portable locations (``layers.3.self_attn.q.lora_A``; ``shared.<key>.<param>`` for
model-level modules), so an adapter saved from ``Qwen3ForCausalLM`` loads into ``Qwen3Model`` and
back. Loading checks everything (config, model type, keys, shapes) before it touches the model;
a failure raises :class:`~adapters.errors.CheckpointError` naming the file and leaves the model
as it was.

Other formats plug in through :data:`READERS`: functions that recognise a directory and return a
:class:`LoadedCheckpoint` in native form (AdapterHub 1.x and PEFT readers live in
:mod:`adapters.compat` when present).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from .checkpoint_io import (
    CONFIG_FILE,
    EMBEDDINGS_FILE,
    FUSION_CONFIG_FILE,
    FUSION_WEIGHTS_FILE,
    HEAD_FILE,
    READERS,
    WEIGHTS_FILE,
    WEIGHTS_FILE_PT,
    LoadedCheckpoint,
    detect_format,
    embedding_tensors,
    head_tensors,
    read_json,
    read_tensors,
)
from .errors import AdapterError, CheckpointError

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "WEIGHTS_FILE_PT",
    "HEAD_FILE",
    "EMBEDDINGS_FILE",
    "LoadedCheckpoint",
    "READERS",
    "save_adapter",
    "load_adapter",
    "adapter_tensors",
    "read_native",
]

def _state(model: nn.Module):
    state = getattr(model, "_adapters_state", None)
    if state is None:
        raise AdapterError("This model was not prepared for adapters; call adapters.init(model) first.")
    return state


def adapter_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors with portable keys (detached, contiguous copies)."""
    state = _state(model)
    state.record(name)
    out: dict[str, torch.Tensor] = {}
    for layer in state.layers(name):
        for key, tensor in layer.adapter_state_dict(name).items():
            out[f"{layer.location}.{key}"] = tensor.detach().clone().contiguous()
    for key, module in state.shared_modules(name).items():
        for pkey, tensor in module.state_dict().items():
            out[f"shared.{key}.{pkey}"] = tensor.detach().clone().contiguous()
    return out


def _unsaved_trainable(model: nn.Module, saved: set[int]) -> list[str]:
    """Names of trainable base-model parameters that no file of this adapter holds."""
    state = _state(model)
    adapter_ids = state.owned_parameter_ids()
    return [name for name, p in state.points.base_model.named_parameters()
            if p.requires_grad and id(p) not in adapter_ids and id(p) not in saved]


def _meta(model: nn.Module, name: str) -> dict[str, Any]:
    from ._version import __version__

    state = _state(model)
    record = state.record(name)
    config = getattr(model, "config", None)
    original = getattr(type(model), "_adapters_original_class", type(model))
    return {
        "config": record.config.to_dict(),
        "name": name,
        "model_type": getattr(config, "model_type", None),
        "model_name": getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None),
        "model_class": original.__name__,
        "hidden_size": state.points.hidden_size,
        "num_layers": state.points.num_layers,
        "version": __version__,
        "methods": {m.name: m.distribution for m in record.methods},
    }


def save_adapter(model: nn.Module, directory: str, name: str, *, with_head: bool = True,
                 use_safetensors: bool = True, custom_interface: bool | None = None, format: str = "native") -> None:
    """Write adapter ``name`` and everything its training could have changed to ``directory``.

    ``format="peft"`` (or another foreign format known to :mod:`adapters.compat`) writes that format instead.

    Files: ``adapter_config.json`` (keys ``config``, ``name``, ``model_type``, ``model_name``,
    ``model_class``, ``hidden_size``, ``version``), ``adapter.safetensors`` (or ``adapter.bin`` with
    ``use_safetensors=False``) holding only this adapter's tensors, ``head.safetensors`` (the task
    head; the default, as in AdapterHub; the output embeddings only when they are trainable),
    ``embeddings.safetensors`` when the input embeddings are trainable (``train_embeddings=True``), and
    ``adapter_interface.json`` when the model uses an interface that is not the one registered for its
    model type.

    :raises AdapterError: after ``train_adapter``, other base-model weights were made trainable: they
        would not be saved (the message names them). Without ``train_adapter`` the whole model is
        trainable; a warning then says that only the adapter (head, embeddings) is written.
    """
    if format != "native":
        from .compat import save_foreign

        save_foreign(model, directory, name, format)
        return
    state = _state(model)
    tensors = adapter_tensors(model, name)
    meta = _meta(model, name)
    head = head_tensors(model) if with_head else {}
    embeddings = embedding_tensors(model)
    kept = {id(p) for p in state.points.embeddings.module.parameters()} if embeddings else set()
    unsaved = _unsaved_trainable(model, kept)
    if unsaved:
        listed = ", ".join(unsaved[:5]) + (f" ... ({len(unsaved)} in all)" if len(unsaved) > 5 else "")
        if state.training is not None:
            raise AdapterError(
                f"save_adapter would drop trained weights: base-model parameters {listed} are trainable but belong "
                f"to no adapter. Freeze them (requires_grad_(False)) or save the whole model (save_pretrained).")
        import warnings

        warnings.warn(f"save_adapter writes adapter '{name}' only: the base model's own weights ({listed}) are "
                      f"trainable and are not saved. Call model.train_adapter('{name}') to train the adapter alone.",
                      UserWarning, stacklevel=3)
    os.makedirs(directory, exist_ok=True)
    if use_safetensors:
        from safetensors.torch import save_file

        save_file(tensors, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt", "adapter": name})
    else:
        torch.save(tensors, os.path.join(directory, WEIGHTS_FILE_PT))
    from safetensors.torch import save_file

    if head:
        save_file(head, os.path.join(directory, HEAD_FILE), metadata={"format": "pt"})
        meta["head"] = sorted(head)
    if embeddings:
        save_file(embeddings, os.path.join(directory, EMBEDDINGS_FILE), metadata={"format": "pt"})
        meta["embeddings"] = sorted(embeddings)
    with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=2, sort_keys=True)
    if custom_interface is None:
        from .plugins import registry

        registered = registry.interface(meta["model_type"]) if meta["model_type"] else None
        custom_interface = registered is None or registered != state.interface
    if custom_interface:
        state.interface.save(directory, model_type=meta["model_type"])


def read_native(directory: str) -> LoadedCheckpoint | None:
    """Read a checkpoint written by :func:`save_adapter` (``None`` if ``directory`` is not one)."""
    from .method import AdapterConfig

    config_path = os.path.join(directory, CONFIG_FILE)
    weights = [os.path.join(directory, f) for f in (WEIGHTS_FILE, WEIGHTS_FILE_PT)]
    if not os.path.exists(config_path):
        return None
    meta = read_json(config_path)
    if detect_format(meta) != "native":
        return None  # not ours; another reader may know it
    cfg = meta["config"]
    existing = [w for w in weights if os.path.exists(w)]
    if not existing:
        raise CheckpointError(f"{directory} has {CONFIG_FILE} but no weights file ({WEIGHTS_FILE}).")
    try:
        config = AdapterConfig.load(cfg)
    except (AdapterError, TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{config_path}: the adapter config cannot be used: {exc}") from None
    tensors = read_tensors(existing[0])
    head_path = os.path.join(directory, HEAD_FILE)
    head = read_tensors(head_path) if os.path.exists(head_path) else None
    embeddings_path = os.path.join(directory, EMBEDDINGS_FILE)
    embeddings = read_tensors(embeddings_path) if os.path.exists(embeddings_path) else None
    return LoadedCheckpoint(name=str(meta.get("name") or os.path.basename(os.path.normpath(directory))),
                            config=config, tensors=tensors, meta=meta, head=head, embeddings=embeddings,
                            source=directory)


def _resolve_directory(path: str, **hub_kwargs: Any) -> str:
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise CheckpointError(f"{path} is a file; load_adapter expects the directory that holds {CONFIG_FILE}.")
    from .hub import download_adapter

    return download_adapter(path, **hub_kwargs)


def read_checkpoint(path: str, **hub_kwargs: Any) -> LoadedCheckpoint:
    """Read a checkpoint from a directory or Hub repo id in any supported format."""
    directory = _resolve_directory(path, **hub_kwargs)
    try:  # foreign-format readers register themselves into READERS on import
        import adapters.compat  # noqa: F401
    except ImportError:
        pass
    for reader in [read_native, *READERS]:
        loaded = reader(directory)
        if loaded is not None:
            return loaded
    if not os.path.exists(os.path.join(directory, CONFIG_FILE)):
        inside = sorted(d for d in os.listdir(directory) if os.path.isfile(os.path.join(directory, d, CONFIG_FILE)))
        if inside:  # a training checkpoint (AdapterTrainer) or a save_all_adapters directory
            example = os.path.join(directory, inside[0])
            raise CheckpointError(f"{directory} has no {CONFIG_FILE}: it holds saved adapters in subdirectories "
                                  f"{inside}; load one of them, e.g. load_adapter({example!r}).")
        raise CheckpointError(f"{directory} has no {CONFIG_FILE}; it is not a saved adapter.")
    raise CheckpointError(f"{os.path.join(directory, CONFIG_FILE)} is in no format this installation can read.")


def load_adapter(model: nn.Module, path: str, *, load_as: str | None = None, set_active: bool = False,
                 with_head: bool = True, **hub_kwargs: Any) -> str:
    """Load an adapter into ``model``; return its name. Nothing changes if any check fails."""
    loaded = read_checkpoint(path, **hub_kwargs)
    return apply_checkpoint(model, loaded, load_as=load_as, set_active=set_active, with_head=with_head)


def apply_checkpoint(model: nn.Module, loaded: LoadedCheckpoint, *, load_as: str | None = None,
                     set_active: bool = False, with_head: bool = True) -> str:
    """Add the adapter described by ``loaded`` to ``model`` and fill in its weights (all-or-nothing)."""
    state = _state(model)
    if loaded.resolve is not None:
        loaded = loaded.resolve(model)
    source = loaded.source or "<checkpoint>"
    meta = loaded.meta
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    saved_type = meta.get("model_type")
    if saved_type and model_type and saved_type != model_type:
        raise CheckpointError(
            f"{source}: the adapter was saved from a '{saved_type}' model; this model is '{model_type}'."
        )
    hidden = meta.get("hidden_size")
    if hidden and state.points.hidden_size and hidden != state.points.hidden_size:
        raise CheckpointError(
            f"{source}: the adapter was saved from a model with hidden size {hidden}; this one has "
            f"{state.points.hidden_size}."
        )
    name = load_as or loaded.name
    if name in state.adapters:
        raise CheckpointError(f"This model already has an adapter named '{name}'; pass load_as='other_name'.")
    try:  # add_adapter is all-or-nothing itself; report a config it refuses as a checkpoint problem
        model.add_adapter(name, loaded.config)
    except CheckpointError:
        raise
    except (AdapterError, TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{source}: the saved adapter cannot be added to this model: {exc}") from None
    try:
        _fill(model, name, loaded.tensors, source)
        if with_head and loaded.head:
            _load_head(model, loaded.head, source)
        if loaded.embeddings:
            _load_embeddings(model, loaded.embeddings, source)
    except BaseException:
        model.delete_adapter(name)
        raise
    if set_active:
        model.set_active_adapters(name)
    return name


def _fill(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], source: str) -> None:
    state = _state(model)
    expected = adapter_tensors(model, name)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: the weights do not match the adapter's structure on this model. "
            f"Missing: {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)}); "
            f"unexpected: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)})."
        )
    bad = [(k, tuple(tensors[k].shape), tuple(v.shape)) for k, v in expected.items() if tensors[k].shape != v.shape]
    if bad:
        key, got, want = bad[0]
        raise CheckpointError(f"{source}: tensor '{key}' has shape {list(got)}, but this model needs {list(want)} "
                              f"({len(bad)} mismatched tensor(s)). Was it saved from a different model size?")
    for layer in state.layers(name):
        prefix = f"{layer.location}."
        local = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        own = layer.adapter_state_dict(name)
        layer.load_adapter_state_dict(name, {k: local[k].to(own[k].dtype) for k in own})
    for key, module in state.shared_modules(name).items():
        prefix = f"shared.{key}."
        own = module.state_dict()
        module.load_state_dict({k: tensors[prefix + k].to(own[k].dtype) for k in own})


def _load_head(model: nn.Module, head: dict[str, torch.Tensor], source: str) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    unknown = sorted(set(head) - set(params))
    if unknown:
        raise CheckpointError(f"{source}: head weights {unknown[:5]} do not exist on this model "
                              f"({type(model).__name__}).")
    bad = [k for k in head if params[k].shape != head[k].shape]
    if bad:
        raise CheckpointError(f"{source}: head weight '{bad[0]}' has shape {list(head[bad[0]].shape)}, the model "
                              f"needs {list(params[bad[0]].shape)}.")
    with torch.no_grad():
        for key, tensor in head.items():
            params[key].copy_(tensor.to(params[key].dtype))


def _load_embeddings(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    point = _state(model).points.embeddings
    if point is None:
        raise CheckpointError(f"{source}: the checkpoint holds trained input embeddings, but this model's interface "
                              "names no model_embeddings.")
    own = point.module.state_dict()
    if set(own) != set(tensors) or any(own[k].shape != tensors[k].shape for k in own):
        raise CheckpointError(f"{source}: the saved input embeddings {sorted(tensors)} do not fit this model's "
                              f"({ {k: list(v.shape) for k, v in own.items()} }).")
    with torch.no_grad():
        for key, tensor in tensors.items():
            own[key].copy_(tensor.to(own[key].dtype))


def save_adapter_fusion(model: nn.Module, directory: str, fusion_name: str) -> None:
    """Write an AdapterFusion layer: ``adapter_fusion_config.json`` + ``adapter_fusion.safetensors``."""
    from safetensors.torch import save_file

    from ._version import __version__

    state = _state(model)
    if fusion_name not in state.fusions:
        raise AdapterError(f"No AdapterFusion '{fusion_name}' (have: {sorted(state.fusions)}).")
    fusion = state.fusions[fusion_name]
    tensors = {}
    for location, module in fusion.method.fusion_modules(state, fusion_name).items():
        for key, tensor in module.state_dict().items():
            tensors[f"{location}.{key}"] = tensor.detach().clone().contiguous()
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, FUSION_WEIGHTS_FILE), metadata={"format": "pt"})
    config = fusion.config.to_dict() if hasattr(fusion.config, "to_dict") else fusion.config
    meta = {"name": fusion_name, "adapter_names": fusion.adapter_names, "config": config,
            "method": fusion.method.name, "model_type": getattr(getattr(model, "config", None), "model_type", None),
            "version": __version__}
    with open(os.path.join(directory, FUSION_CONFIG_FILE), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=2, sort_keys=True)


def load_adapter_fusion(model: nn.Module, directory: str, *, load_as: str | None = None,
                        set_active: bool = False) -> str:
    """Load a fusion saved by :func:`save_adapter_fusion`; the fused adapters must already be loaded."""
    state = _state(model)
    config_path = os.path.join(directory, FUSION_CONFIG_FILE)
    if not os.path.exists(config_path):
        raise CheckpointError(f"{directory} has no {FUSION_CONFIG_FILE}; it is not a saved AdapterFusion.")
    meta = read_json(config_path)
    tensors = read_tensors(os.path.join(directory, FUSION_WEIGHTS_FILE))
    names = list(meta.get("adapter_names") or [])
    missing = [n for n in names if n not in state.adapters]
    if missing:
        raise CheckpointError(f"{directory}: the fused adapters {missing} are not on this model; load them first.")
    fusion_name = model.add_adapter_fusion(names, config=meta.get("config"), name=load_as or meta.get("name"))
    try:
        modules = state.fusions[fusion_name].method.fusion_modules(state, fusion_name)
        expected = {f"{loc}.{k}": v for loc, m in modules.items() for k, v in m.state_dict().items()}
        if set(expected) != set(tensors) or any(expected[k].shape != tensors[k].shape for k in expected):
            raise CheckpointError(f"{directory}: the fusion weights do not match the fusion layers of this model.")
        for loc, module in modules.items():
            own = module.state_dict()
            module.load_state_dict({k: tensors[f"{loc}.{k}"].to(own[k].dtype) for k in own})
    except BaseException:
        model.delete_adapter_fusion(fusion_name)
        raise
    if set_active:
        from .composition import Fuse

        model.set_active_adapters(Fuse(*names, name=fusion_name))
    return fusion_name
