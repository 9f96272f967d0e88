"""Foreign checkpoint formats, dispatched to the method plugins that know them.

Core knows no method's tensors: it recognises a directory's format with one rule
(:func:`adapters.checkpoint_io.detect_format`: native, PEFT, AdapterHub 1.x) and asks the installed
methods that declare a reader for that format (``AdapterMethod.formats``, found through
``adapters.formats`` entry points) to read it; the first that recognises it wins. Writing a foreign
format (``save_adapter(..., format="peft")``) goes to the writer of the adapter's method. The readers
and writers of our formats live in ``adapters_lora.peft_format`` (PEFT LoRA / DoRA / IA3),
``adapters_lora.formats`` (AdapterHub LoRA / IA3), ``adapters_vera.formats`` (PEFT VeRA),
``adapters_bottleneck.formats`` and ``adapters_reft.formats`` (AdapterHub), ``adapters_prompt`` (PEFT and
AdapterHub prompt / prefix tuning); helpers they share are in :mod:`adapters.foreign`.
"""

from __future__ import annotations

import os

from torch import nn

from ..checkpoint_io import CONFIG_FILE, READERS, LoadedCheckpoint, detect_format, read_json
from ..errors import AdapterError, CheckpointError
from ..plugins import registry

__all__ = ["read_foreign", "save_foreign"]

_NAMES = {"peft": "PEFT", "adapterhub": "AdapterHub adapters 1.x"}


def read_foreign(directory: str) -> LoadedCheckpoint | None:
    """The checkpoint in ``directory`` if it is in a foreign format an installed method reads, else
    ``None`` (not a foreign format); a :class:`CheckpointError` when no installed method reads it."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    meta = read_json(path)
    kind = detect_format(meta)
    if kind not in _NAMES:
        return None
    handlers = [(method, reader) for method, reader, _ in registry.format_handlers(kind) if reader is not None]
    for _, reader in handlers:
        loaded = reader(directory)
        if loaded is not None:
            return loaded
    readers = ", ".join(f"{m.name} ({m.distribution})" for m, _ in handlers) or "none installed"
    detail = meta.get("config", {})
    what = ""
    if kind == "adapterhub" and isinstance(detail, dict):
        what = f" (architecture {detail.get('architecture')!r})"
    raise CheckpointError(f"{path}: a {_NAMES[kind]} checkpoint{what} that no installed method reads (readers of "
                          f"{_NAMES[kind]}: {readers}). LoRA / IA3 / DoRA need adapters-lora, VeRA adapters-vera, "
                          "bottleneck adapters adapters-bottleneck, ReFT adapters-reft, prompt and prefix tuning "
                          "adapters-prompt.")


def save_foreign(model: nn.Module, directory: str, name: str, format: str) -> None:
    """Write adapter ``name`` of ``model`` to ``directory`` in the foreign ``format`` (``"peft"``)."""
    record = model._adapters_state.record(name)
    writers = {m.name: writer for m, _, writer in registry.format_handlers(format) if writer is not None}
    if not writers:
        known = sorted({kind for kind in _NAMES if any(w for _, _, w in registry.format_handlers(kind))})
        raise AdapterError(f"Unknown checkpoint format {format!r}: no installed method writes it (formats: "
                           f"'native'{''.join(f', {k!r}' for k in known)}).")
    methods = [m.name for m in record.methods]
    usable = [writers[m] for m in methods if m in writers]
    if len(methods) != 1 or not usable:
        raise AdapterError(f"Adapter '{name}' ({' + '.join(methods)}) cannot be written in "
                           f"{_NAMES.get(format, format)}'s format: that format holds adapters of "
                           f"{sorted(writers)} only.")
    usable[0](model, directory, name)


if read_foreign not in READERS:
    READERS.append(read_foreign)
