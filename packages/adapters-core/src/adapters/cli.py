"""The ``adapters`` command line.

.. code-block:: text

    adapters plugins                 installed methods and model interfaces, and plugins that failed
    adapters inspect MODEL           how a model maps onto hook points (a model directory or a model type)
    adapters summary ADAPTER_DIR     what a saved adapter is: method, config, parameters, base model
    adapters convert SRC DST --model MODEL   convert adapter checkpoints (PEFT, AdapterHub 1.x <-> native)
    adapters export-merged ADAPTER_DIR OUT   the adapter merged into its base model: a plain transformers checkpoint

Every subcommand exits with status 0 on success and 2, with a message on stderr (no traceback),
when its input is unusable.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import warnings
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "CLIError"]

EXIT_USAGE = 2


class CLIError(Exception):
    """Bad input: printed as ``adapters <command>: error: <message>`` and exit status 2."""


# ---------------------------------------------------------------------------------------------- plugins
def cmd_plugins(args: argparse.Namespace) -> int:
    """List installed methods, exported names and model interfaces, and plugins that failed to load."""
    from .plugins import GROUP_EXPORTS, GROUP_INTERFACES, GROUP_METHODS, registry

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # failures are listed below instead
        registry.load_all()
    infos = registry.installed()
    failed = {module: (info, exc) for module, (info, exc) in registry.failed.items()}

    def rows(group: str) -> list[tuple[str, str, str]]:
        out = []
        for info in sorted((i for i in infos if i.group == group), key=lambda i: (i.distribution, i.name)):
            status = "FAILED" if info.module in failed else ""
            out.append((info.name, f"{info.distribution} {info.version}", status))
        return out

    if args.json:
        payload = {
            "methods": [_info_dict(i, failed) for i in infos if i.group == GROUP_METHODS],
            "exports": [_info_dict(i, failed) for i in infos if i.group == GROUP_EXPORTS],
            "interfaces": [_info_dict(i, failed) for i in infos if i.group == GROUP_INTERFACES],
            "in_process_interfaces": sorted(set(registry.interfaces) - {i.name for i in infos
                                                                       if i.group == GROUP_INTERFACES}),
            "failed": [{"module": m, "distribution": info.distribution, "version": info.version,
                        "error": f"{type(exc).__name__}: {exc}"} for m, (info, exc) in sorted(failed.items())],
        }
        print(json.dumps(payload, indent=2))
        return 0

    sections = (("Adapter methods (config strings)", rows(GROUP_METHODS)),
                ("Exported names (from adapters import ...)", rows(GROUP_EXPORTS)),
                ("Model interfaces (config.model_type)", rows(GROUP_INTERFACES)))
    for title, entries in sections:
        print(f"{title}:")
        if not entries:
            print("  (none installed)")
        width = max((len(e[0]) for e in entries), default=0) + 2
        for name, dist, status in entries:
            print(f"  {name:<{width}}{dist}{'  ' + status if status else ''}")
        print()
    if args.verbose:
        for name, method in sorted(registry.methods.items()):
            print(f"method {name} ({method.distribution}): blocks {', '.join(sorted(method.supported_blocks))}; "
                  f"mergeable: {'yes' if method.can_merge else 'no'}")
        print()
    if failed:
        print("Plugins that failed to load:")
        for module, (info, exc) in sorted(failed.items()):
            print(f"  {module} ({info.distribution} {info.version}): {type(exc).__name__}: {exc}")
    else:
        print("Plugins that failed to load: none")
    return 0


def _info_dict(info: Any, failed: dict[str, Any]) -> dict[str, Any]:
    return {"name": info.name, "module": info.module, "distribution": info.distribution, "version": info.version,
            "loaded": info.module not in failed}


# ---------------------------------------------------------------------------------------------- inspect
def _build_model(spec: str, task: str) -> Any:
    """A model (random weights, built from a config) from a local directory or a model type name."""
    import transformers

    from . import testing

    auto_name = testing.TASKS[task]
    auto_cls = getattr(transformers, auto_name)
    if os.path.isdir(spec):
        if not os.path.exists(os.path.join(spec, "config.json")):
            raise CLIError(f"{spec} is a directory without config.json; pass a model directory or a model type.")
        try:
            config = transformers.AutoConfig.from_pretrained(spec)
        except Exception as exc:  # noqa: BLE001 - any config problem is bad input
            raise CLIError(f"cannot read the model config in {spec}: {exc}") from None
    elif spec in testing.MODEL_TYPES:
        config = testing.tiny_config(spec)
        if task == "seq_cls":
            config.num_labels = 2
    elif os.path.exists(spec):
        raise CLIError(f"{spec} is a file; pass a model directory (with config.json) or a model type.")
    else:
        raise CLIError(f"{spec!r} is neither a model directory nor a known model type. "
                       f"Model types: {', '.join(testing.MODEL_TYPES)}.")
    try:
        return auto_cls.from_config(config)
    except Exception as exc:  # noqa: BLE001 - e.g. no such head for this architecture
        raise CLIError(f"{auto_name} cannot build a '{config.model_type}' model: {exc}") from None


def _describe(module: Any) -> str:
    from .points import linear_features

    try:
        n_in, n_out = linear_features(module)
        return f"{type(module).__name__}({n_in} -> {n_out})"
    except TypeError:
        return type(module).__name__


def _unresolved_paths(model: Any, interface: Any) -> list[str]:
    """Every interface path that does not exist on ``model`` (checked on every layer)."""
    from torch import nn

    from .points import resolve_path

    problems: list[str] = []
    if interface.base_model is not None:
        found = resolve_path(model, interface.base_model)
        if found is None:
            return [f"base_model={interface.base_model!r} (from the model root)"]
        base = found[2]
    else:
        prefix = getattr(model, "base_model_prefix", "") or ""
        candidate = getattr(model, prefix, None) if prefix else None
        base = candidate if isinstance(candidate, nn.Module) else model
    if interface.model_embeddings and resolve_path(base, interface.model_embeddings) is None:
        problems.append(f"model_embeddings={interface.model_embeddings!r} (from the base model)")
    layers = []
    for stack in interface.layer_stacks:
        found = resolve_path(base, stack)
        if found is None or not isinstance(found[2], (nn.ModuleList, nn.Sequential)):
            problems.append(f"model_layers={stack!r} (from the base model)")
        else:
            layers.extend(found[2])
    layer_fields = ("layer_intermediate_proj", "layer_output_proj", "layer_pre_self_attn", "layer_pre_ffn",
                    "layer_ln_1", "layer_ln_2")
    attn_fields = ("attn_q_proj", "attn_k_proj", "attn_v_proj", "attn_qkv_proj", "attn_o_proj")
    missing: dict[str, list[int]] = {}
    for i, layer in enumerate(layers):
        for name in ("layer_self_attn", *layer_fields):
            path = getattr(interface, name)
            if path is not None and resolve_path(layer, path) is None:
                missing.setdefault(f"{name}={path!r} (from a layer)", []).append(i)
        for kind in ("layer_self_attn", "layer_cross_attn"):
            path = getattr(interface, kind)
            found = resolve_path(layer, path) if path is not None else None
            if found is None:
                continue
            for name in attn_fields:
                sub = getattr(interface, name)
                if sub is not None and resolve_path(found[2], sub) is None:
                    missing.setdefault(f"{name}={sub!r} (from {kind.removeprefix('layer_')})", []).append(i)
    for what, indices in missing.items():
        problems.append(f"{what}: missing in layer(s) {_ranges(indices)}")
    return problems


def _ranges(indices: list[int]) -> str:
    out, start, prev = [], None, None
    for i in sorted(set(indices)):
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = i
    if start is not None:
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ", ".join(out)


def cmd_inspect(args: argparse.Namespace) -> int:
    """Resolve a model's interface into hook points and print them (or what does not resolve)."""
    from . import testing
    from .interface import AdapterModelInterface
    from .plugins import registry
    from .points import InterfaceError, resolve_points

    if (not os.path.exists(args.model) and args.model not in testing.MODEL_TYPES
            and registry.interface(args.model) is not None):
        # a model type a plugin registered: no tiny model of it here, so show the interface as registered
        interface = registry.interface(args.model)
        print(f"interface registered for '{args.model}' by {registry.interfaces[args.model][1]}:")
        print(interface)
        print("(pass a model directory with its config.json to see every hook point resolved on the model)")
        return 0
    model = _build_model(args.model, args.task)
    model_type = getattr(model.config, "model_type", None)
    if args.interface and getattr(args, "infer", False):
        raise CLIError("pass either --interface FILE or --infer, not both.")
    if getattr(args, "infer", False):
        from .infer import infer_interface

        try:
            interface = infer_interface(model)
        except InterfaceError as exc:
            raise CLIError(str(exc)) from None
        source = "inferred from the model's structure (adapters.infer_interface; use it with interface=\"auto\")"
        unset = [name for name in ("layer_pre_self_attn", "layer_pre_ffn", "layer_intermediate_proj",
                                   "layer_output_proj", "model_embeddings") if getattr(interface, name) is None]
        if unset:
            source += f"; could not determine: {', '.join(unset)}"
    elif args.interface:
        try:
            interface = AdapterModelInterface.load(args.interface)
        except (OSError, ValueError, TypeError) as exc:
            raise CLIError(f"cannot read the interface {args.interface}: {exc}") from None
        source = f"from {args.interface}"
    else:
        interface = registry.interface(model_type) if model_type else None
        if interface is None:
            raise CLIError(f"no model interface is registered for model type {model_type!r}. Write one "
                           f"(AdapterModelInterface) and pass it as JSON with --interface FILE, or try --infer "
                           f"(infer one from the model's structure). Model types with an "
                           f"interface: {', '.join(registry.interface_types())}.")
        source = f"registered for '{model_type}' by {registry.interfaces[model_type][1]}"

    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {type(model).__name__} (model_type {model_type!r}, {n_params:,} parameters, built from its config)")
    print(f"interface: {source}")
    methods = "any installed method" if interface.adapter_methods is None else ", ".join(interface.adapter_methods)
    print(f"  accepts: {methods}")
    for name, value in interface.path_fields().items():
        print(f"  {name} = {value!r}")
    if interface.attn_qkv_proj:
        print(f"  attn_qkv_layout = {interface.attn_qkv_layout!r}, attn_qkv_split = {interface.attn_qkv_split!r}")
    print()
    try:
        points = resolve_points(model, interface)
    except InterfaceError as exc:
        print("The interface does not resolve on this model:", file=sys.stderr)
        for problem in _unresolved_paths(model, interface) or [str(exc)]:
            print(f"  - {problem}", file=sys.stderr)
        print(f"first error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    print("hook points (location -> module path: module):")
    print(f"  base model: {points.base_path or '<model>'} ({type(points.base_model).__name__})")
    if points.embeddings is not None:
        e = points.embeddings
        print(f"  {e.location} -> {e.path}: {_describe(e.module)}")
    layers = points.layers if args.all_layers else points.layers[:1]
    for lp in layers:
        print(f"  layers.{lp.index} -> {lp.module.path}: {type(lp.module.module).__name__}")
        for kind in ("self_attn", "cross_attn"):
            ap = lp.attention(kind)
            if ap is None:
                continue
            print(f"    {ap.module.location} -> {ap.module.path}: {type(ap.module.module).__name__}")
            for which in ("q", "k", "v", "qkv", "o"):
                point = ap.projection(which)
                if point is not None:
                    extra = f"  (fused q/k/v widths {list(ap.fused.sizes)}, {ap.fused.layout})" \
                        if which == "qkv" and ap.fused is not None else ""
                    print(f"      {point.location} -> {point.path}: {_describe(point.module)}{extra}")
        for attr in ("intermediate", "output", "pre_self_attn", "pre_cross_attn", "pre_ffn", "ln_1", "ln_2"):
            point = getattr(lp, attr)
            if point is not None:
                print(f"    {point.location} -> {point.path}: {_describe(point.module)}")
    if not args.all_layers and len(points.layers) > 1:
        print(f"  ... {len(points.layers) - 1} more layer(s) resolved the same way (--all-layers to list them)")
    print(f"\n{len(points.layers)} layer(s), hidden size {points.hidden_size}: every path resolves.")
    return 0


# ---------------------------------------------------------------------------------------------- summary
def _safetensors_header(path: str) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes), read without loading tensors."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ValueError("file too short")
            (length,) = struct.unpack("<Q", raw)
            if length > 100_000_000:
                raise ValueError("header length is implausible")
            header = json.loads(fh.read(length))
    except (OSError, ValueError) as exc:
        raise CLIError(f"{path} is not a readable safetensors file: {exc}") from None
    if not isinstance(header, dict):
        raise CLIError(f"{path} is not a readable safetensors file: the header is not a JSON object")
    return header


