"""Prompt tuning: trained vectors in front of the input embeddings, removed again from the outputs.

Placement
    One :class:`PromptLayer` (child ``prompt_tuning`` of the *entry module*: the base model, or the
    encoder stack of an encoder-decoder model) holds every prompt adapter; a forward pre-hook on the
    entry module rewrites the call, a forward hook (single-stack models) trims the output.

The call, when it starts (no cached tokens)
    ``input_ids`` become ``inputs_embeds`` through the model's own input embedding (so embedding LoRA
    and scaled embeddings apply), the prompt ``(P × d)`` is prepended: ``[prompt; tokens]``. The 2-D
    ``attention_mask`` gets ``P`` ones in front (the prompt is always visible, whatever the padding
    side: left padding sits between the prompt and the text, masked), ``token_type_ids`` get ``P``
    zeros, ``position_ids`` passed by the caller become ``[0..P-1, position_ids + P]``. Without
    ``position_ids`` the model numbers ``[prompt; tokens]`` itself (``0..P+T-1``): the prompt acts as
    ``P`` real tokens in front of the text, which is also what a cache then holds. The call's context
    (:class:`~adapters.plugin.ForwardContext`, when it has one) gets the widened mask and, inside
    ``generate``, prompt lengths ``+ P``: methods that read the token layout (ReFT) see the prompt as the
    first real tokens and the padding where it is.

A call that continues a cache (``generate`` decode steps)
    The cache already holds the prompt's keys and values (``P`` more than the caller's tokens): the
    mask gets ``P`` ones in front, ``position_ids`` ``+ P``; nothing is inserted.

Outputs
    Single-stack models: the first ``P`` positions are cut from ``last_hidden_state`` and every entry
    of ``hidden_states`` (and the query rows of ``attentions``), so logits align with labels and
    token-level heads see the input's length. Heads *inside* the base model that pool a position (BERT's
    pooler reads position 0) read the first prompt vector, as in peft. Encoder-decoder models: the
    encoder's output keeps the prompt (the decoder attends to it, as in Lester et al.); a pre-hook on the
    decoder stack pads the encoder's attention mask, which the caller made for the tokens only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adapters.plugin import (
    AdapterError,
    AdapterLayer,
    BatchSplitPlan,
    Identity,
    Leaf,
    MultiTaskPlan,
    ParallelPlan,
    PlanNode,
    StackPlan,
    current_context,
)

from .cache import fixed_size
from .calls import CACHE_KEYS, get_arg, pop_call, push_call, set_arg

__all__ = ["PromptLayer", "PromptUnit", "prompt_pre_hook", "prompt_post_hook", "decoder_mask_hook",
           "plan_length", "cache_length"]

_ROW_BLOCKS = {BatchSplitPlan: "BatchSplit", MultiTaskPlan: "MultiTask", ParallelPlan: "Parallel"}


def plan_length(plan: PlanNode | None, length_of: Any, what: str) -> int:
    """Virtual positions ``plan`` adds: a leaf its adapter's length, a ``Stack`` the sum, a row-routing
    block the common length of its children; of a ``MultiTask`` (``task_ids``, or per-row ``adapter_names``,
    which route through one over every adapter of the model) only the children this call's rows go to.

    :raises AdapterError: a row-routing block whose rows would get different lengths (naming the block)."""
    if plan is None or isinstance(plan, Identity):
        return 0
    if type(plan) is Leaf:
        return int(length_of(plan.name))
    if isinstance(plan, StackPlan):
        return sum(plan_length(c, length_of, what) for c in plan.children)
    block = _ROW_BLOCKS.get(type(plan))
    if block is None:
        raise AdapterError(f"{what} does not support the {type(plan).__name__} block.")
    children = _routed_children(plan)
    lengths = [plan_length(c, length_of, what) for c in children]
    if len(set(lengths)) > 1:
        named = ", ".join(f"{'+'.join(c.leaves()) or 'no ' + what}: {n}" for c, n in zip(children, lengths))
        via = " (per-row adapter_names route through one)" if block == "MultiTask" else ""
        raise AdapterError(f"{block}{via}: its rows would get {what} of different lengths ({named}); every row "
                           f"of one batch needs the same {what} length (a batch is one rectangle): send rows with "
                           f"different {what} in separate calls.")
    return lengths[0] if lengths else 0


def _routed_children(plan: PlanNode) -> tuple[PlanNode, ...]:
    """The children of a row-routing block that rows of this call go to: for a ``MultiTask`` those with rows
    (the call's task sizes, counted on the host), else all."""
    if type(plan) is MultiTaskPlan:
        ctx = current_context()
        sizes = ctx.task_sizes if ctx is not None else None
        if sizes is not None and len(sizes) == len(plan.children):
            used = tuple(c for c, n in zip(plan.children, sizes) if n)
            return used or plan.children
    return plan.children


def cache_length(cache: Any, layer_idx: int | None = None) -> int:
    """Tokens a cache holds (0 for ``None``); of one layer when ``layer_idx`` is given."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        value = cache.get_seq_length() if layer_idx is None else cache.get_seq_length(layer_idx)
        return int(value)
    if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)) and cache[0]:
        return int(cache[0][0].shape[-2])
    return 0


class PromptUnit(nn.Module):
    """One prompt: ``embedding`` (``P × d``)."""

    def __init__(self, length: int, width: int, dtype: torch.dtype, device: torch.device | None,
                 init: torch.Tensor | None = None, scale: float = 0.5, seed: int | None = None) -> None:
        super().__init__()
        if init is None:
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
            init = (torch.rand(length, width, generator=gen) * 2 - 1) * scale
        self.embedding = nn.Parameter(init.detach().clone().to(dtype=dtype, device=device))

    @property
    def length(self) -> int:
        return self.embedding.shape[0]


class PromptLayer(AdapterLayer):
    """Hosts every prompt adapter of the model; driven by the entry module's hooks.

    Plain data only (so replicas, copies and pickles work): ``params`` (the entry module's forward
    parameter names), ``embed_path`` (its input embedding, relative to it), ``strip`` (cut the prompt
    from the outputs).
    """

    def __init__(self, location: str, params: tuple[str, ...], embed_path: str, strip: bool) -> None:
        super().__init__(location)
        self.params = params
        self.embed_path = embed_path
        self.strip = strip
        self.hooked = False

    def leaf(self, name: str, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """``[prompt; embeds]`` for rows ``embeds = inputs[0]`` (b × T × d)."""
        embeds = inputs[0]
        prompt = self.adapters[name].embedding.to(embeds.dtype)
        return torch.cat([prompt.unsqueeze(0).expand(embeds.shape[0], -1, -1), embeds], dim=1)

    def stack(self, node: StackPlan, inputs: tuple[torch.Tensor, ...], run: Any) -> torch.Tensor:
        """``Stack(a, b)``: ``[prompt_a; prompt_b; embeds]`` (the first adapter's prompt comes first)."""
        out = inputs[0]
        for child in reversed(node.children):
            out = run(child, (out, *inputs[1:]))
        return out

    def length(self, plan: PlanNode | None) -> int:
        return plan_length(plan, lambda n: self.adapters[n].length, "prompts")

    def extra_repr(self) -> str:
        return f"location={self.location}, strip={self.strip}"


def _pad_front(mask: torch.Tensor, length: int, value: int) -> torch.Tensor:
    if mask.dim() != 2:
        raise AdapterError(f"Prompt tuning needs a 2-D attention mask (batch × tokens); got shape {list(mask.shape)}.")
    return torch.cat([mask.new_full((mask.shape[0], length), value), mask], dim=1)


def _positions(pos: torch.Tensor, length: int, prefill: bool) -> torch.Tensor:
    if pos.dim() != 2:
        raise AdapterError(f"Prompt tuning supports 2-D position_ids (rows × tokens); got {list(pos.shape)}.")
    shifted = pos + length
    if not prefill:
        return shifted
    front = torch.arange(length, device=pos.device, dtype=pos.dtype).unsqueeze(0).expand(pos.shape[0], -1)
    return torch.cat([front, shifted], dim=1)


def refuse_fixed_size(cache: Any, length: int) -> None:
    """Refuse a fixed-size cache (``cache_implementation="static"``: ``generate()`` sizes it, and builds its
    attention masks ahead of the call, for the text tokens only, so the prompt's positions fit neither).

    :raises AdapterError: ``cache`` is a compileable (fixed-size) transformers cache."""
    if fixed_size(cache):
        raise AdapterError(f"Prompt tuning cannot use a static (fixed-size) cache: generate() sizes it and its "
                           f"attention masks for the text tokens, without the prompt's {length} virtual tokens. "
                           "Generate with the default dynamic cache (no cache_implementation='static'), or use "
                           "prefix tuning, which works with static caches and torch.compile.")


def prompt_pre_hook(attr: str, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook of the entry module (see the module docstring)."""
    layer = module._modules.get(attr)
    plan = layer.active_plan() if layer is not None else None
    length = 0 if plan is None else layer.length(plan)
    if not length:  # no prompt, or no row of this call goes to one (per-row routing to other adapters)
        push_call(module, 0)
        return None
    names = layer.params
    cache = get_arg(names, args, kwargs, *CACHE_KEYS)
    prefill = cache_length(cache) == 0
    if prefill:
        refuse_fixed_size(cache, length)
        embeds = get_arg(names, args, kwargs, "inputs_embeds")
        if embeds is None:
            ids = get_arg(names, args, kwargs, "input_ids")
            if ids is None:
                raise AdapterError("Prompt tuning needs input_ids or inputs_embeds in the call.")
            embeds = module.get_submodule(layer.embed_path)(ids)
        new = layer.run_plan(plan, (embeds,))
        args = set_arg(names, args, kwargs, "input_ids", None)
        args = set_arg(names, args, kwargs, "inputs_embeds", new)
        tt = get_arg(names, args, kwargs, "token_type_ids")
        if isinstance(tt, torch.Tensor):
            args = set_arg(names, args, kwargs, "token_type_ids", _pad_front(tt, length, 0))
    mask = get_arg(names, args, kwargs, "attention_mask")
    if isinstance(mask, torch.Tensor):
        mask = _pad_front(mask, length, 1)
        args = set_arg(names, args, kwargs, "attention_mask", mask)
    ctx = current_context()
    if prefill and ctx is not None and ctx.token == layer._adapters_token:
        # the call's token layout, as methods that read it (ReFT) must see it: the prompt is P real tokens
        ctx.attention_mask = mask if isinstance(mask, torch.Tensor) else ctx.attention_mask
        if ctx.prompt_lengths is not None:
            ctx.prompt_lengths = ctx.prompt_lengths + length
    pos = get_arg(names, args, kwargs, "position_ids")
    if isinstance(pos, torch.Tensor):
        args = set_arg(names, args, kwargs, "position_ids", _positions(pos, length, prefill))
    push_call(module, length if (prefill and layer.strip) else 0)
    return args, kwargs


def _trim(value: Any, length: int, rows_only: bool = False) -> Any:
    if isinstance(value, torch.Tensor):
        if rows_only:
            return value[..., length:, :] if value.dim() >= 2 else value
        return value[:, length:] if value.dim() >= 2 else value
    if isinstance(value, tuple):
        return tuple(_trim(v, length, rows_only) for v in value)
    return value


def prompt_post_hook(attr: str, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    """Forward hook of a single-stack entry module: the prompt's positions cut from the outputs."""
    length = pop_call(module)
    if not length or output is None:  # None: the forward raised (this hook always runs, to pop the call)
        return None
    if isinstance(output, tuple) and not hasattr(output, "keys"):
        return (_trim(output[0], length), *output[1:])
    for key in ("last_hidden_state", "hidden_states"):
        if output.get(key) is not None:
            output[key] = _trim(output[key], length)
    if output.get("attentions") is not None:
        output["attentions"] = _trim(output["attentions"], length, rows_only=True)
    return output


def decoder_mask_hook(params: tuple[str, ...], module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """Forward pre-hook of the decoder stack: an encoder attention mask shorter than the encoder states
    (the caller's mask, made before the prompt was added) gets ones in front for the prompt."""
    states = get_arg(params, args, kwargs, "encoder_hidden_states")
    mask = get_arg(params, args, kwargs, "encoder_attention_mask")
    if not (isinstance(states, torch.Tensor) and isinstance(mask, torch.Tensor) and mask.dim() == 2):
        return None
    extra = states.shape[1] - mask.shape[1]
    if extra <= 0:
        return None
    args = set_arg(params, args, kwargs, "encoder_attention_mask", _pad_front(mask, extra, 1))
    return args, kwargs
