"""Quantized base projections: everything core knows about bitsandbytes and torchao, in one module.

A *quantized base* is a linear projection whose weight is not a plain float tensor:

* ``"bnb-4bit"``: a bitsandbytes ``Linear4bit`` (NF4 / FP4, optionally double-quantized); its weight is a
  ``Params4bit`` of packed ``uint8`` with a ``QuantState``;
* ``"bnb-8bit"``: a bitsandbytes ``Linear8bitLt`` (LLM.int8()); an ``Int8Params`` weight with row scales
  (``SCB``), which the module moves into its ``MatmulLtState`` at its first forward;
* ``"torchao"``: an ``nn.Linear`` whose weight is a torchao tensor subclass (``quantize_(model,
  Int8WeightOnlyConfig())`` and friends), which ``F.linear`` dispatches to torchao's kernels;
* ``"other"``: any other ``nn.Linear`` whose weight is not floating point (called, never dequantized).

:class:`~adapters.linear.AdapterLinear` keeps such a module as its ``base_layer`` child and calls it for the
base computation (its own kernel, no dequantized copy kept); this module gives it the rest: which kind a
module is (:func:`quantization_kind`: bitsandbytes and torchao are looked up in ``sys.modules`` only, so
detection never imports them), a transient float weight (:func:`dequantize`), merging (:func:`check_merge`,
:func:`snapshot` / :func:`restore` for the exact reset, :func:`requantize`), and
:func:`prepare_model_for_kbit_training`. ``import adapters`` imports none of this; bitsandbytes and torchao
are the optional extras ``adapters-core[bnb]`` and ``adapters-core[torchao]``.
"""

from __future__ import annotations

import copy
import importlib
import sys
import warnings
from typing import Any

import torch
from torch import nn

from .errors import AdapterError

__all__ = [
    "QuantizedMergeWarning",
    "quantization_kind",
    "is_quantized_tensor",
    "logical_numel",
    "compute_dtype",
    "adapter_dtype_at",
    "dequantize",
    "check_merge",
    "snapshot",
    "restore",
    "requantize",
    "keep_training_kernels",
    "prepare_model_for_kbit_training",
]

BNB_4BIT, BNB_8BIT, TORCHAO, OTHER = "bnb-4bit", "bnb-8bit", "torchao", "other"
#: the extra that installs each quantization library
EXTRAS = {"bitsandbytes": "bnb", "torchao": "torchao"}


class QuantizedMergeWarning(UserWarning):
    """Merging into a quantized weight re-quantizes it: rounding changes the outputs slightly."""


def _library(name: str) -> Any:
    """``import name`` (bitsandbytes / torchao), or an ImportError naming the extra that installs it."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(f"This model is quantized with {name.split('.')[0]}, which is not installed: "
                          f"pip install 'adapters-core[{EXTRAS[name.split('.')[0]]}]'.") from exc


def _from_library(obj: Any, library: str) -> bool:
    return type(obj).__module__.split(".", 1)[0] == library


def quantization_kind(module: nn.Module) -> str | None:
    """``"bnb-4bit"``, ``"bnb-8bit"``, ``"torchao"``, ``"other"`` (see the module docstring), or ``None``
    for a plain float projection. Imports nothing: a bitsandbytes module exists only once bitsandbytes is
    imported."""
    bnb_nn = sys.modules.get("bitsandbytes.nn")
    if bnb_nn is not None:
        if isinstance(module, bnb_nn.Linear4bit):
            return BNB_4BIT
        if isinstance(module, bnb_nn.Linear8bitLt):
            return BNB_8BIT
    if not isinstance(module, nn.Linear):
        return None
    weight = module._parameters.get("weight")
    if weight is None:
        return None
    if _from_library(weight, "torchao"):
        return TORCHAO
    return None if weight.is_floating_point() else OTHER


def is_quantized_tensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds quantized values (integer storage, or a bitsandbytes / torchao parameter
    type): such a parameter never trains, whatever its ``requires_grad``."""
    return (not (tensor.is_floating_point() or tensor.is_complex()) or _from_library(tensor, "bitsandbytes")
            or _from_library(tensor, "torchao"))


