"""A merged export: an adapter folded into its base model and written as a plain transformers checkpoint.

:func:`export_merged` is what ``adapters export-merged ADAPTER_DIR OUT`` runs. It reads the adapter
(native, PEFT or AdapterHub 1.x, whatever :func:`adapters.load_adapter` reads), loads the base model
with ``from_pretrained`` in float32, loads the adapter into it (trained head and input embeddings
included), calls :func:`adapters.merging.merge_and_unload` and writes ``save_pretrained``'s files
(``model.safetensors``, ``config.json``, ``generation_config.json`` for generative models) plus the
base model's tokenizer files into ``OUT``. ``transformers.AutoModel*.from_pretrained(OUT)`` then
gives the merged model without any adapters code.

Everything is checked before ``OUT`` is touched: a method that cannot merge, a base model of
another type, a task head the merged checkpoint would hold with random weights. Files are written
to a temporary directory beside ``OUT`` and moved into place at the end, so a failed export leaves
``OUT`` as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .errors import AdapterError

__all__ = ["export_merged", "ExportError", "ExportResult", "DTYPES", "TOKENIZER_FILES", "task_of_class",
           "model_class_for"]

#: ``--dtype`` choices: the dtype of the written weights (the merge itself runs in float32).
DTYPES = ("float32", "bfloat16", "float16")
#: Files copied from the base model beside the weights, when it has them (tokenizer, chat template,
#: image processor).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
                   "preprocessor_config.json", "processor_config.json")
#: PEFT's ``task_type`` -> the task (:data:`adapters.testing.TASKS`) whose Auto class builds the model.
PEFT_TASKS = {"CAUSAL_LM": "causal_lm", "SEQ_CLS": "seq_cls", "SEQ_2_SEQ_LM": "seq2seq_lm",
              "FEATURE_EXTRACTION": "base"}
#: Weight files of an earlier export that ``overwrite=True`` removes from ``OUT`` (stale shards would
#: otherwise be read together with the new weights).
_WEIGHT_PREFIXES = ("model.safetensors", "model-", "pytorch_model")


class ExportError(AdapterError):
    """The export cannot be carried out; ``OUT`` is left as it was."""


@dataclass
class ExportResult:
    """What :func:`export_merged` wrote."""

    out: str
    adapter: str
    model_class: str
    dtype: str
    files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- model class
def task_of_class(model_class: str | None) -> str | None:
    """The task (a key of :data:`adapters.testing.TASKS`) whose head ``model_class`` carries:
    ``BertForSequenceClassification`` -> ``"seq_cls"``; ``None`` for a class without a known head."""
    from . import testing

    if not model_class:
        return None
    for task, auto_name in testing.TASKS.items():
        suffix = auto_name.removeprefix("AutoModel")
        if suffix and model_class.endswith(suffix):
            return task
    return None


def _transformers_class(name: str | None, model_type: str | None) -> Any:
    """``transformers.<name>`` when it is a model class for ``model_type``, else ``None``."""
    import transformers

    if not name or not name.isidentifier():
        return None
    try:
        cls = getattr(transformers, name, None)
    except Exception:  # noqa: BLE001 - transformers' lazy module may fail to import an optional model
        return None
    config_class = getattr(cls, "config_class", None)
    if not isinstance(cls, type) or not hasattr(cls, "from_pretrained"):
        return None
    return cls if getattr(config_class, "model_type", None) == model_type else None


def model_class_for(meta: dict[str, Any], has_head: bool, config: Any, task: str | None = None) -> tuple[Any, str]:
    """The class that loads the base model for an adapter, and why: ``task`` when given (its Auto
    class), else the class the adapter was saved from (``model_class``; PEFT's ``auto_mapping``) when
    transformers has it for this model type, else PEFT's ``task_type``, else the task of a saved head's
    class name (:func:`task_of_class`, as ``adapters convert`` infers it), else the base model's own
    class (``config.architectures``), else ``AutoModel``."""
    import transformers

    from . import testing

    def auto(name: str) -> Any:
        return getattr(transformers, testing.TASKS[name])

    if task is not None:
        return auto(task), f"--task {task}"
    peft = meta.get("peft_config") or {}
    recorded = meta.get("model_class") or (peft.get("auto_mapping") or {}).get("base_model_class")
    cls = _transformers_class(recorded, config.model_type)
    if cls is not None:
        return cls, "the class the adapter was saved from"
    peft_task = PEFT_TASKS.get(str(peft.get("task_type")))
    if peft_task is not None:
        return auto(peft_task), f"PEFT task_type {peft.get('task_type')}"
    head_task = task_of_class(recorded) if has_head else None
    if head_task is not None:
        return auto(head_task), f"the adapter carries a {recorded} head"
    for arch in getattr(config, "architectures", None) or []:
        cls = _transformers_class(arch, config.model_type)
        if cls is not None:
            return cls, "the base model's own class (config.architectures)"
    return transformers.AutoModel, "no class recorded anywhere: the bare model"


# ---------------------------------------------------------------------------------------------- checks
def recorded_base(meta: dict[str, Any]) -> str | None:
    """The base model an adapter's config names (native / AdapterHub ``model_name``, PEFT
    ``base_model_name_or_path``), if any."""
    name = meta.get("model_name") or (meta.get("peft_config") or {}).get("base_model_name_or_path")
    return str(name) if name else None


def _refuse_unmergeable(config: Any, name: str) -> None:
    from .plugins import registry

    if config is None:
        return
    for single in config.configs:
        method = registry.method_for_config(single)
        if method.can_merge:
            continue
        what = (type(method).__doc__ or "").strip().splitlines()[0].rstrip(".") if type(method).__doc__ else ""
        raise ExportError(
            f"adapter '{name}' uses {type(single).__name__} of method '{method.name}' ({method.distribution}"
            f"{': ' + what if what else ''}), which cannot be merged into the base weights: its adapters are "
            f"computations added to the forward pass, not a change of existing weights, so no plain checkpoint "
            f"reproduces them. Serve the base model with the adapter instead (adapters.load_model(base, "
            f"adapter_dir)); 'adapters plugins -v' lists which installed methods can merge.")


def _same_path(a: str, b: str) -> bool:
    return os.path.exists(b) and os.path.realpath(a) == os.path.realpath(b)


def _check_out(out: str, overwrite: bool, inputs: list[str]) -> None:
    for path in inputs:
        if _same_path(out, path):
            raise ExportError(f"OUT ({out}) is the input directory {path}; write the merged model somewhere else.")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"{out} exists and is a file; OUT must be a directory (new or empty).")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; pass --overwrite to replace the checkpoint files in it "
                          "(other files stay), or choose a new directory.")


def _head_weights(model: Any, keys: set[str]) -> tuple[list[str], list[str]]:
    """``keys`` split into (outside the base model: task heads, inside it)."""
    base_ids = {id(p) for p in model._adapters_state.points.base_model.parameters()}
    params = dict(model.named_parameters(remove_duplicate=False))
    outside = sorted(k for k in keys if k in params and id(params[k]) not in base_ids)
    return outside, sorted(set(keys) - set(outside))


# ---------------------------------------------------------------------------------------------- export
@contextmanager
def _transformers_quiet(progress: bool) -> Iterator[None]:
    """transformers' load report off (missing weights are checked here), its and the Hub's progress bars
    off unless ``progress``; everything restored afterwards."""
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hub_bars_off = hub_utils.are_progress_bars_disabled()
    hf_logging.set_verbosity_error()
    if not progress:
        hf_logging.disable_progress_bar()
        hub_utils.disable_progress_bars()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if not hub_bars_off:
            hub_utils.enable_progress_bars()


def _tokenizer_files(base: str) -> list[str]:
    """Paths of the base model's tokenizer files: from its directory, or the Hub (cache honoured)."""
    if os.path.isdir(base):
        directory = base
    else:
        try:
            from huggingface_hub import snapshot_download

            directory = snapshot_download(base, allow_patterns=list(TOKENIZER_FILES))
        except Exception:  # noqa: BLE001 - no tokenizer to copy is not an error
            return []
    return [os.path.join(directory, f) for f in TOKENIZER_FILES if os.path.isfile(os.path.join(directory, f))]


