"""PEFT VeRA checkpoints, both ways: ``adapter_config.json`` (``"peft_type": "VERA"``) +
``adapter_model.safetensors``, the files Hugging Face PEFT's ``PeftModel.save_pretrained`` writes for a
``VeraConfig`` (VeRA: Kopiczko et al., 2023, https://arxiv.org/abs/2310.11454).

The layout (PEFT's format, as PEFT 0.21 writes it):

* ``base_model.model.<module path>.vera_lambda_d`` (``r``) and ``...vera_lambda_b`` (the module's output
  features) for every adapted ``nn.Linear`` / ``Conv1D``; a fused projection (GPT-2 ``c_attn``) is adapted
  whole, with ``λ_b`` over all its outputs;
* ``base_model.vera_A`` (``r × max_in``) and ``base_model.vera_B`` (``max_out × r``): the shared frozen
  projections, ``max_in`` / ``max_out`` the largest input / output width over the adapted modules; each
  module uses ``A[:, :in]`` and ``B[:out]``. They are absent when ``save_projection`` is false: PEFT then
  redraws them from ``projection_prng_key`` (:func:`peft_projections`);
* ``base_model.model.<path>.<param>`` for the ``modules_to_save`` (whole trained copies, e.g. a task head).

PEFT's forward is ``y + λ_b ⊙ B(λ_d ⊙ A·dropout(x))`` with no scaling, which is our
:class:`~adapters_vera.layer.VeraVectors` with ``alpha=None`` (``s = 1``), computed in the same order, so
on CPU float32 the outputs are bit-identical. Our projections are drawn with another rule (Kaiming
``a=√5``), so a checkpoint read here always carries its projections in our config
(``save_projection=True``), and an export always writes them.

Reading maps module paths from the weight keys (``target_modules`` / ``layers_to_transform`` patterns are
not re-interpreted) onto a native :class:`VeraConfig` with ``target_modules`` listing those paths relative
to the base model, so it loads into ``Qwen3ForCausalLM`` and ``Qwen3Model`` alike. Options whose effect we
do not reproduce raise a :class:`~adapters.errors.CheckpointError` naming them.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
from torch import nn

from adapters.plugin import (
    CONFIG_FILE,
    PEFT_PREFIX,
    PEFT_WEIGHTS,
    PEFT_WEIGHTS_PT,
    AdapterError,
    CheckpointError,
    LoadedCheckpoint,
    default_name,
    embedding_tensors,
    head_tensors,
    linear_targets,
    local_module_path,
    peft_weights_path,
    read_config,
    read_tensors,
    task_model_path,
)

from .config import VeraConfig
from .layer import VeraLinear, VeraVectors

__all__ = ["PEFT_WEIGHTS", "PEFT_WEIGHTS_PT", "read_peft_vera", "save_peft_vera", "peft_projections"]

PROJECTIONS = {"base_model.vera_A": "A", "base_model.vera_B": "B"}
SUFFIXES = {"vera_lambda_d": "lambda_d", "vera_lambda_b": "lambda_b"}

#: Config keys read, or safely ignored: bookkeeping, initialisation-only options (``init_weights``,
#: ``d_initial``), ``fan_in_fan_out`` (PEFT uses it only when merging, and sets it from the module type),
#: and the placement patterns (the weight keys say which modules are adapted).
_KNOWN = {
    "auto_mapping", "base_model_name_or_path", "bias", "d_initial", "exclude_modules", "fan_in_fan_out",
    "inference_mode", "init_weights", "layers_pattern", "layers_to_transform", "modules_to_save", "peft_type",
    "peft_version", "projection_prng_key", "r", "revision", "save_projection", "target_modules", "task_type",
    "vera_dropout",
}


def peft_projections(key: int, r: int, max_in: int, max_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's VeRA projections for ``save_projection=False``: ``A`` (``r × max_in``) then ``B``
    (``max_out × r``), drawn from a CPU ``torch.Generator`` seeded with ``key``, each uniform in
    ``±√3·(√2/√fan_in)`` (Kaiming-uniform with gain √2; ``fan_in`` is ``max_in`` for ``A``, ``r`` for
    ``B``), in torch's default dtype (float32 unless changed), as PEFT draws them when it loads such a
    checkpoint. Bit-identical to PEFT's on the same torch build."""
    gen = torch.Generator(device="cpu").manual_seed(int(key))
    out = []
    for shape, fan in (((r, max_in), max_in), ((max_out, r), r)):
        bound = math.sqrt(3.0) * (math.sqrt(2.0) / math.sqrt(fan))
        out.append(torch.empty(shape).uniform_(-bound, bound, generator=gen))
    return out[0], out[1]


