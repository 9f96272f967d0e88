"""Training checkpoints that hold only what trains: written and read back in place.

One format, two writers: :class:`adapters.AdapterTrainer` (its own ``_save``), and the adapter model's
``save_pretrained`` (:func:`save_pretrained`), through which ``transformers.Trainer`` and every subclass
that keeps its ``_save`` (TRL's ``SFTTrainer`` among them) write ``checkpoint-N/`` and ``save_model()``.

A checkpoint directory holds:

* ``adapter_trainer.json``: the manifest (``adapters``: name → directory, ``fusions``: name →
  directory, ``extra``: the file of other trained weights or ``null``, ``trainable``: what trained).
* one ``save_adapter`` directory per trained or active adapter (``adapter_config.json``,
  ``adapter.safetensors``, ``head.safetensors`` ...). ``AdapterTrainer`` writes ``<name>/``;
  ``save_pretrained`` writes the checkpoint directory itself when it holds one adapter and no fusion
  (``load_adapter(checkpoint)`` then works), ``<name>/`` otherwise.
* one ``fusion-<name>/`` directory per trained or active AdapterFusion.
* ``trainable_params.safetensors``: trained weights outside adapters (task heads, unfrozen
  embeddings) under their parameter names.
* ``save_pretrained`` only: ``model.safetensors.index.json`` naming ``resume_weights.safetensors`` (the
  adapter and fusion tensors under the model's state-dict keys) and ``trainable_params.safetensors``, so
  the Trainer's own ``_load_from_checkpoint`` / ``_load_best_model`` (``load_sharded_checkpoint``) copy
  the trained weights into the live parameters in place. The frozen base model is not stored.

Reading back (:func:`restore_components`) copies into the live tensors, so an optimizer holding them
stays valid and a resumed run continues bit for bit.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import checkpoint as ckpt
from .errors import AdapterError, CheckpointError

__all__ = ["MANIFEST_FILE", "EXTRA_WEIGHTS_FILE", "RESUME_WEIGHTS_FILE", "RESUME_INDEX_FILE", "TrainableComponents",
           "unwrap", "trainable_components", "adapters_in_training", "save_components", "restore_components",
           "save_pretrained"]

logger = logging.getLogger(__name__)

#: Index of a checkpoint directory.
MANIFEST_FILE = "adapter_trainer.json"
#: Trainable weights that belong to no adapter (task heads, unfrozen embeddings), by parameter name.
EXTRA_WEIGHTS_FILE = "trainable_params.safetensors"
#: The adapter and fusion tensors under the model's own state-dict keys (what the Trainer's resume reads).
RESUME_WEIGHTS_FILE = "resume_weights.safetensors"
#: transformers' ``SAFE_WEIGHTS_INDEX_NAME``: the file ``Trainer._load_from_checkpoint`` looks for.
RESUME_INDEX_FILE = "model.safetensors.index.json"


@dataclass
class TrainableComponents:
    """What a checkpoint of a model holds."""

    adapters: list[str] = field(default_factory=list)
    fusions: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)  # parameter names outside adapters and fusions
    trainable_adapters: list[str] = field(default_factory=list)
    trainable_fusions: list[str] = field(default_factory=list)

    @property
    def anything_trainable(self) -> bool:
        return bool(self.trainable_adapters or self.trainable_fusions)


def unwrap(model: nn.Module) -> nn.Module:
    """The model that ``adapters.init`` prepared, under DDP / FSDP / ``torch.compile`` wrappers.

    :raises AdapterError: no model prepared with ``adapters.init`` under the wrappers.
    """
    seen = 0
    while not hasattr(model, "_adapters_state"):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None or seen > 8:
            raise AdapterError(
                f"AdapterTrainer needs a model prepared with adapters.init(model); got {type(model).__name__}."
            )
        model, seen = inner, seen + 1
    return model


def _active_names(model: nn.Module) -> tuple[list[str], list[str]]:
    from . import composition as ac

    state = model._adapters_state
    active = state.active
    if active is None:
        return [], []
    if isinstance(active, str):
        return [active], []
    fusions: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, str):
            return
        if isinstance(node, ac.Fuse) and node.fusion_name in state.fusions:
            fusions.append(node.fusion_name)
        for child in node.children:
            visit(child)

    visit(active)
    return list(active.flatten()), fusions


def trainable_components(model: nn.Module) -> TrainableComponents:
    """Which adapters, fusions and other weights of ``model`` a checkpoint must hold.

    Adapters and fusions are saved when they are trainable or active; other parameters only when
    they require grad (frozen base weights are never saved).
    """
    model = unwrap(model)
    state = model._adapters_state
    out = TrainableComponents()
    owned: set[int] = set()
    for name in state.adapters:
        params = state.adapter_parameters(name)
        owned.update(id(p) for p in params)
        if any(p.requires_grad for p in params):
            out.trainable_adapters.append(name)
    for fusion in state.fusions:
        params = state.fusion_parameters(fusion)
        owned.update(id(p) for p in params)
        if any(p.requires_grad for p in params):
            out.trainable_fusions.append(fusion)
    active_adapters, active_fusions = _active_names(model)
    out.adapters = [n for n in state.adapters if n in out.trainable_adapters or n in active_adapters]
    out.fusions = [f for f in state.fusions if f in out.trainable_fusions or f in active_fusions]
    out.extra = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in owned]
    return out


def adapters_in_training(model: nn.Module) -> bool:
    """Whether ``model``'s adapters train alone: a ``train_adapter`` / ``train_adapter_fusion`` setup is in
    force and some adapter or fusion parameter requires grad (the base model is then frozen, and an
    adapter checkpoint holds every trained weight)."""
    model = unwrap(model)
    return model._adapters_state.training is not None and trainable_components(model).anything_trainable


# ------------------------------------------------------------------------------------------ tensors
def _dir_name(kind: str, name: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_+" else "_" for c in name)
    return safe if kind == "adapter" else f"fusion-{safe}"


def _copy_into(target: torch.Tensor, source: torch.Tensor) -> None:
    """Copy ``source`` (a full tensor) into the live ``target`` in place; DTensor shards (FSDP2) too."""
    try:
        from torch.distributed.tensor import DTensor, distribute_tensor
    except ImportError:  # pragma: no cover - torch without distributed
        DTensor = ()  # type: ignore[assignment]
    with torch.no_grad():
        if isinstance(target, DTensor):
            full = source.to(device=target.device_mesh.device_type, dtype=target.dtype)
            target.copy_(distribute_tensor(full, target.device_mesh, target.placements))
        else:
            target.copy_(source.to(device=target.device, dtype=target.dtype))


def _fill_modules(modules: dict[str, nn.Module], tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``tensors`` (keys ``location.param``) into the parameters and buffers of ``modules`` in place."""
    targets = {f"{loc}.{k}": v for loc, m in modules.items() for k, v in m.state_dict(keep_vars=True).items()}
    missing = sorted(set(targets) - set(tensors))
    unexpected = sorted(set(tensors) - set(targets))
    if missing or unexpected:
        raise CheckpointError(f"{source}: checkpoint does not match the model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}).")
    for key, target in targets.items():
        if tuple(target.shape) != tuple(tensors[key].shape):
            raise CheckpointError(f"{source}: '{key}' has shape {list(tensors[key].shape)}, the model needs "
                                  f"{list(target.shape)}.")
    for key, target in targets.items():
        _copy_into(target, tensors[key])


