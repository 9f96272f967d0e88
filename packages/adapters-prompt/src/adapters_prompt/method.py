"""The prompt-tuning and prefix-tuning methods: where they attach, what they refuse (before anything changes)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
from torch import nn

from adapters.plugin import AdapterError, AdapterMethod, AttachSite, ModelPoints, linear_features

from .calls import cache_param, param_names
from .config import PrefixTuningConfig, PromptTuningConfig
from .formats import read_adapterhub_prefix, read_peft_prompt_learning
from .prefix import PrefixFlat, PrefixLayer, PrefixMLP, PrefixUnit, offset_pre_hook, prefix_pre_hook
from .prompt import PromptLayer, PromptUnit, decoder_mask_hook, prompt_post_hook, prompt_pre_hook

__all__ = ["PromptTuningMethod", "PrefixTuningMethod", "PROMPT_ATTR", "PREFIX_ATTR", "prefix_sites"]

PROMPT_ATTR = "prompt_tuning"
PREFIX_ATTR = "prefix_tuning"
_BLOCKS = frozenset({"Stack", "BatchSplit", "MultiTask", "Parallel"})
_HEAD_DIM_ATTRS = ("head_dim", "head_size", "attention_head_size", "key_value_proj_dim")


def _input_embedding(entry: nn.Module, points: ModelPoints) -> nn.Module | None:
    getter = getattr(entry, "get_input_embeddings", None)
    if callable(getter):
        try:
            found = getter()
        except (NotImplementedError, AttributeError):
            found = None
        if isinstance(found, nn.Module):
            return found
    return points.embeddings.module if points.embeddings is not None else None


def prompt_entry(points: ModelPoints) -> tuple[nn.Module, nn.Module | None, str]:
    """``(entry module, decoder stack or None, input-embedding path inside the entry)`` for prompt tuning: the
    module that embeds the tokens and runs the layer stack (the base model, or the stack's parent when that
    takes ``inputs_embeds`` and ``attention_mask`` itself, as OPT's decoder, which ``OPTForCausalLM`` calls
    without the base model's forward), and for two stacks the encoder's and decoder's parents.

    :raises AdapterError: the entry takes no ``inputs_embeds``, or its input embedding cannot be found.
    """
    stacks = points.interface.layer_stacks
    base = points.base_model

    def parent(path: str) -> nn.Module:
        return base.get_submodule(path.rsplit(".", 1)[0]) if "." in path else base

    if len(stacks) > 1:
        entry, decoder = parent(stacks[0]), parent(stacks[1])
    else:  # the stack's own parent when it takes the embeddings (OPT's decoder: its task classes call it directly)
        inner = parent(stacks[0])
        takes = param_names(inner)
        entry = inner if "inputs_embeds" in takes and "attention_mask" in takes else base
        decoder = None
    if "inputs_embeds" not in param_names(entry):
        raise AdapterError(f"Prompt tuning passes the prompt as inputs_embeds, but {type(entry).__name__}.forward "
                           "takes no inputs_embeds.")
    embed = _input_embedding(entry, points)
    path = next((n for n, m in entry.named_modules() if m is embed and n), None) if embed is not None else None
    if path is None:
        raise AdapterError(f"Prompt tuning cannot find the input embedding inside {type(entry).__name__} "
                           "(get_input_embeddings() or the interface's model_embeddings).")
    return entry, decoder, path


class PromptTuningMethod(AdapterMethod):
    """Prompt tuning (Lester et al. 2021): see :mod:`adapters_prompt.prompt`."""

    name: ClassVar[str] = "prompt_tuning"
    config_classes = (PromptTuningConfig,)
    presets = {"prompt_tuning": PromptTuningConfig}
    supported_blocks = _BLOCKS
    hook_points = frozenset({"model_embeddings", "model_layers"})
    formats = {"peft": (read_peft_prompt_learning, None)}

    def validate(self, config: PromptTuningConfig, points: ModelPoints) -> None:
        prompt_entry(points)

    def attach(self, site: AttachSite, name: str, config: PromptTuningConfig) -> None:
        entry, decoder, embed_path = prompt_entry(site.points)
        strip = decoder is None
        layer = site.add_child(entry, PROMPT_ATTR, PromptLayer,
                               lambda: PromptLayer(PROMPT_ATTR, param_names(entry), embed_path, strip))
        if not layer.hooked:
            site.register_hook(layer, entry.register_forward_pre_hook(partial(prompt_pre_hook, PROMPT_ATTR),
                                                                      with_kwargs=True))
            if strip:
                site.register_hook(layer, entry.register_forward_hook(partial(prompt_post_hook, PROMPT_ATTR),
                                                                      with_kwargs=True, always_call=True))
            else:
                site.register_hook(layer, decoder.register_forward_pre_hook(
                    partial(decoder_mask_hook, param_names(decoder)), with_kwargs=True))
            layer.hooked = True
        embed = entry.get_submodule(embed_path)
        weight = getattr(embed, "weight", None)
        width = int(weight.shape[-1]) if isinstance(weight, torch.Tensor) else int(site.points.hidden_size)
        dtype = site.dtype_for(embed, config)
        device = weight.device if isinstance(weight, torch.Tensor) else None
        init = _text_init(site.model, embed, config) if config.prompt_init == "from_string" else None
        unit = PromptUnit(config.prompt_length, width, dtype, device, init=init,
                          scale=float(config.random_uniform_scale), seed=config.init_weights_seed)
        layer.adapters[name] = unit


def _text_init(model: nn.Module, embed: nn.Module, config: PromptTuningConfig) -> torch.Tensor:
    """The embeddings of ``prompt_init_text``'s tokens, repeated / cut to ``prompt_length``."""
    from transformers import AutoTokenizer

    source = (config.tokenizer_name_or_path or getattr(model.config, "tokenizer_name_or_path", None)
              or getattr(model.config, "name_or_path", None))
    if not source:
        raise AdapterError("prompt_init='from_string' needs a tokenizer: set tokenizer_name_or_path (a directory "
                           "or model id); the model's config names none.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise AdapterError(f"prompt_init='from_string': cannot load the tokenizer {source!r}: {exc}") from None
    ids = list(tokenizer(config.prompt_init_text)["input_ids"])
    if not ids:
        raise AdapterError(f"prompt_init_text {config.prompt_init_text!r} tokenizes to nothing.")
    ids = (ids * math.ceil(config.prompt_length / len(ids)))[:config.prompt_length]
    with torch.no_grad():
        device = next((p.device for p in embed.parameters()), None)
        return embed(torch.tensor(ids, dtype=torch.long, device=device)).detach().float()


# -------------------------------------------------------------------------------------------- prefix tuning
@dataclass
class PrefixSite:
    """One attention module that gets a prefix: its layer, kind, group (``self`` / ``encoder`` / ``cross``),
    and the facts its pre-hook needs."""

    layer: int
    point: Any
    cross: bool
    group: str
    heads: int
    head_dim: int
    params: tuple[str, ...]
    cache_name: str
    mask_name: str
    inner: str
    causal: bool
    bias: bool


def _site(points: ModelPoints, lp: Any, attn: Any, cross: bool, group: str) -> PrefixSite:
    module = attn.module.module
    params = param_names(module)
    cache_name = cache_param(params)
    inner_path, inner = "", module
    if cache_name is None or not any(hasattr(module, a) for a in _HEAD_DIM_ATTRS):
        for child_name, child in module.named_children():
            if any(hasattr(child, a) for a in _HEAD_DIM_ATTRS) and hasattr(child, "layer_idx"):
                inner_path, inner = child_name, child
                break
    if cache_name is None:
        raise AdapterError(f"Prefix tuning adds its keys through the attention's key/value cache, but "
                           f"{type(module).__name__} (layer {lp.index}) takes no cache argument; this architecture "
                           "is not supported.")
    head_dim = next((int(getattr(inner, a)) for a in _HEAD_DIM_ATTRS if isinstance(getattr(inner, a, None), int)),
                    None)
    if attn.k is not None:
        _, k_width = linear_features(attn.k.module)
    elif attn.fused is not None:
        k_width = attn.fused.sizes[1]
    else:
        k_width = None
    if head_dim is None or k_width is None or k_width % head_dim:
        raise AdapterError(f"Prefix tuning cannot tell the key/value heads of {type(module).__name__} (layer "
                           f"{lp.index}): no head-size attribute or key projection in the interface.")
    if cross:
        mask_name = "encoder_attention_mask" if "encoder_attention_mask" in params else \
            next((n for n in ("attention_mask", "mask") if n in params), "attention_mask")
    else:
        mask_name = next((n for n in ("attention_mask", "mask") if n in params), "attention_mask")
    return PrefixSite(lp.index, attn.module, cross, group, k_width // head_dim, head_dim, params, cache_name,
                      mask_name, inner_path, bool(getattr(inner, "is_causal", False)), "position_bias" in params)


def prefix_sites(points: ModelPoints, config: PrefixTuningConfig) -> list[PrefixSite]:
    """Every attention module ``config`` puts a prefix in, in layer order (validated).

    :raises AdapterError: an attention without a cache argument, unknown head sizes, bad ``leave_out``,
        ``offset_positions`` on a base model without ``position_ids``, or T5-style shared position biases
        with a stack only partly covered."""
    n = points.num_layers
    bad = [i for i in config.leave_out if not -n <= i < n]
    if bad:
        raise AdapterError(f"Prefix tuning leave_out {bad} is out of range: this model has {n} layers (0..{n - 1}).")
    skip = {i % n for i in config.leave_out}
    multi = len(points.interface.layer_stacks) > 1
    sites: list[PrefixSite] = []
    for lp in points.layers:
        if lp.index in skip:
            continue
        if lp.self_attn is not None and (not multi or lp.stack > 0 or config.encoder_prefix):
            group = "encoder" if multi and lp.stack == 0 else "self"
            sites.append(_site(points, lp, lp.self_attn, False, group))
        if lp.cross_attn is not None and config.cross_prefix:
            sites.append(_site(points, lp, lp.cross_attn, True, "cross"))
    if not sites:
        raise AdapterError("Prefix tuning finds no attention module to put a prefix in (check leave_out, "
                           "encoder_prefix, cross_prefix and the interface's layer_self_attn).")
    if any(s.bias for s in sites) and skip:
        raise AdapterError("Prefix tuning on a model whose layers share one position bias per stack (T5) needs "
                           f"every layer of a stack: leave_out={config.leave_out} would leave some out.")
    if config.offset_positions:
        if multi or "position_ids" not in param_names(points.base_model):
            raise AdapterError(f"offset_positions needs a single-stack base model whose forward takes position_ids; "
                               f"{type(points.base_model).__name__} does not.")
        if skip:
            raise AdapterError("offset_positions (peft's convention) cannot be combined with leave_out.")
    for group in {s.group for s in sites}:
        widths = {(s.heads, s.head_dim) for s in sites if s.group == group}
        if len(widths) > 1:
            raise AdapterError(f"Prefix tuning: the {group} attention modules have different head layouts {widths}.")
    return sites


def _gate(hidden: int, config: PrefixTuningConfig, dtype: torch.dtype, device: Any) -> nn.Linear | None:
    if not config.use_gating:
        return None
    gate = nn.Linear(hidden, 1 if config.shared_gating else 2, dtype=dtype, device=device)
    with torch.no_grad():
        gate.weight.normal_(0.0, 0.02)
    return gate


def _uses_alibi(config: object) -> bool:
    """Whether a model's attention adds ALiBi biases (Bloom always; Falcon and MPT when configured)."""
    if getattr(config, "model_type", None) == "bloom" or getattr(config, "alibi", False) is True:
        return True
    return getattr(getattr(config, "attn_config", None), "alibi", False) is True


class PrefixTuningMethod(AdapterMethod):
    """Prefix tuning (Li & Liang 2021): see :mod:`adapters_prompt.prefix`."""

    name: ClassVar[str] = "prefix_tuning"
    config_classes = (PrefixTuningConfig,)
    presets = {"prefix_tuning": PrefixTuningConfig,
               "prefix_tuning_flat": lambda **kw: PrefixTuningConfig(**{"flat": True, **kw})}
    supported_blocks = _BLOCKS
    hook_points = frozenset({"model_layers", "layer_self_attn", "layer_cross_attn", "attn_k_proj", "attn_qkv_proj"})
    formats = {"peft": (read_peft_prompt_learning, None), "adapterhub": (read_adapterhub_prefix, None)}
    #: a call context: the layers share one evaluation of the prefix pool a call (``prefix.call_blocks``)
    needs_context = True

    def average_config(self, config: PrefixTuningConfig, combine_strategy: str, **kwargs: Any) -> PrefixTuningConfig:
        """Refused: the prefixes live in model-level pools, which ``average_adapter`` would copy from the first
        adapter instead of averaging.

        :raises AdapterError: always."""
        raise AdapterError("average_adapter is not supported for prefix tuning (its prefixes are model-level pools, "
                           "not per-layer weights); average the prompts of prompt tuning, or the pools by hand.")

    def validate(self, config: PrefixTuningConfig, points: ModelPoints) -> None:
        model_config = getattr(points.root, "config", None)
        if _uses_alibi(model_config):
            raise AdapterError(
                f"Prefix tuning is not supported on {getattr(model_config, 'model_type', 'this model')!r}: its "
                "attention adds ALiBi position biases shaped for the tokens' own keys, which the prefix keys would "
                "not fit. Use prompt tuning or LoRA on this model.")
        prefix_sites(points, config)
        if points.hidden_size is None and (config.use_gating or not config.flat):
            raise AdapterError("Prefix tuning cannot tell this model's hidden size (config.hidden_size / d_model).")

    def attach(self, site: AttachSite, name: str, config: PrefixTuningConfig) -> None:
        sites = prefix_sites(site.points, config)
        hidden = site.points.hidden_size
        counts: dict[str, int] = {}
        for s in sites:
            counts[s.group] = counts.get(s.group, 0) + 1
        pools: dict[str, nn.Module] = {}
        seen: dict[str, int] = {}
        for s in sites:
            module = s.point.module
            dtype = site.dtype_for(module, config)
            device = next((p.device for p in module.parameters()), None)
            if s.group not in pools:
                pools[s.group] = site.shared(f"prefix_{s.group}", partial(
                    _make_pool, config, hidden, counts[s.group], 2 * s.heads * s.head_dim, dtype, device))
            layer = site.add_child(module, PREFIX_ATTR, PrefixLayer, lambda s=s: PrefixLayer(
                f"layers.{s.layer}.{'cross_attn' if s.cross else 'self_attn'}.{PREFIX_ATTR}", s.params,
                s.cache_name, s.mask_name, s.inner, s.cross, s.causal, s.bias))
            if not layer.hooked:
                site.register_hook(layer, module.register_forward_pre_hook(partial(prefix_pre_hook, PREFIX_ATTR),
                                                                           with_kwargs=True))
                layer.hooked = True
            index = seen.get(s.group, 0)
            seen[s.group] = index + 1
            unit = PrefixUnit(pools[s.group], index, s.heads, s.head_dim, _gate(hidden, config, dtype, device),
                              config.offset_positions)
            layer.adapters[name] = unit
        if config.offset_positions:
            first = sites[0]
            layer = first.point.module._modules[PREFIX_ATTR]
            if not layer.offset_hooked:
                base, base_path = site.points.base_model, site.points.base_path
                path = first.point.path[len(base_path) + 1:] if base_path else first.point.path
                handle = base.register_forward_pre_hook(
                    partial(offset_pre_hook, f"{path}.{PREFIX_ATTR}", param_names(base)), with_kwargs=True)
                site.register_hook(layer, handle)
                layer.offset_hooked = True


def _make_pool(config: PrefixTuningConfig, hidden: int, layers: int, width: int, dtype: torch.dtype,
               device: Any) -> nn.Module:
    def build() -> nn.Module:
        if config.flat:
            return PrefixFlat(config.prefix_length, layers, width, float(config.dropout), dtype, device)
        return PrefixMLP(config.prefix_length, hidden, config.bottleneck_size, layers, width, config.non_linearity,
                         float(config.dropout), dtype, device)

    if config.init_weights_seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):  # a seeded initialisation leaves the global generator as it was
        torch.manual_seed(config.init_weights_seed)
        return build()