def _check_options(path: str, cfg: dict[str, Any]) -> None:
    problems = []
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias={cfg['bias']!r} (trained base-model biases)")
    r = cfg.get("r", 256)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        problems.append(f"r={r!r} (not a positive integer)")
    key = cfg.get("projection_prng_key", 0)
    if isinstance(key, bool) or not isinstance(key, int):
        problems.append(f"projection_prng_key={key!r} (not an integer)")
    dropout = cfg.get("vera_dropout", 0.0) or 0.0
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        problems.append(f"vera_dropout={dropout!r} (not a probability)")
    if not isinstance(cfg.get("save_projection", True), bool):
        problems.append(f"save_projection={cfg['save_projection']!r} (not a boolean)")
    for name, value in cfg.items():
        if name not in _KNOWN and value not in (None, False, {}, [], ""):
            problems.append(f"{name}={value!r} (an option this reader does not know; saved by a newer PEFT?)")
    if problems:
        raise CheckpointError(f"{path}: PEFT VeRA options that cannot be loaded as a native VeRA adapter: "
                              f"{'; '.join(problems)}.")


def _split(weights_path: str, tensors: dict[str, torch.Tensor], to_save: list[str], r: int,
           ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-module ``λ`` vectors (our names), the shared projections (``A`` / ``B``) and ``modules_to_save``."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    shared: dict[str, torch.Tensor] = {}
    whole: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if key in PROJECTIONS:
            shared[PROJECTIONS[key]] = tensor
            continue
        if not key.startswith(PEFT_PREFIX):
            raise CheckpointError(f"{weights_path}: unexpected key '{key}' (PEFT VeRA keys are "
                                  f"{sorted(PROJECTIONS)} or start with '{PEFT_PREFIX}').")
        rest = key[len(PEFT_PREFIX):]
        module, _, leaf = rest.rpartition(".")
        if leaf in SUFFIXES:
            modules.setdefault(module, {})[SUFFIXES[leaf]] = tensor
        elif any(module == m or module.endswith("." + m) for m in to_save):
            whole[rest] = tensor
        else:
            raise CheckpointError(f"{weights_path}: key '{key}' is neither a VeRA weight ({sorted(SUFFIXES)}, "
                                  "vera_A, vera_B) nor in modules_to_save.")
    if not modules:
        raise CheckpointError(f"{weights_path} holds no VeRA weights (vera_lambda_b / vera_lambda_d).")
    for path, parts in modules.items():
        if set(parts) != {"lambda_d", "lambda_b"}:
            raise CheckpointError(f"{weights_path}: module '{path}' has {sorted(parts)}, expected both "
                                  "vera_lambda_b and vera_lambda_d.")
        if tuple(parts["lambda_d"].shape) != (r,) or parts["lambda_b"].dim() != 1:
            raise CheckpointError(f"{weights_path}: module '{path}' has vera_lambda_d {list(parts['lambda_d'].shape)}"
                                  f" and vera_lambda_b {list(parts['lambda_b'].shape)}; expected [{r}] (r) and "
                                  "one entry per output feature.")
    return modules, shared, whole


def read_peft_vera(directory: str) -> LoadedCheckpoint | None:
    """Recognise a PEFT VeRA checkpoint directory; ``None`` if it is not one (other PEFT types included).

    The returned checkpoint resolves against the model (``resolve(model)``): module paths become our
    ``target_modules``, ``λ`` vectors and projections our tensors.

    :raises CheckpointError: options we do not reproduce (``bias``, unknown options), missing or malformed
        tensors, projections absent although ``save_projection`` is true."""
    found = read_config(directory, "peft")
    if found is None or found[1].get("peft_type") != "VERA":
        return None
    cfg_path, cfg = found
    _check_options(cfg_path, cfg)
    weights_path = peft_weights_path(directory)
    r = int(cfg.get("r", 256))
    modules, shared, whole = _split(weights_path, read_tensors(weights_path), cfg.get("modules_to_save") or [], r)
    save_projection = cfg.get("save_projection", True)
    if save_projection and set(shared) != {"A", "B"}:
        raise CheckpointError(f"{weights_path}: save_projection is true but the file lacks "
                              f"{sorted(k for k, v in PROJECTIONS.items() if v not in shared)}.")
    if not save_projection:
        shared = {}  # PEFT ignores saved projections here and redraws them from the key; so do we
    name = default_name(directory)

    def resolve(model: nn.Module) -> LoadedCheckpoint:
        return _resolve(model, cfg, modules, shared, whole, weights_path, name)

    return LoadedCheckpoint(name=name, config=None, tensors={}, meta={"format": "peft", "name": name,
                                                                      "peft_config": cfg},
                            source=directory, resolve=resolve)


def _resolve(model: nn.Module, cfg: dict[str, Any], modules: dict[str, dict[str, torch.Tensor]],
             shared: dict[str, torch.Tensor], whole: dict[str, torch.Tensor], weights_path: str,
             name: str) -> LoadedCheckpoint:
    points = model._adapters_state.points
    prefix = points.base_path + "." if points.base_path else ""

    def local(path: str) -> str | None:
        found = local_module_path(model, path)
        return found[len(prefix):] if found is not None and prefix and found.startswith(prefix) else found

    paths = {path: local(path) for path in modules}
    unknown = [p for p, found in paths.items() if found is None]
    if unknown:
        raise CheckpointError(f"{weights_path}: VeRA weights for modules this model ({type(model).__name__}) does "
                              f"not have: {unknown[:4]}{' ...' if len(unknown) > 4 else ''}.")
    r = int(cfg.get("r", 256))
    try:
        config = VeraConfig(r=r, target_modules=sorted(set(paths.values())), alpha=None,
                            vera_d=float(cfg.get("d_initial", 0.1)), vera_b=0.0,
                            projection_prng_key=int(cfg.get("projection_prng_key", 0)), save_projection=True,
                            dropout=float(cfg.get("vera_dropout", 0.0) or 0.0))
        targets = linear_targets(points, config, "PEFT VeRA", VeraLinear)
    except (AdapterError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{weights_path}: the adapter cannot be placed on this model: {exc}") from None
    by_name = {t.names[-1]: t for t in targets}
    extra = sorted(set(by_name) - set(paths.values()))
    if extra or len(by_name) != len(targets):
        raise CheckpointError(f"{weights_path}: the module names {sorted(set(paths.values()))} select other modules "
                              f"on this model too ({extra[:4]}); the adapter cannot be placed exactly.")
    tensors: dict[str, torch.Tensor] = {}
    for path, parts in modules.items():
        target = by_name[paths[path]]
        if parts["lambda_b"].shape[0] != target.out_rows:
            raise CheckpointError(f"{weights_path}: vera_lambda_b of '{path}' has {parts['lambda_b'].shape[0]} "
                                  f"entries; the module has {target.out_rows} output features.")
        tensors[f"{target.point.location}.lambda_d"] = parts["lambda_d"]
        tensors[f"{target.point.location}.lambda_b"] = parts["lambda_b"]
    max_in = max(t.in_features for t in targets)
    max_out = max(t.out_rows for t in targets)
    if shared:
        a, b = shared["A"], shared["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r or a.shape[1] < max_in \
                or b.shape[0] < max_out:
            raise CheckpointError(f"{weights_path}: vera_A {list(a.shape)} / vera_B {list(b.shape)} do not fit "
                                  f"r={r} and the adapted modules (at least [{r}, {max_in}] / [{max_out}, {r}]).")
        # every module reads A[:, :in] and B[:out] only, so columns / rows beyond the largest are unused
        a, b = a[:, :max_in], b[:max_out]
    else:
        a, b = peft_projections(int(cfg.get("projection_prng_key", 0)), r, max_in, max_out)
    tensors["shared.projections.A"] = a.contiguous()
    tensors["shared.projections.B"] = b.contiguous()
    head: dict[str, torch.Tensor] = {}
    for key, tensor in whole.items():
        owner, _, leaf = key.rpartition(".")
        found = local_module_path(model, owner)
        if found is None:
            raise CheckpointError(f"{weights_path}: modules_to_save weight '{key}' names a module this model "
                                  f"({type(model).__name__}) does not have.")
        head[f"{found}.{leaf}"] = tensor
    return LoadedCheckpoint(name=name, config=config, tensors=tensors, head=head or None,
                            meta={"format": "PEFT", "name": name, "model_type": None}, source=weights_path)


# ---------------------------------------------------------------------------------------------- writing
def save_peft_vera(model: nn.Module, directory: str, name: str) -> None:
    """Write VeRA adapter ``name`` in PEFT's format (``PeftModel.from_pretrained`` loads it, same outputs).

    Module paths are named as the task-model class names them (:func:`~adapters.foreign.task_model_path`);
    the projections are always written (``save_projection: true``: ours are drawn with another rule than
    PEFT's); a scaling ``alpha / r`` other than 1 is folded into ``λ_b`` (exact: PEFT multiplies by ``λ_b``
    where we multiply by ``λ_b · s``); the task head and trained embeddings go into ``modules_to_save``.

    :raises AdapterError: not a VeRA adapter, or VeRA on parts of a fused q|k|v projection (PEFT adapts a
        module whole, with one ``λ_d`` and ``B`` rows continuing across the parts)."""
    from safetensors.torch import save_file

    state = model._adapters_state
    config = state.record(name).config
    if not isinstance(config, VeraConfig):
        raise AdapterError(f"Adapter '{name}' is a {type(config).__name__}, not a VeRA adapter.")
    projections = state.shared_modules(name)["projections"]
    paths = {id(m): p for p, m in model.named_modules()}
    out: dict[str, torch.Tensor] = {}
    adapted: list[str] = []
    units: list[VeraVectors] = []
    for layer in state.layers(name):
        unit = layer.adapters[name]
        if not isinstance(unit, VeraVectors) or unit.rows is not None:
            raise AdapterError(f"Adapter '{name}' adapts parts of the fused projection '{paths[id(layer)]}'; PEFT's "
                               "VeRA adapts a module whole. Place it with target_modules (e.g. ['c_attn']) to export.")
        path = task_model_path(model, paths[id(layer)])
        adapted.append(path)
        units.append(unit)
        lambda_b = unit.lambda_b.detach()
        if unit.scaling != 1.0:
            lambda_b = lambda_b * unit.scaling  # the same product our forward computes
        out[f"{PEFT_PREFIX}{path}.vera_lambda_d"] = unit.lambda_d.detach().clone().contiguous()
        out[f"{PEFT_PREFIX}{path}.vera_lambda_b"] = lambda_b.clone().contiguous()
    max_in = max(u.in_features for u in units)
    max_out = max(u.out_rows for u in units)
    out["base_model.vera_A"] = projections.A.detach()[:, :max_in].clone().contiguous()
    out["base_model.vera_B"] = projections.B.detach()[:max_out].clone().contiguous()
    whole = dict(head_tensors(model))  # task head and trained input embeddings: PEFT's modules_to_save
    trained_embeddings = embedding_tensors(model)
    if trained_embeddings:
        whole.update({f"{state.points.embeddings.path}.{k}": v for k, v in trained_embeddings.items()})
    for key, tensor in whole.items():
        out[PEFT_PREFIX + task_model_path(model, key)] = tensor
    original = getattr(type(model), "_adapters_original_class", type(model))
    peft_config = {
        "peft_type": "VERA",
        "task_type": None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": config.r,
        "target_modules": sorted(adapted),
        "projection_prng_key": config.projection_prng_key,
        "save_projection": True,
        "vera_dropout": config.dropout,
        "d_initial": config.vera_d,
        "fan_in_fan_out": any(getattr(layer, "is_conv1d", False) for layer in state.layers(name)),
        "bias": "none",
        "modules_to_save": sorted({task_model_path(model, key).rsplit(".", 1)[0] for key in whole}) or None,
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
        "auto_mapping": {"base_model_class": original.__name__, "parent_library": original.__module__},
    }
    os.makedirs(directory, exist_ok=True)
    save_file(out, os.path.join(directory, PEFT_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as fh:
        json.dump(peft_config, fh, indent=2, sort_keys=True)