def _model_keys(model: nn.Module) -> dict[int, str]:
    """``id`` of every tensor in ``model.state_dict()`` → its first key there."""
    keys: dict[int, str] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        keys.setdefault(id(tensor), key)
    return keys


def _by_model_key(model: nn.Module, modules: dict[str, nn.Module], keys: dict[int, str],
                  state_dict: dict[str, torch.Tensor] | None) -> dict[str, tuple[str, torch.Tensor]]:
    """``location.param`` → (the model's state-dict key, the value: ``state_dict``'s, else the live one)."""
    out = {}
    for loc, module in modules.items():
        for key, tensor in module.state_dict(keep_vars=True).items():
            full = keys.get(id(tensor))
            if full is None:
                raise CheckpointError(f"'{loc}.{key}' is not in the state dict of {type(model).__name__}; it cannot "
                                      "be checkpointed.")
            if state_dict is not None and full not in state_dict:
                raise CheckpointError(f"The state dict handed to the checkpoint writer has no '{full}'.")
            value = state_dict[full] if state_dict is not None else tensor
            out[f"{loc}.{key}"] = (full, value.detach().cpu().clone().contiguous())
    return out


def _save_adapter_from(model: nn.Module, directory: str, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """``save_adapter`` with given tensor values (same files and metadata, no head)."""
    from safetensors.torch import save_file

    from .plugins import registry

    state = model._adapters_state
    meta = ckpt._meta(model, name)
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, ckpt.WEIGHTS_FILE), metadata={"format": "pt", "adapter": name})
    with open(os.path.join(directory, ckpt.CONFIG_FILE), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=2, sort_keys=True)
    registered = registry.interface(meta["model_type"]) if meta["model_type"] else None
    if registered is None or registered != state.interface:
        state.interface.save(directory, model_type=meta["model_type"])


