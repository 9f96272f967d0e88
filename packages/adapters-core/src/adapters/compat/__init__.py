"""Readers and writers for foreign checkpoint formats: PEFT LoRA/DoRA and AdapterHub ``adapters`` 1.x.

Importing this package registers its readers in :data:`adapters.checkpoint.READERS` (core imports it
lazily on the first :func:`~adapters.checkpoint.read_checkpoint`), so ``model.load_adapter(dir)``
accepts these directories as they are. ``model.save_adapter(dir, name, format="peft")`` writes PEFT's
format through :func:`save_foreign`.

What was verified, and how:

* PEFT: against the real ``peft`` package (0.21): PEFT-made LoRA and DoRA adapters on tiny llama /
  qwen3 / bert / gpt2 models load here with the same outputs, and our exports load in PEFT with the same
  outputs (``tests/test_compat_peft.py``; small fixtures in ``tests/data/compat/`` keep the test
  meaningful where ``peft`` is not installed).
* AdapterHub 1.x: fixtures written by the real ``adapters`` package (see
  ``scripts/make_reference_checkpoints.py``), with its recorded outputs on fixed inputs.
* The Hub (:mod:`adapters.hub`): loading goes through ``huggingface_hub.snapshot_download`` and was
  tried only offline, against a cache directory in the hub's on-disk layout; pushing was tried only
  against a stand-in ``HfApi`` object. Neither was run against the real huggingface.co service.
"""

from __future__ import annotations

from torch import nn

from ..checkpoint_io import READERS
from ..errors import AdapterError
from .adapterhub import read_adapterhub
from .peft import read_peft, save_peft

__all__ = ["FORMATS", "read_peft", "save_peft", "read_adapterhub", "save_foreign"]

#: Writers by ``format=`` name.
FORMATS = {"peft": save_peft}

for _reader in (read_peft, read_adapterhub):
    if _reader not in READERS:
        READERS.append(_reader)


def save_foreign(model: nn.Module, directory: str, name: str, format: str) -> None:
    """Write adapter ``name`` of ``model`` to ``directory`` in a foreign ``format`` (``"peft"``)."""
    writer = FORMATS.get(format)
    if writer is None:
        raise AdapterError(f"Unknown checkpoint format {format!r}; known: ['native', {', '.join(map(repr, FORMATS))}].")
    writer(model, directory, name)