def _move_into(tmp: str, out: str) -> None:
    if not os.path.exists(out):
        os.replace(tmp, out)
        return
    for name in os.listdir(out):  # an earlier export's shards would be read with the new weights
        path = os.path.join(out, name)
        if os.path.isfile(path) and name.startswith(_WEIGHT_PREFIXES) and name.endswith((".safetensors", ".bin",
                                                                                          ".index.json")):
            os.remove(path)
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(out, name))


def export_merged(adapter_dir: str, out: str, *, model: str | None = None, task: str | None = None,
                  dtype: str | None = None, overwrite: bool = False, progress: bool = True,
                  log: Callable[[str], None] | None = print) -> ExportResult:
    """Merge the adapter saved in ``adapter_dir`` into its base model and write a plain transformers
    checkpoint to ``out`` (see the module docstring).

    :param model: the base model (a local directory or a Hub id); ``None``: the one the adapter's config
        records. :param task: ``base`` / ``causal_lm`` / ``seq2seq_lm`` / ``seq_cls`` to choose the Auto class;
        ``None``: see :func:`model_class_for`. :param dtype: dtype of the written weights (:data:`DTYPES`);
        ``None``: the base model's (``config.dtype``), float32 if it records none. The merge runs in float32.
    :param overwrite: write into a non-empty ``out`` (its weight files are replaced, other files stay).
    :param progress: show transformers' and the Hub's progress bars. :param log: receives one line per step.
    :raises ExportError: (an :class:`~adapters.errors.AdapterError`) nothing was written; the message says why.
    """
    import torch
    import transformers

    from .checkpoint import apply_checkpoint, read_checkpoint
    from .initialization import init
    from .interface import INTERFACE_FILE, AdapterModelInterface
    from .merging import merge_and_unload

    say = log or (lambda _line: None)
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    say(f"reading the adapter in {adapter_dir}")
    loaded = read_checkpoint(adapter_dir)
    _refuse_unmergeable(loaded.config, loaded.name)
    base = model or recorded_base(loaded.meta)
    if not base:
        raise ExportError(f"{adapter_dir} does not record its base model; pass it with --model (a local model "
                          "directory or a Hub id).")
    _check_out(out, overwrite, [adapter_dir, base])
    with _transformers_quiet(progress):
        try:
            config = transformers.AutoConfig.from_pretrained(base)
        except Exception as exc:  # noqa: BLE001 - any failure to find / read the base config
            origin = "--model" if model else "recorded in the adapter's config; pass --model to use another"
            raise ExportError(f"cannot read the base model's config from {base!r} ({origin}): {exc}") from None
        saved_type = loaded.meta.get("model_type")
        if saved_type and saved_type != config.model_type:
            raise ExportError(f"the adapter was saved from a '{saved_type}' model; {base} is a "
                              f"'{config.model_type}' model. Pass the base model it was trained on with --model.")
        peft_head = bool((loaded.meta.get("peft_config") or {}).get("modules_to_save"))
        cls, why = model_class_for(loaded.meta, bool(loaded.head) or peft_head, config, task)
        out_dtype = dtype or str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
        if out_dtype not in DTYPES:
            out_dtype = "float32"
        say(f"loading the base model {base} with {cls.__name__} ({why}), in float32 for the merge")
        try:
            net, info = cls.from_pretrained(base, dtype=torch.float32, output_loading_info=True)
        except Exception as exc:  # noqa: BLE001 - e.g. a class without this head for the architecture
            raise ExportError(f"{cls.__name__} cannot load {base}: {exc}") from None
    net.eval()
    interface_file = os.path.join(adapter_dir, INTERFACE_FILE)
    interface = AdapterModelInterface.load(interface_file) if os.path.exists(interface_file) else None
    init(net, interface=interface)
    resolved = loaded.resolve(net) if loaded.resolve is not None else loaded
    _refuse_unmergeable(resolved.config, loaded.name)
    name = apply_checkpoint(net, resolved, set_active=True)
    random_weights = set(info.get("missing_keys") or ()) - set(resolved.head or {})
    head, inside = _head_weights(net, random_weights)
    if head:
        raise ExportError(
            f"the merged {type(net).__name__} would hold randomly initialised task-head weights {head[:6]}: the base "
            f"checkpoint {base} does not have them and the adapter carries no head for them. Save the adapter with "
            f"its head (save_adapter(..., with_head=True)), pass the base model that holds the trained head, or "
            f"export without the head with --task base.")
    notes = []
    if inside:
        notes.append(f"the base checkpoint {base} lacks {inside[:6]}{' ...' if len(inside) > 6 else ''}; "
                     f"{cls.__name__}.from_pretrained initialises them randomly, here as for the base model alone")
    methods = " + ".join(type(c).__name__ for c in resolved.config.configs) if resolved.config is not None else "?"
    say(f"merging adapter '{name}' ({methods}) into the weights")
    try:
        merge_and_unload(net, [name])
    except AdapterError as exc:
        raise ExportError(f"cannot merge adapter '{name}': {exc}") from None
    net.to(getattr(torch, out_dtype))
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-merged-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; OUT gets the permissions of a new directory
    try:
        say(f"writing {out} ({out_dtype})")
        with _transformers_quiet(progress):
            net.save_pretrained(tmp)
        for path in _tokenizer_files(base):
            shutil.copy2(path, os.path.join(tmp, os.path.basename(path)))
        files = sorted(os.listdir(tmp))
        _move_into(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out=out, adapter=name, model_class=type(net).__name__, dtype=out_dtype, files=files,
                        warnings=notes)
