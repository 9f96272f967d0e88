"""adapters: plugin-based parameter-efficient fine-tuning for PyTorch and Hugging Face Transformers.

``import adapters`` is cheap: it imports no method package and no model code. Core names are
imported on first access; method names such as ``LoRAConfig`` are resolved through the plugin
registry (``from adapters import LoRAConfig`` needs ``adapters-lora`` installed, and says so).
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__
from .hookspecs import PLUGIN_API_VERSION, hookimpl, hookspec

# name -> module that defines it (imported on first access)
_CORE_NAMES = {
    "init": "initialization",
    "load_model": "initialization",
    "AdapterSetup": "context",
    "ForwardContext": "context",
    "AdapterModelInterface": "interface",
    "InterfaceError": "points",
    "infer_interface": "infer",
    "AdapterConfig": "method",
    "ConfigUnion": "method",
    "AdapterMethod": "method",
    "AdapterLayer": "method",
    "AdapterError": "errors",
    "AdapterNotFoundError": "errors",
    "CompositionError": "errors",
    "CheckpointError": "errors",
    "PluginError": "plugins",
    "MissingPluginError": "plugins",
    "register_plugin": "plugins",
    "registry": "plugins",
    "AdapterTrainer": "trainer",
    "prepare_model_for_kbit_training": "quantized",
    "QuantizedMergeWarning": "quantized",
    "check_servable": "compat.servable",
    "servable_problems": "compat.servable",
    "composition": None,
    "Stack": "composition",
    "Fuse": "composition",
    "Split": "composition",
    "BatchSplit": "composition",
    "Parallel": "composition",
    "Average": "composition",
    "MultiTask": "composition",
}

__all__ = ["__version__", "hookimpl", "hookspec", "PLUGIN_API_VERSION", *_CORE_NAMES]


def __getattr__(name: str) -> Any:
    if name == "AdapterTrainer":
        from importlib.util import find_spec

        if find_spec("accelerate") is None:
            raise ImportError("adapters.AdapterTrainer is a transformers Trainer, which needs accelerate: "
                              "pip install 'adapters-core[train]' (from a checkout: "
                              "pip install -e 'packages/adapters-core[train]').")
    if name in _CORE_NAMES:
        module_name = _CORE_NAMES[name]
        if module_name is None:
            return importlib.import_module(f".{name}", __name__)
        value = getattr(importlib.import_module(f".{module_name}", __name__), name)
        globals()[name] = value
        return value
    if name.startswith("__"):
        raise AttributeError(name)
    from .plugins import registry

    if registry.has_export(name) or name[:1].isupper():
        try:
            value = registry.export(name)
        except KeyError:
            raise AttributeError(_unknown(name)) from None
        globals()[name] = value
        return value
    raise AttributeError(_unknown(name))


def _unknown(name: str) -> str:
    """The message for a name ``adapters`` does not have, with the closest public names."""
    import difflib

    known = __dir__()
    close = [k for k in known if k.lower() == name.lower()]
    close += [k for k in difflib.get_close_matches(name, known, n=3, cutoff=0.6) if k not in close]
    hint = f" Did you mean {' or '.join(repr(c) for c in close[:3])}?" if close else ""
    return f"module 'adapters' has no attribute '{name}'.{hint}"


def __dir__() -> list[str]:
    from .plugins import registry

    return sorted(set(__all__) | set(registry.entry_points().get("adapters.exports", {})))
