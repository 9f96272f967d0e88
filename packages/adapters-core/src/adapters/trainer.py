"""``AdapterTrainer``: a :class:`transformers.Trainer` that trains adapters and checkpoints only them.

Differences from the plain ``Trainer``:

* ``train()`` refuses to start unless some adapter (or AdapterFusion) parameter requires grad, i.e.
  ``model.train_adapter(...)`` / ``model.train_adapter_fusion(...)`` was called first.
* The optimizer sees only trainable parameters (the frozen base model is never handed to it).
* Checkpoints (``checkpoint-N/`` and ``save_model()``) hold only what is trained, in the native
  adapter format: one ``save_adapter`` directory per trained (or active) adapter, one
  ``save_adapter_fusion`` directory per trained (or active) fusion, ``trainable_params.safetensors``
  for any other trainable weight (a task head outside the base model, unfrozen embeddings), and
  ``adapter_trainer.json`` listing them. The full model is never written.
* ``resume_from_checkpoint`` and ``load_best_model_at_end`` copy those weights back into the live
  parameters in place (so optimizer state keeps pointing at them), bit-exactly.

It works with gradient accumulation, ``bf16``/``fp16`` autocast, ``gradient_checkpointing``,
``torch_compile`` and data-parallel training under ``torchrun`` or ``accelerate launch``
(only the main process writes checkpoints). With FSDP use a ``FULL_STATE_DICT`` state-dict type; see
``scripts/train_multi_gpu.py``.

This module imports ``transformers`` (and needs ``accelerate``, as every ``Trainer`` does); ``import
adapters`` does not import it until ``adapters.AdapterTrainer`` is first used.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import logging

from . import checkpoint as ckpt
from .errors import AdapterError, CheckpointError

__all__ = ["AdapterTrainer", "MANIFEST_FILE", "EXTRA_WEIGHTS_FILE", "trainable_components"]

logger = logging.get_logger(__name__)

#: Index of an AdapterTrainer checkpoint directory.
MANIFEST_FILE = "adapter_trainer.json"
#: Trainable weights that belong to no adapter (task heads, unfrozen embeddings), by parameter name.
EXTRA_WEIGHTS_FILE = "trainable_params.safetensors"


@dataclass
class TrainableComponents:
    """What an AdapterTrainer checkpoint holds for a model."""

    adapters: list[str] = field(default_factory=list)
    fusions: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)  # parameter names outside adapters and fusions
    trainable_adapters: list[str] = field(default_factory=list)
    trainable_fusions: list[str] = field(default_factory=list)

    @property
    def anything_trainable(self) -> bool:
        return bool(self.trainable_adapters or self.trainable_fusions)


def _unwrap(model: nn.Module) -> nn.Module:
    """The model that ``adapters.init`` prepared, under DDP / FSDP / ``torch.compile`` wrappers."""
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
    model = _unwrap(model)
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


def _module_paths(model: nn.Module) -> dict[int, str]:
    return {id(m): path for path, m in model.named_modules(remove_duplicate=False)}


def _tensors_from_state_dict(modules: dict[str, nn.Module], paths: dict[int, str],
                             state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for loc, module in modules.items():
        prefix = paths[id(module)]
        for key in module.state_dict():
            out[f"{loc}.{key}"] = state_dict[f"{prefix}.{key}"].detach().cpu().clone().contiguous()
    return out


def _save_adapter_from(model: nn.Module, directory: str, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """``save_adapter`` with given tensor values (same files and metadata)."""
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


def save_components(model: nn.Module, output_dir: str, state_dict: dict[str, torch.Tensor] | None = None) -> dict:
    """Write the trainable/active adapters, fusions and extra trainable weights of ``model`` to ``output_dir``.

    :param state_dict: a full (gathered) state dict of ``model`` to take the values from, as FSDP
        hands to ``Trainer._save``; ``None`` reads the live parameters.
    :returns: the manifest written to ``adapter_trainer.json``.
    """
    from safetensors.torch import save_file

    model = _unwrap(model)
    state = model._adapters_state
    comp = trainable_components(model)
    os.makedirs(output_dir, exist_ok=True)
    paths = _module_paths(model) if state_dict is not None else {}
    manifest: dict[str, Any] = {"adapters": {}, "fusions": {}, "extra": None,
                                "trainable": comp.trainable_adapters + comp.trainable_fusions}
    for name in comp.adapters:
        sub = _dir_name("adapter", name)
        directory = os.path.join(output_dir, sub)
        if state_dict is None:
            model.save_adapter(directory, name)
        else:  # the live values may be shards (FSDP): write the gathered ones
            _save_adapter_from(model, directory, name,
                               _tensors_from_state_dict(dict(state.adapter_modules(name)), paths, state_dict))
        manifest["adapters"][name] = sub
    for fusion in comp.fusions:
        sub = _dir_name("fusion", fusion)
        directory = os.path.join(output_dir, sub)
        model.save_adapter_fusion(directory, fusion)
        if state_dict is not None:
            modules = state.fusions[fusion].method.fusion_modules(state, fusion)
            save_file(_tensors_from_state_dict(modules, paths, state_dict),
                      os.path.join(directory, ckpt.FUSION_WEIGHTS_FILE), metadata={"format": "pt"})
        manifest["fusions"][fusion] = sub
    if comp.extra:
        params = dict(model.named_parameters())
        source = state_dict if state_dict is not None else {k: params[k] for k in comp.extra}
        extra = {k: source[k].detach().cpu().clone().contiguous() for k in comp.extra}
        save_file(extra, os.path.join(output_dir, EXTRA_WEIGHTS_FILE), metadata={"format": "pt"})
        manifest["extra"] = EXTRA_WEIGHTS_FILE
    with open(os.path.join(output_dir, MANIFEST_FILE), "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=True)
    return manifest


def restore_components(model: nn.Module, checkpoint_dir: str) -> dict:
    """Copy the weights of an AdapterTrainer checkpoint back into ``model`` in place.

    Adapters and fusions that exist on the model are overwritten (their parameters keep their
    identity, so an optimizer holding them stays valid); missing ones are added from the checkpoint.
    """
    from safetensors.torch import load_file

    model = _unwrap(model)
    state = model._adapters_state
    manifest_path = os.path.join(checkpoint_dir, MANIFEST_FILE)
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"{checkpoint_dir} has no {MANIFEST_FILE}; it is not an AdapterTrainer checkpoint.")
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


class AdapterTrainer(Trainer):
    """A ``transformers.Trainer`` for models prepared with ``adapters.init``.

    Usage::

        model.add_adapter("math", config=LoRAConfig(r=8))
        model.train_adapter("math")              # freeze the base model, train "math"
        trainer = AdapterTrainer(model=model, args=TrainingArguments(...), train_dataset=ds)
        trainer.train()
        model.save_adapter("out/math", "math")

    Takes exactly the arguments of ``transformers.Trainer``. See the module docstring for what
    changes: refusal without trainable adapters, optimizer over trainable parameters only,
    adapter-only checkpoints, exact resume and best-model reload.
    """

    def __init__(self, model: nn.Module | None = None, args: Any = None, **kwargs: Any) -> None:
        if model is None:
            raise AdapterError("AdapterTrainer needs a model prepared with adapters.init(model) (model_init is "
                               "not supported).")
        _unwrap(model)  # clear error early when adapters.init was not called
        super().__init__(model=model, args=args, **kwargs)
        gc_kwargs = self.args.gradient_checkpointing_kwargs or {}
        if self.args.gradient_checkpointing and gc_kwargs.get("use_reentrant", False):
            # reentrant checkpointing drops gradients of adapters inside checkpointed blocks when no input
            # of the block requires grad (the base model is frozen); make the embeddings' output require it
            enable = getattr(_unwrap(model), "enable_input_require_grads", None)
            if enable is not None:
                enable()

    # ------------------------------------------------------------------ checks
    @property
    def adapter_model(self) -> nn.Module:
        """The ``adapters.init``-prepared model under any wrapper."""
        return _unwrap(self.model)

    def _check_trainable(self) -> None:
        model = self.adapter_model
        comp = trainable_components(model)
        if not comp.anything_trainable:
            summary = model.adapter_summary()
            raise AdapterError(
                "AdapterTrainer: no adapter is set to be trained (no adapter or AdapterFusion parameter requires "
                "grad). Call model.train_adapter('<name>') (or model.train_adapter_fusion(Fuse(...))) before "
                f"training. Adapters on the model:\n{summary}"
            )
        if self.args.fp16:
            half = [n for n, p in model.named_parameters() if p.requires_grad and p.dtype == torch.float16]
            if half:
                raise AdapterError(
                    f"fp16=True uses a gradient scaler, which cannot unscale float16 trainable weights ({half[0]}, "
                    "...). Keep the adapters in float32 (config dtype='float32' or model.adapter_to(name, "
                    "dtype=torch.float32)) or use bf16=True."
                )

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """Run training (see ``transformers.Trainer.train``); refuses to start without a trainable adapter."""
        self._check_trainable()
        return super().train(*args, **kwargs)

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Build the optimizer over trainable parameters only (the frozen base model never enters it)."""
        if self.optimizer is None:
            self._check_trainable()
        return super().create_optimizer(model) if model is not None else super().create_optimizer()

    # ------------------------------------------------------------------ checkpoints
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write adapters (+ fusions, + other trainable weights) in the native format; main process only."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        logger.info(f"Saving adapter checkpoint to {output_dir}")
        save_components(self.model, output_dir, state_dict=state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Restore the adapter weights of a checkpoint written by :meth:`_save`, in place."""
        logger.info(f"Loading adapters from {resume_from_checkpoint}.")
        restore_components(model if model is not None else self.model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        """Reload the adapters of the best checkpoint (``load_best_model_at_end=True``)."""
        best = self.state.best_model_checkpoint
        logger.info(f"Loading best adapters from {best} (score: {self.state.best_metric}).")
        restore_components(self.model, best)