def _count(header: dict[str, Any]) -> tuple[int, int, dict[str, int]]:
    """``(number of tensors, number of parameters, parameters by dtype)`` from a safetensors header."""
    tensors, params, by_dtype = 0, 0, {}
    for name, entry in header.items():
        if name == "__metadata__" or not isinstance(entry, dict):
            continue
        n = 1
        for dim in entry.get("shape", []):
            n *= int(dim)
        tensors += 1
        params += n
        by_dtype[entry.get("dtype", "?")] = by_dtype.get(entry.get("dtype", "?"), 0) + n
    return tensors, params, by_dtype


def _weights_summary(path: str) -> dict[str, Any]:
    if path.endswith(".safetensors"):
        tensors, params, by_dtype = _count(_safetensors_header(path))
    else:
        import torch

        try:
            data = torch.load(path, map_location="meta", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch.load raises many types
            raise CLIError(f"{path} could not be read as a tensor file: {exc}") from None
        if not isinstance(data, dict):
            raise CLIError(f"{path} does not hold a dict of tensors")
        tensors = len(data)
        params = sum(t.numel() for t in data.values())
        by_dtype = {}
        for t in data.values():
            by_dtype[str(t.dtype).removeprefix("torch.")] = by_dtype.get(str(t.dtype).removeprefix("torch."), 0) \
                + t.numel()
    return {"file": os.path.basename(path), "bytes": os.path.getsize(path), "tensors": tensors, "parameters": params,
            "dtypes": by_dtype}


def _read_adapter_dir(directory: str) -> dict[str, Any]:
    from .checkpoint import CONFIG_FILE, HEAD_FILE, WEIGHTS_FILE, WEIGHTS_FILE_PT
    from .interface import INTERFACE_FILE

    if not os.path.isdir(directory):
        raise CLIError(f"{directory} is not a directory" if os.path.exists(directory) else
                       f"{directory} does not exist")
    config_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(config_path):
        raise CLIError(f"{directory} has no {CONFIG_FILE}; it is not a saved adapter")
    try:
        with open(config_path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise CLIError(f"{config_path} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise CLIError(f"{config_path} does not hold a JSON object")

    from .checkpoint_io import detect_format

    info: dict[str, Any] = {"directory": directory}
    cfg = meta.get("config")
    kind = detect_format(meta)  # the rule the readers use
    if kind == "native":
        info["format"] = "adapters (native)"
        info["name"] = meta.get("name")
        if cfg.get("method") == "union":
            info["method"] = "union of " + " + ".join(str(c.get("method")) for c in cfg.get("configs", []))
        else:
            info["method"] = cfg.get("method")
            info["config_class"] = cfg.get("config_class")
        info["config"] = {k: v for k, v in cfg.items() if k not in ("method", "config_class")}
        info["base_model"] = {k: meta.get(k) for k in ("model_name", "model_type", "model_class", "hidden_size",
                                                        "num_layers")}
        info["saved_with"] = {"adapters-core": meta.get("version")}
        info["method_packages"] = meta.get("methods") or {}
        candidates = [WEIGHTS_FILE, WEIGHTS_FILE_PT]
    elif kind == "peft":
        info["format"] = "PEFT"
        info["name"] = os.path.basename(os.path.normpath(directory))
        info["method"] = str(meta.get("peft_type")).lower()
        info["config"] = {k: v for k, v in meta.items() if k not in ("peft_type", "base_model_name_or_path")}
        info["base_model"] = {"model_name": meta.get("base_model_name_or_path")}
        candidates = ["adapter_model.safetensors", "adapter_model.bin"]
    elif kind == "adapterhub":
        info["format"] = "AdapterHub adapters 1.x"
        info["name"] = meta.get("name")
        info["method"] = cfg.get("architecture") or "bottleneck"
        info["config"] = cfg
        info["base_model"] = {k: meta.get(k) for k in ("model_name", "model_type", "model_class", "hidden_size")}
        info["saved_with"] = {"adapters (AdapterHub)": meta.get("version")}
        candidates = ["adapter.safetensors", "pytorch_adapter.bin"]
    else:
        raise CLIError(f"{config_path} is in no adapter format this command knows (native, PEFT, AdapterHub 1.x)")

    weights = [os.path.join(directory, c) for c in candidates if os.path.exists(os.path.join(directory, c))]
    if not weights:
        raise CLIError(f"{directory} has {CONFIG_FILE} but no weights file ({' or '.join(candidates)})")
    info["weights"] = _weights_summary(weights[0])
    head = os.path.join(directory, HEAD_FILE)
    if os.path.exists(head):
        info["head"] = _weights_summary(head)
    info["custom_interface"] = os.path.exists(os.path.join(directory, INTERFACE_FILE))
    return info


def cmd_summary(args: argparse.Namespace) -> int:
    """Describe a saved adapter directory."""
    info = _read_adapter_dir(args.adapter_dir)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    w = info["weights"]
    print(f"adapter:     {info.get('name')}  ({info['format']} checkpoint in {info['directory']})")
    method = info["method"] + (f" ({info['config_class']})" if info.get("config_class") else "")
    print(f"method:      {method}")
    dtypes = ", ".join(f"{k} {v:,}" for k, v in sorted(w["dtypes"].items()))
    print(f"parameters:  {w['parameters']:,} in {w['tensors']} tensors ({dtypes}); {w['file']}, {w['bytes']:,} bytes")
    if "head" in info:
        h = info["head"]
        print(f"head:        {h['parameters']:,} parameters in {h['tensors']} tensors ({h['file']})")
    base = {k: v for k, v in info.get("base_model", {}).items() if v is not None}
    print("base model:  " + (", ".join(f"{k}={v}" for k, v in base.items()) or "(not recorded)"))
    if info.get("method_packages"):
        print("provided by: " + ", ".join(f"{m} from {d}" for m, d in info["method_packages"].items()))
    if info.get("saved_with"):
        print("saved with:  " + ", ".join(f"{k} {v}" for k, v in info["saved_with"].items() if v is not None))
    if info["custom_interface"]:
        print("interface:   custom (adapter_interface.json; load with adapters.load_model)")
    print("config:")
    for key, value in info["config"].items():
        print(f"  {key} = {json.dumps(value)}")
    return 0


# ---------------------------------------------------------------------------------------------- convert
CONVERT_FORMATS = ("native", "peft")


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert a checkpoint between formats through :mod:`adapters.compat`.

    The checkpoint is loaded into a model built from ``--model`` (a model directory or type; only the
    config is used, no weights), because foreign formats name weights by module path, then saved with
    ``save_adapter(..., format=...)``. Adapter weights are copied exactly; the base weights play no part.
    """
    import importlib

    try:
        importlib.import_module("adapters.compat")
    except ModuleNotFoundError as exc:
        if exc.name != "adapters.compat":
            raise CLIError(f"adapters.compat failed to import: {exc}") from None
        raise CLIError("conversion is not available in this installation: it needs the AdapterHub/PEFT converters "
                       "(adapters.compat), which this version of adapters-core does not include") from None
    if not os.path.isdir(args.src):
        raise CLIError(f"{args.src} is not a directory holding a saved adapter")
    if os.path.isdir(args.dst) and os.listdir(args.dst) and not args.force:
        raise CLIError(f"{args.dst} exists and is not empty; pass --force to write into it")
    if args.servable and args.to != "peft":
        raise CLIError("--servable checks a PEFT adapter for vLLM / TGI: use it with --to peft")
    from .checkpoint import read_checkpoint
    from .errors import AdapterError
    from .initialization import init

    try:
        source = read_checkpoint(args.src)
    except (AdapterError, ValueError, TypeError) as exc:
        raise CLIError(f"cannot convert {args.src}: {exc}") from None
    methods = {c.method for c in source.config.configs} if source.config is not None else set()
    if args.to != "native" and methods:
        from .plugins import registry

        writers = {m.name for m, _, writer in registry.format_handlers(args.to) if writer is not None}
        if methods - writers:
            label = {"peft": "PEFT"}.get(args.to, args.to)
            held = (f"that format holds adapters of {', '.join(sorted(writers))} only" if writers else
                    "no installed method writes that format")
            raise CLIError(f"cannot convert {args.src} to {label}: it is a {', '.join(sorted(methods))} adapter, "
                           f"and {held}. Keep it in the native format.")
    task = args.task if args.task is not None else _task_of(source.meta.get("model_class"), bool(source.head))
    model = _build_model(args.model, task)
    try:
        init(model)
        name = model.load_adapter(args.src)
        with warnings.catch_warnings():  # the model is built only to carry the adapter: its weights do not matter
            warnings.simplefilter("ignore", UserWarning)
            model.save_adapter(args.dst, name, format=args.to)
    except (AdapterError, ValueError, TypeError) as exc:
        raise CLIError(f"cannot convert {args.src}: {exc}") from None
    if args.servable:
        from .compat.servable import servable_problems

        problems = servable_problems(args.dst)
        if problems:
            import shutil

            shutil.rmtree(args.dst)
            raise CLIError(f"{args.src} would not be served as trained by vLLM / TGI, so {args.dst} was not kept: "
                           + "; ".join(problems))
    print(f"converted adapter '{name}' ({args.src}) to the {args.to} format in {args.dst}")
    return 0


def _task_of(model_class: str | None, has_head: bool) -> str:
    """The ``--task`` a checkpoint with a head needs: from the model class it was saved from
    (``BertForSequenceClassification`` -> ``seq_cls``, :func:`adapters.export.task_of_class`); ``base``
    without a head."""
    from .export import task_of_class

    task = task_of_class(model_class) if has_head else None
    if task is None:
        return "base"
    print(f"the adapter carries a {model_class} head: converting with --task {task}")
    return task


# ---------------------------------------------------------------------------------------------- export-merged
def cmd_export_merged(args: argparse.Namespace) -> int:
    """Merge an adapter into its base model and write a plain transformers checkpoint (:mod:`adapters.export`)."""
    from .errors import AdapterError
    from .export import export_merged

    if not os.path.isdir(args.adapter_dir):
        raise CLIError(f"{args.adapter_dir} is not a directory holding a saved adapter" if not
                       os.path.exists(args.adapter_dir) or os.path.isfile(args.adapter_dir) else
                       f"{args.adapter_dir} is not a directory")
    try:
        result = export_merged(args.adapter_dir, args.out, model=args.model, task=args.task, dtype=args.dtype,
                               overwrite=args.overwrite, progress=not args.no_progress)
    except (AdapterError, OSError) as exc:
        raise CLIError(f"cannot export {args.adapter_dir}: {exc}") from None
    for note in result.warnings:
        print(f"warning: {note}", file=sys.stderr)
    print(f"exported adapter '{result.adapter}' merged into {result.model_class} ({result.dtype}) to {result.out}: "
          f"{', '.join(result.files)}")
    print(f"load it without adapters: transformers.{result.model_class}.from_pretrained({result.out!r}) "
          "(or the matching AutoModel* class)")
    return 0


# ---------------------------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise :class:`CLIError` (so ``main`` returns 2 instead of exiting)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CLIError(message, self)


def build_parser() -> argparse.ArgumentParser:
    """The ``adapters`` argument parser (exposed for documentation tools)."""
    from ._version import __version__

    parser = _Parser(
        prog="adapters",
        description="Inspect installed adapter plugins, model interfaces and saved adapters; convert adapters and "
                    "export them merged into their base model.",
        epilog="Run 'adapters <command> --help' for a command's options. Exit status: 0 success, 2 bad input.",
    )
    parser.add_argument("--version", action="version", version=f"adapters-core {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("plugins", help="list installed methods and model interfaces (and plugins that failed)",
                       description="Import every installed adapters plugin and list the adapter methods (config "
                                   "strings), exported names and model interfaces it provides, with the "
                                   "distribution and version each comes from, then the plugins that failed to load.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("-v", "--verbose", action="store_true", help="also list each method's composition blocks")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("inspect", help="show the hook points a model's interface resolves to",
                       description="Build a model from its config (no weights are loaded) and resolve its "
                                   "AdapterModelInterface: print the interface used and every hook point it "
                                   "resolves to, or the paths that do not exist on the model (exit status 2).",
                       epilog="examples:\n  adapters inspect ./my-model-dir\n  adapters inspect qwen3 --task "
                              "causal_lm\n  adapters inspect ./my-model --interface my_interface.json\n"
                              "  adapters inspect ./my-model --infer",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL",
                   help="a local model directory (with config.json) or a model type such as llama, bert, gpt2 "
                        "(a tiny model of that type is built)")
    p.add_argument("--task", default="base", choices=["base", "causal_lm", "seq2seq_lm", "seq_cls"],
                   help="which Auto class builds the model (default: base = AutoModel)")
    p.add_argument("--interface", metavar="FILE",
                   help="use this adapter_interface.json instead of the interface registered for the model type")
    p.add_argument("--infer", action="store_true",
                   help="infer the interface from the model's structure (what adapters.init(model, interface="
                        "\"auto\") uses for a model type without a registered interface) and show its hook points")
    p.add_argument("--all-layers", action="store_true", help="list the hook points of every layer, not only the first")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("summary", help="describe a saved adapter directory",
                       description="Read a saved adapter (adapter_config.json plus its weights) and print its "
                                   "method, config, parameter count (from the safetensors header; no tensors are "
                                   "loaded) and the base model it was saved from. Native, PEFT and AdapterHub 1.x "
                                   "directories are recognised.")
    p.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="directory written by model.save_adapter(...)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("convert", help="convert an adapter checkpoint between formats (needs adapters.compat)",
                       description="Convert an adapter checkpoint: AdapterHub 1.x or PEFT to the native format "
                                   "(--to native), or a native LoRA to PEFT's format (--to peft). The adapter is "
                                   "loaded into a model built from --model's config (no weights are needed) and "
                                   "saved again. Needs the converters in adapters.compat; without them the command "
                                   "says so and exits 2.",
                       epilog="example:\n  adapters convert ./peft_lora ./native_lora --model ./llama-dir "
                              "--task causal_lm",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="directory of the checkpoint to convert")
    p.add_argument("dst", metavar="DST", help="directory to write")
    p.add_argument("--model", required=True, metavar="MODEL",
                   help="the base model the adapter belongs to: a local model directory (with config.json) or a "
                        "model type (its tiny test model)")
    p.add_argument("--task", default=None, choices=["base", "causal_lm", "seq2seq_lm", "seq_cls"],
                   help="which Auto class builds the model; use the class the adapter was trained on for PEFT "
                        "checkpoints, whose keys include the model's module paths (default: the task of the head "
                        "the adapter carries, else base)")
    p.add_argument("--to", choices=CONVERT_FORMATS, default="native", help="output format (default: native)")
    p.add_argument("--force", action="store_true", help="write into DST even if it is not empty")
    p.add_argument("--servable", action="store_true",
                   help="with --to peft: refuse (and write nothing) unless vLLM / TGI would serve the adapter as "
                        "trained (no DoRA, no modules_to_save heads, one scaling lora_alpha / r)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export-merged", help="merge an adapter into its base model and write a plain transformers "
                                             "checkpoint",
                       description="Merge an adapter into its base model and write a plain transformers checkpoint.\n\n"
                                   "Loads the base model (from_pretrained, in float32: 4 bytes of memory per "
                                   "parameter)\nand the adapter (native, PEFT or AdapterHub 1.x; its trained head "
                                   "and input embeddings\nincluded), merges it (merge_and_unload) and writes OUT: "
                                   "model.safetensors, config.json,\ngeneration_config.json for generative "
                                   "models, and the base model's tokenizer files.\n"
                                   "transformers.AutoModel*.from_pretrained(OUT) loads it without adapters.\n\n"
                                   "Methods that cannot merge (bottleneck adapters, ReFT) are refused. On any "
                                   "error nothing is\nwritten: OUT is left as it was.",
                       epilog="examples:\n  adapters export-merged ./my_lora ./merged\n"
                              "  adapters export-merged ./my_lora ./merged --model Qwen/Qwen3-0.6B --dtype bfloat16\n"
                              "  adapters export-merged ./sst_lora ./sst_merged --model ./bert-dir --task seq_cls",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapter_dir", metavar="ADAPTER_DIR",
                   help="directory of the adapter: written by save_adapter, or a PEFT / AdapterHub 1.x checkpoint")
    p.add_argument("out", metavar="OUT", help="directory to write the merged checkpoint to (new or empty)")
    p.add_argument("--model", metavar="M", default=None,
                   help="the base model: a local model directory or a Hugging Face Hub id (default: the base model "
                        "the adapter's config records)")
    p.add_argument("--task", default=None, choices=["base", "causal_lm", "seq2seq_lm", "seq_cls"],
                   help="which Auto class loads the base model (default: the class the adapter was saved from, "
                        "e.g. Qwen3ForCausalLM; else PEFT's task_type or the task of its head; else the base "
                        "model's own class)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of the written weights (default: the base model's dtype)")
    p.add_argument("--overwrite", "--force", action="store_true",
                   help="write into OUT even if it is not empty: its weight files are replaced, other files stay")
    p.add_argument("--no-progress", action="store_true",
                   help="hide transformers' and the Hub's progress bars (the step lines stay)")
    p.set_defaults(func=cmd_export_merged)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``adapters`` command line with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    args: argparse.Namespace | None = None
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
        if getattr(args, "func", None) is None:
            parser.print_help()
            return EXIT_USAGE
        return int(args.func(args) or 0)
    except CLIError as exc:
        where = exc.args[1] if len(exc.args) > 1 else None
        prog = where.prog if isinstance(where, argparse.ArgumentParser) else \
            f"adapters {getattr(args, 'command', None) or ''}".strip()
        if isinstance(where, argparse.ArgumentParser):
            where.print_usage(sys.stderr)
        print(f"{prog}: error: {exc.args[0]}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
