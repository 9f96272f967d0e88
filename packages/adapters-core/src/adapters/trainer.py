"""``AdapterTrainer``: a :class:`transformers.Trainer` that trains adapters and checkpoints only them.

Differences from the plain ``Trainer``:

* ``train()`` refuses to start unless some adapter (or AdapterFusion) parameter requires grad, i.e.
  ``model.train_adapter(...)`` / ``model.train_adapter_fusion(...)`` was called first.
* The optimizer sees only trainable parameters (the frozen base model is never handed to it).
* Checkpoints (``checkpoint-N/`` and ``save_model()``) hold only what is trained, in the native
  adapter format: one ``save_adapter`` directory per trained (or active) adapter, one
  ``save_adapter_fusion`` directory per trained (or active) fusion, ``trainable_params.safetensors``
  for any other trainable weight (a task head outside the base model, unfrozen embeddings), and
  ``adapter_trainer.json`` listing them. The full model is never written. The format and its writer and
  reader live in :mod:`adapters.trainer_checkpoints`, shared with the adapter model's ``save_pretrained``,
  through which a plain ``transformers.Trainer`` (or TRL's ``SFTTrainer``) writes the same checkpoints.
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

import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import logging

from .errors import AdapterError

# the checkpoint format is shared with the adapter model's save_pretrained (any transformers.Trainer)
from .trainer_checkpoints import (
    EXTRA_WEIGHTS_FILE,
    MANIFEST_FILE,
    TrainableComponents,
    restore_components,
    save_components,
    trainable_components,
)
from .trainer_checkpoints import unwrap as _unwrap

__all__ = ["AdapterTrainer", "MANIFEST_FILE", "EXTRA_WEIGHTS_FILE", "TrainableComponents", "trainable_components",
           "save_components", "restore_components"]

logger = logging.get_logger(__name__)


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