def logical_numel(tensor: torch.Tensor) -> int:
    """How many weights ``tensor`` stands for: the unpacked shape of a 4-bit ``Params4bit`` (two weights a
    byte), ``numel()`` otherwise."""
    state = getattr(tensor, "quant_state", None)
    shape = getattr(state, "shape", None)
    if shape is not None and _from_library(tensor, "bitsandbytes"):
        return int(torch.Size(shape).numel())
    return tensor.numel()


def compute_dtype(module: nn.Module, kind: str) -> torch.dtype | None:
    """The float dtype the quantized module computes in, when it records one: the 4-bit compute dtype
    (``bnb_4bit_compute_dtype``, else the dtype the weights were quantized from), a torchao tensor's
    dtype, the bias dtype; ``None`` when only the inputs will tell (8-bit without a bias)."""
    if kind == BNB_4BIT:
        if module.compute_dtype is not None:
            return module.compute_dtype
        state = module.weight.quant_state
        if state is not None:
            return getattr(state, "original_dtype", state.dtype)
    if kind == TORCHAO:
        return module.weight.dtype
    bias = module._parameters.get("bias")
    return bias.dtype if bias is not None else None


def _find_quantized(module: nn.Module) -> tuple[str | None, nn.Module]:
    """The first quantized projection in ``module`` (itself, the one an adapter layer wraps, or a submodule)."""
    for sub in module.modules():
        kind = quantization_kind(sub)
        if kind is None and getattr(sub, "quantization", None) is not None:  # an AdapterLinear around one
            kind, sub = sub.quantization, sub._modules["base_layer"]
        if kind is not None:
            return kind, sub
    return None, module


def adapter_dtype_at(site: Any, module: nn.Module, config: Any = None) -> torch.dtype:
    """The dtype of new adapter weights placed at or around ``module`` (a projection, a Transformer layer)
    through an :class:`~adapters.plugin.AttachSite`: ``config.dtype`` if set; where ``module`` is or holds
    a quantized projection, its compute dtype (:func:`compute_dtype`), else the dtype of the model's
    float weights, with float16 raised to float32 (trainable weights under fp16 mixed precision must be
    float32: ``GradScaler`` refuses float16 gradients, and float16 weights lose small updates); otherwise
    what ``site.dtype_for(module, config)`` says (the module's first float parameter)."""
    kind, base = _find_quantized(module)
    if kind is None:
        return site.dtype_for(module, config)
    dtype = compute_dtype(base, kind) or site.dtype_for(site.model)
    if dtype == torch.float16:
        dtype = torch.float32
    return site.dtype_for(torch.empty(0, dtype=dtype), config)


def dequantize(module: nn.Module, kind: str) -> torch.Tensor:
    """The weight as a float ``(out × in)`` tensor, computed now and kept by nobody (no autograd graph).

    4-bit: ``bitsandbytes.functional.dequantize_4bit`` (in the dtype the weights were quantized from); after
    bitsandbytes' CPU inference repacking (``packing_format_for_cpu``), the layer's own kernel applied to
    the identity. 8-bit: ``int8 · SCB / 127`` in float32 (bitsandbytes' ``int8_vectorwise_dequant``).
    torchao: the tensor's ``dequantize()``.

    :raises AdapterError: an ``"other"`` quantized weight (its format is unknown).
    """
    with torch.no_grad():
        if kind == BNB_4BIT:
            functional = _library("bitsandbytes.functional")
            weight = module.weight
            state = weight.quant_state
            if getattr(state, "packing_format_for_cpu", False):
                eye = torch.eye(module.in_features, dtype=state.dtype, device=weight.device)
                return functional.gemv_4bit(eye, weight.data, state=state).t().to(state.original_dtype)
            return functional.dequantize_4bit(weight.data, state)
        if kind == BNB_8BIT:
            weight = module.weight
            if weight.is_floating_point():  # has_fp16_weights=True: the weight is kept in float
                return weight.detach()
            functional = _library("bitsandbytes.functional")
            cb = weight.CB if getattr(weight, "CB", None) is not None else module.state.CB
            scb = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
            if cb is None:
                cb = weight.data
            return functional.int8_vectorwise_dequant(cb, scb)
        if kind == TORCHAO:
            return module.weight.dequantize()
    raise AdapterError(f"Cannot dequantize the weight of {type(module).__name__} ({type(module.weight).__name__}): "
                       "only bitsandbytes 4-bit / 8-bit and torchao weights are supported.")