# ------------------------------------------------------------------------------------------ writing
def save_components(model: nn.Module, output_dir: str, state_dict: dict[str, torch.Tensor] | None = None, *,
                    flat: bool = False, resume_index: bool = False, beside_full_model: bool = False) -> dict:
    """Write the trainable/active adapters, fusions and extra trainable weights of ``model`` to ``output_dir``.

    :param state_dict: a full (gathered) state dict of ``model`` to take the values from, as FSDP
        hands to ``Trainer._save``; ``None`` reads the live parameters.
    :param flat: one adapter and no fusion: write the adapter into ``output_dir`` itself.
    :param resume_index: also write ``model.safetensors.index.json`` and ``resume_weights.safetensors``
        for ``transformers.Trainer``'s own resume.
    :param beside_full_model: the full model is written to ``output_dir`` too: skip merged adapters
        (the weights hold them), heads and other trained weights (the model file holds them).
    :returns: the manifest written to ``adapter_trainer.json``.
    :raises AdapterError: ``model`` was not prepared with ``adapters.init``; ``save_adapter`` refuses (a
        trainable base weight that no file would hold).
    :raises CheckpointError: ``state_dict`` lacks a tensor to write.
    """
    from safetensors.torch import save_file

    model = unwrap(model)
    state = model._adapters_state
    comp = trainable_components(model)
    if beside_full_model:
        comp.adapters = [n for n in comp.adapters if n not in state.merged]
        comp.extra = []
    os.makedirs(output_dir, exist_ok=True)
    keys = _model_keys(model) if state_dict is not None or resume_index else {}
    manifest: dict[str, Any] = {"adapters": {}, "fusions": {}, "extra": None,
                                "trainable": comp.trainable_adapters + comp.trainable_fusions}
    resume: dict[str, torch.Tensor] = {}
    single = flat and len(comp.adapters) == 1 and not comp.fusions
    for name in comp.adapters:
        sub = "." if single else _dir_name("adapter", name)
        directory = os.path.normpath(os.path.join(output_dir, sub))
        modules = dict(state.adapter_modules(name))
        values = _by_model_key(model, modules, keys, state_dict) if keys else {}
        if state_dict is None and not beside_full_model:
            model.save_adapter(directory, name)  # the adapter with its head, as save_adapter writes it
        else:  # the live values may be shards (FSDP): write the gathered ones
            tensors = {k: v for k, (_, v) in values.items()} or ckpt.adapter_tensors(model, name)
            _save_adapter_from(model, directory, name, tensors)
        resume.update(dict(values.values()))
        manifest["adapters"][name] = sub
    for fusion in comp.fusions:
        sub = _dir_name("fusion", fusion)
        directory = os.path.join(output_dir, sub)
        model.save_adapter_fusion(directory, fusion)
        modules = state.fusions[fusion].method.fusion_modules(state, fusion)
        values = _by_model_key(model, modules, keys, state_dict) if keys else {}
        if state_dict is not None:
            save_file({k: v for k, (_, v) in values.items()}, os.path.join(directory, ckpt.FUSION_WEIGHTS_FILE),
                      metadata={"format": "pt"})
        resume.update(dict(values.values()))
        manifest["fusions"][fusion] = sub
    extra: dict[str, torch.Tensor] = {}
    if comp.extra:
        params = dict(model.named_parameters())
        source = state_dict if state_dict is not None else {k: params[k] for k in comp.extra}
        extra = {k: source[k].detach().cpu().clone().contiguous() for k in comp.extra}
        save_file(extra, os.path.join(output_dir, EXTRA_WEIGHTS_FILE), metadata={"format": "pt"})
        manifest["extra"] = EXTRA_WEIGHTS_FILE
    if resume_index:
        _write_resume_index(output_dir, resume, extra)
    with open(os.path.join(output_dir, MANIFEST_FILE), "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=True)
    return manifest


def _write_resume_index(output_dir: str, resume: dict[str, torch.Tensor], extra: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(resume, os.path.join(output_dir, RESUME_WEIGHTS_FILE), metadata={"format": "pt"})
    weight_map = {**{k: RESUME_WEIGHTS_FILE for k in resume}, **{k: EXTRA_WEIGHTS_FILE for k in extra}}
    size = sum(t.numel() * t.element_size() for t in [*resume.values(), *extra.values()])
    index = {"metadata": {"total_size": size, "adapters": "trained weights only; the frozen base model is not stored. "
                          f"Load with adapters: load_adapter / {MANIFEST_FILE}."},
             "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(output_dir, RESUME_INDEX_FILE), "w", encoding="utf-8") as fh:
        json.dump(index, fh, indent=2)


# ------------------------------------------------------------------------------------------ reading
def restore_components(model: nn.Module, checkpoint_dir: str) -> dict:
    """Copy the weights of a checkpoint written by :func:`save_components` back into ``model`` in place.

    Adapters and fusions that exist on the model are overwritten (their parameters keep their
    identity, so an optimizer holding them stays valid); missing ones are added from the checkpoint.

    :raises CheckpointError: ``checkpoint_dir`` has no ``adapter_trainer.json``, or its files do not fit
        the model (names, keys, shapes).
    """
    from safetensors.torch import load_file

    model = unwrap(model)
    state = model._adapters_state
    manifest_path = os.path.join(checkpoint_dir, MANIFEST_FILE)
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"{checkpoint_dir} has no {MANIFEST_FILE}; it is not an adapter training checkpoint.")
    with open(manifest_path, encoding="utf-8") as fh:
        manifest = json.load(fh)
    # read everything first, then apply: a bad checkpoint leaves the model untouched where possible
    loaded = {name: ckpt.read_checkpoint(os.path.join(checkpoint_dir, sub))
              for name, sub in manifest.get("adapters", {}).items()}
    for name, data in loaded.items():
        directory = os.path.join(checkpoint_dir, manifest["adapters"][name])
        if name in state.adapters:
            _fill_modules(dict(state.adapter_modules(name)), data.tensors, directory)
        else:
            logger.warning(f"Adapter '{name}' from {directory} is not on the model; adding it.")
            ckpt.apply_checkpoint(model, data, with_head=False)
    for fusion, sub in manifest.get("fusions", {}).items():
        directory = os.path.join(checkpoint_dir, sub)
        if fusion in state.fusions:
            tensors = ckpt.read_tensors(os.path.join(directory, ckpt.FUSION_WEIGHTS_FILE))
            _fill_modules(state.fusions[fusion].method.fusion_modules(state, fusion), tensors, directory)
        else:
            model.load_adapter_fusion(directory)
    if manifest.get("extra"):
        extra = load_file(os.path.join(checkpoint_dir, manifest["extra"]))
        params = dict(model.named_parameters(remove_duplicate=False))
        unknown = sorted(set(extra) - set(params))
        if unknown:
            raise CheckpointError(f"{checkpoint_dir}: weights {unknown[:3]} do not exist on this model.")
        for key, tensor in extra.items():
            _copy_into(params[key], tensor)
    return manifest


# ------------------------------------------------------------------------------------------ save_pretrained
def save_pretrained(model: nn.Module, original_save: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """``save_pretrained`` of a model prepared with ``adapters.init`` (the adapter class calls this).

    * No adapter or fusion: ``original_save`` (transformers' ``save_pretrained``) alone.
    * Adapters training alone (:func:`adapters_in_training`; so also every checkpoint a Trainer writes
      of such a model): the adapter checkpoint only (:func:`save_components` with ``flat=True`` and the
      resume index), no ``config.json`` and no base weights. ``state_dict`` (the Trainer's gathered
      values) and ``is_main_process`` are honoured; the other arguments concern the full model's files
      and are ignored.
    * Otherwise (the whole model trains, or adapters are only loaded or merged): the full model as
      transformers writes it, with a ``UserWarning`` (plain transformers ignores the adapter tensors in
      it), and the unmerged trained or active adapters beside it as adapter directories.

    :raises AdapterError: ``push_to_hub=True`` while the adapters train (push with
        ``push_adapter_to_hub``), or what :func:`save_components` raises.
    """
    state = model._adapters_state
    if not state.adapters and not state.fusions:
        return original_save(model, *args, **kwargs)
    directory = args[0] if args else kwargs.get("save_directory")
    main = kwargs.get("is_main_process", True)
    if adapters_in_training(model):
        if kwargs.get("push_to_hub"):
            raise AdapterError("save_pretrained(push_to_hub=True) of a model whose adapters train writes an adapter "
                               "checkpoint; upload an adapter with model.push_adapter_to_hub(repo_id, name).")
        if main:
            logger.info(f"save_pretrained: adapters train alone; writing the adapter checkpoint to {directory}.")
            save_components(model, os.fspath(directory), kwargs.get("state_dict"), flat=True, resume_index=True)
        return None
    merged = sorted(state.merged)
    warnings.warn(
        f"save_pretrained writes the full model with the tensors of adapters {sorted(state.adapters)} under keys plain "
        "transformers ignores (it loads the base model alone)"
        + (f"; merged adapters {merged} are folded into its weights" if merged else "")
        + ". The unmerged active or trained adapters are written beside it (load_adapter). For a plain model with "
        "the adapters folded in: model.merge_and_unload().save_pretrained(...); to checkpoint adapters alone, train "
        "them with model.train_adapter(...).", UserWarning, stacklevel=3)
    result = original_save(model, *args, **kwargs)
    comp = trainable_components(model)
    if main and ([n for n in comp.adapters if n not in state.merged] or comp.fusions):
        save_components(model, os.fspath(directory), kwargs.get("state_dict"), beside_full_model=True)
    return result