def check_merge(module: nn.Module, kind: str, location: str) -> None:
    """Refuse a merge into ``module`` that cannot be done, or warn that a re-quantizing merge rounds.

    :raises AdapterError: torchao or unknown quantized weights (nothing to re-quantize them with).
    """
    if kind in (BNB_4BIT, BNB_8BIT):
        warnings.warn(f"Merging into a quantized ({kind}) base weight dequantizes it, adds the adapter and "
                      "quantizes it again: the rounding changes the outputs slightly. reset_adapter() restores "
                      "the original quantized weights exactly; merge_and_unload() returns the model with the "
                      "re-quantized weights.", QuantizedMergeWarning, stacklevel=4)
        return
    raise AdapterError(f"Cannot merge at {location}: its base weight is quantized ({kind}, "
                       f"{type(module.weight).__name__}) and adapters cannot re-quantize it. Keep the adapter "
                       "unmerged, or load the base model unquantized to merge.")


def snapshot(module: nn.Module, kind: str) -> tuple[Any, ...]:
    """What :func:`restore` needs to undo :func:`requantize` bit for bit: the weight Parameter object itself
    (merging puts a new one in its place, never writes into it), the module's quantization state and a
    copy of the bias (IA3 merges scale it in place)."""
    bias = module._parameters.get("bias")
    bias_copy = None if bias is None else bias.detach().clone()
    if kind == BNB_4BIT:
        return (module.weight, module.quant_state, bias_copy)
    if kind == BNB_8BIT:
        if module.weight.is_floating_point():
            return (module.weight.detach().clone(), None, bias_copy)
        return (module.weight, module.state, bias_copy)
    raise AdapterError(f"Cannot snapshot a {kind} quantized weight.")


def restore(module: nn.Module, kind: str, saved: tuple[Any, ...]) -> None:
    """Put back what :func:`snapshot` saved."""
    weight, state, bias = saved
    with torch.no_grad():
        if kind == BNB_8BIT and state is None:
            module.weight.copy_(weight)
        else:
            module.weight = weight
            if kind == BNB_4BIT:
                module.quant_state = state
            else:
                module.state = state
        if bias is not None:
            module.bias.copy_(bias)


def requantize(module: nn.Module, kind: str, weight: torch.Tensor) -> None:
    """Quantize float ``weight`` (``out × in``) the way ``module``'s weight is quantized and make it the
    module's weight: a new Parameter object (the old one stays intact for :func:`restore`).

    4-bit: ``quantize_4bit`` with the old weight's block size, type, double quantization and storage, from
    the dtype the weights were quantized from. 8-bit: ``int8_vectorwise_quant`` of the float16 weight, with
    a fresh copy of the module's matmul state (which the first forward fills).
    """
    if kind == BNB_4BIT:
        bnb = _library("bitsandbytes")
        old = module.weight
        state = old.quant_state
        dtype = getattr(state, "original_dtype", state.dtype) if getattr(state, "packing_format_for_cpu", False) \
            else state.dtype
        data, new_state = bnb.functional.quantize_4bit(
            weight.to(device=old.device, dtype=dtype).contiguous(), blocksize=old.blocksize,
            compress_statistics=old.compress_statistics, quant_type=old.quant_type, quant_storage=old.quant_storage)
        module.weight = bnb.nn.Params4bit(data, requires_grad=False, quant_state=new_state, blocksize=old.blocksize,
                                          compress_statistics=old.compress_statistics, quant_type=old.quant_type,
                                          quant_storage=old.quant_storage, module=module, bnb_quantized=True)
        module.quant_state = new_state
        return
    if kind == BNB_8BIT:
        old = module.weight
        if old.is_floating_point():
            with torch.no_grad():
                old.copy_(weight)
            return
        bnb = _library("bitsandbytes")
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(weight.to(device=old.device, dtype=torch.float16))
        module.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
        state = copy.copy(module.state)
        for field in ("CB", "SCB", "SB", "SBt", "CBt", "subB", "idx"):
            if hasattr(state, field):
                setattr(state, field, None)
        module.state = state
        return
    raise AdapterError(f"Cannot re-quantize a {kind} quantized weight.")


def keep_training_kernels(model: nn.Module) -> None:
    """Keep bitsandbytes' 4-bit weights in the layout its training kernels use (called by
    :func:`prepare_model_for_kbit_training`, ``train_adapter`` and for every 4-bit projection an adapter
    layer wraps, so a model computes alike in training and eval mode).

    On a CPU with AVX512-BF16, an eval-mode forward without gradients repacks a ``Linear4bit`` weight for
    bitsandbytes' CPU inference kernel, which records no autograd graph: every later training forward then
    cuts the gradient silently (measured: all adapter gradients ``None``). The repacking is switched off
    here for the model's 4-bit modules, and a weight repacked already is unpacked the way bitsandbytes
    unpacks it before saving (its block scales stay rounded to bfloat16). No-op without bitsandbytes.
    """
    bnb_nn = sys.modules.get("bitsandbytes.nn")
    if bnb_nn is None:
        return
    for module in model.modules():
        if not isinstance(module, bnb_nn.Linear4bit):
            continue
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            unpack = getattr(_library("bitsandbytes.functional"), "_convert_weight_packed_for_cpu_inverse", None)
            if unpack is None:
                raise AdapterError("bitsandbytes repacked this model's 4-bit weights for CPU inference (an "
                                   "eval-mode forward), which computes no gradients, and this bitsandbytes version "
                                   "cannot undo it: reload the model before training.")
            weight.data, weight.quant_state = unpack(weight.data, weight.quant_state)
            module.quant_state = weight.quant_state


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Get a quantized (or any) model ready for adapter training; returns ``model`` (changed in place).

    1. Every base parameter is frozen (adapters of an ``adapters.init`` model keep their state:
       ``train_adapter`` decides those).
    2. Nothing is cast. Float32 is used only where precision needs it, and that is the trainable weights
       under float16: adapters on a quantized base computing in float16 are made float32 when added
       (:func:`adapter_dtype_at`), so fp16 mixed precision (``GradScaler``) works. Embeddings, norms and
       the LM head keep their dtype: casting them costs memory and step time and bought no accuracy in
       bfloat16 (``benchmarks/qlora.py --casts``); a float32 norm in front of a bfloat16 (tied) LM head
       would not even run.
    3. bitsandbytes' 4-bit weights keep their training layout on CPU (:func:`keep_training_kernels`).
    4. With ``use_gradient_checkpointing``: activation checkpointing of the Transformer layers, reentrant by
       default (``gradient_checkpointing_kwargs`` go to ``torch.utils.checkpoint``; measured on an H200, 0.6B
       Qwen3 shape in 4 bits, batch 8 × 512, LoRA r=16 on every linear: 330 ms a step reentrant, 383 ms
       non-reentrant -- the non-reentrant forward records the autograd graph of every 4-bit matmul it then
       throws away, and the step is bound by that CPU work), and the KV cache off for training. Reentrant
       checkpointing needs the input embeddings' output to require gradients, so that hook is kept; with
       ``{"use_reentrant": False}`` it is removed (transformers installs it whenever checkpointing is enabled;
       the non-reentrant checkpoint does not need it, and it costs the first layer's input gradient).

    :raises ImportError: the model was quantized with bitsandbytes or torchao and that library is missing
        (the message names the extra: ``pip install 'adapters-core[bnb]'``).
    """
    config = getattr(model, "config", None)
    quant = getattr(config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    method = getattr(method, "value", method)
    if method in EXTRAS:
        _library(str(method))
    state = getattr(model, "_adapters_state", None)
    owned = state.owned_parameter_ids() if state is not None else set()
    for p in model.parameters():
        if id(p) not in owned:
            p.requires_grad_(False)
    keep_training_kernels(model)
    if use_gradient_checkpointing:
        kwargs = {"use_reentrant": True, **(gradient_checkpointing_kwargs or {})}
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if kwargs["use_reentrant"]:
            model.enable_input_require_grads()
        elif hasattr(model, "disable_input_require_grads"):
            # transformers makes the embeddings' output require grad whenever checkpointing is enabled; the
            # non-reentrant checkpoint does not need it, and it costs the input gradient of the first layer
            model.disable_input_require_grads()
        if config is not None and getattr(config, "use_cache", None):
            config.use_cache = False
    return model
