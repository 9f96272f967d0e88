"""Tiny random Transformers for tests, one builder per supported ``config.model_type``.

Used by every package's test suite, and by plugin authors for theirs.

Every model is built from a config (no downloads), seeded with ``torch.manual_seed(0)`` and put in
eval mode. Sizes: hidden 32, 2 layers (2 encoder + 2 decoder layers for T5/BART), 4 heads (2
key/value heads where the architecture has grouped-query attention), head dim 8, FFN width 64,
vocabulary 128. ViT takes 32x32 images in 8x8 patches.

:mod:`adapters.testing.conformance` holds the conformance checks every method must pass (ours run
them on every architecture; a third-party method package runs them on its own method).

Reuse from other test files::

    from adapters.testing import MODEL_TYPES, tiny_model, tiny_inputs, supports

    model = tiny_model("qwen3", "causal_lm")
    out = model(**tiny_inputs(model))
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "DECODER_ONLY",
    "ENCODER_DECODER",
    "ENCODER_ONLY",
    "GQA",
    "HEADS",
    "HEAD_DIM",
    "HIDDEN",
    "INTERMEDIATE",
    "KV_HEADS",
    "LAYERS",
    "MODEL_TYPES",
    "TASKS",
    "VISION",
    "VOCAB",
    "count_kernel_ops",
    "replicate_on_cpu",
    "ToyEncoder",
    "toy_interface",
    "count_step_ops",
    "frozen_base_step_ops",
    "supports",
    "tiny_config",
    "tiny_dataset",
    "tiny_inputs",
    "tiny_model",
]

HIDDEN = 32
INTERMEDIATE = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
LAYERS = 2
VOCAB = 128
#: Token ids below this are reserved for special tokens (pad/bos/eos/...); tiny_inputs never samples them.
FIRST_PLAIN_TOKEN = 4

DECODER_ONLY = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3", "gpt2",
                "gpt_neox", "opt")
ENCODER_ONLY = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "modernbert")
ENCODER_DECODER = ("t5", "bart")
VISION = ("vit",)
MODEL_TYPES = DECODER_ONLY + ENCODER_ONLY + ENCODER_DECODER + VISION
#: Model types whose tiny model has fewer key/value heads than query heads.
GQA = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3")

#: ``task`` -> the Auto class that builds it.
TASKS = {
    "base": "AutoModel",
    "causal_lm": "AutoModelForCausalLM",
    "seq2seq_lm": "AutoModelForSeq2SeqLM",
    "seq_cls": "AutoModelForSequenceClassification",
}

_DECODER_COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "head_dim": HEAD_DIM,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

_BERT_COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "max_position_embeddings": 64,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
}

_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {**_DECODER_COMMON},
    "mistral": {**_DECODER_COMMON, "sliding_window": None},
    "qwen2": {**_DECODER_COMMON},
    "qwen3": {**_DECODER_COMMON},
    "gemma": {**_DECODER_COMMON},
    "gemma2": {**_DECODER_COMMON, "sliding_window": 16},
    "gemma3_text": {**_DECODER_COMMON, "sliding_window": 16},
    "phi": {**_DECODER_COMMON},
    "phi3": {**_DECODER_COMMON, "original_max_position_embeddings": 64},
    "gpt2": {
        "vocab_size": VOCAB, "n_embd": HIDDEN, "n_inner": INTERMEDIATE, "n_layer": LAYERS, "n_head": HEADS,
        "n_positions": 64, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
    },
    "gpt_neox": {
        "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "max_position_embeddings": 64, "pad_token_id": 0, "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "opt": {
        "vocab_size": VOCAB, "hidden_size": HIDDEN, "ffn_dim": INTERMEDIATE, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "word_embed_proj_dim": HIDDEN, "max_position_embeddings": 64,
        "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2,
    },
    "bert": {**_BERT_COMMON, "pad_token_id": 0},
    "roberta": {**_BERT_COMMON},
    "xlm-roberta": {**_BERT_COMMON},
    "electra": {**_BERT_COMMON, "embedding_size": HIDDEN, "pad_token_id": 0},
    "distilbert": {
        "vocab_size": VOCAB, "dim": HIDDEN, "hidden_dim": INTERMEDIATE, "n_layers": LAYERS, "n_heads": HEADS,
        "max_position_embeddings": 64, "pad_token_id": 0,
    },
    "modernbert": {
        "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "max_position_embeddings": 64, "local_attention": 16, "pad_token_id": 0,
        "bos_token_id": 1, "cls_token_id": 1, "eos_token_id": 2, "sep_token_id": 2,
    },
    "t5": {
        "vocab_size": VOCAB, "d_model": HIDDEN, "d_kv": HEAD_DIM, "d_ff": INTERMEDIATE, "num_layers": LAYERS,
        "num_decoder_layers": LAYERS, "num_heads": HEADS, "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 16, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
    },
    "bart": {
        "vocab_size": VOCAB, "d_model": HIDDEN, "encoder_layers": LAYERS, "decoder_layers": LAYERS,
        "encoder_attention_heads": HEADS, "decoder_attention_heads": HEADS, "encoder_ffn_dim": INTERMEDIATE,
        "decoder_ffn_dim": INTERMEDIATE, "max_position_embeddings": 64, "pad_token_id": 1, "bos_token_id": 0,
        "eos_token_id": 2, "decoder_start_token_id": 2, "forced_eos_token_id": None,
    },
    "vit": {
        "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "image_size": 32, "patch_size": 8, "num_channels": 3, "encoder_stride": 8,
    },
}


def supports(model_type: str, task: str) -> bool:
    """Whether :func:`tiny_model` can build ``task`` for ``model_type``."""
    if model_type not in _CONFIGS or task not in TASKS:
        return False
    if task == "base":
        return True
    if model_type in VISION:
        return False
    if task == "causal_lm":
        # Encoder-only models have no (meaningful) causal LM; encoder-decoder models get their seq2seq LM.
        return model_type in DECODER_ONLY or model_type in ENCODER_DECODER
    if task == "seq2seq_lm":
        return model_type in ENCODER_DECODER
    return True  # seq_cls: every text model


def tiny_config(model_type: str, **overrides: Any):
    """The tiny config of ``model_type``; ``overrides`` replace or add config fields."""
    from transformers import CONFIG_MAPPING

    if model_type not in _CONFIGS:
        raise ValueError(f"No tiny config for model_type {model_type!r}; known: {sorted(_CONFIGS)}.")
    kwargs = {**_CONFIGS[model_type], **overrides}
    return CONFIG_MAPPING[model_type](**kwargs)


def tiny_model(model_type: str, task: str = "base", *, attn_implementation: str = "eager", **overrides: Any):
    """A tiny random model of ``model_type`` in eval mode (seeded with ``torch.manual_seed(0)``).

    :param task: ``"base"`` (AutoModel), ``"causal_lm"`` (AutoModelForCausalLM; for T5/BART the
        encoder-decoder LM, AutoModelForSeq2SeqLM), ``"seq2seq_lm"`` (T5/BART only) or ``"seq_cls"``
        (AutoModelForSequenceClassification, 2 labels). ViT supports only ``"base"`` (a ViTModel).
    :param overrides: config fields to change (e.g. ``feed_forward_proj="gated-gelu"`` for T5).
    """
    import transformers

    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; use one of {sorted(TASKS)}.")
    if not supports(model_type, task):
        raise ValueError(f"tiny_model cannot build task {task!r} for model_type {model_type!r}.")
    if task == "causal_lm" and model_type in ENCODER_DECODER:
        task = "seq2seq_lm"
    if task == "seq_cls":
        overrides.setdefault("num_labels", 2)
    config = tiny_config(model_type, **overrides)
    auto_cls = getattr(transformers, TASKS[task])
    torch.manual_seed(0)
    model = auto_cls.from_config(config, attn_implementation=attn_implementation)
    model.eval()
    return model


def tiny_inputs(model: torch.nn.Module, batch: int = 2, seq: int = 8, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded forward inputs for a model built by :func:`tiny_model` (the global RNG is not touched).

    Text models get ``input_ids`` (no special tokens, except a final EOS for T5/BART, which their
    sequence-classification heads need) and an all-ones ``attention_mask``; T5/BART also get
    ``decoder_input_ids`` of the same length; ViT gets ``pixel_values``.
    """
    config = model.config
    model_type = config.model_type
    gen = torch.Generator().manual_seed(seed)
    if model_type in VISION:
        size, channels = config.image_size, config.num_channels
        return {"pixel_values": torch.randn(batch, channels, size, size, generator=gen)}
    vocab = config.vocab_size
    input_ids = torch.randint(FIRST_PLAIN_TOKEN, vocab, (batch, seq), generator=gen)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    if model_type in ENCODER_DECODER:
        input_ids[:, -1] = config.eos_token_id
        decoder_input_ids = torch.randint(FIRST_PLAIN_TOKEN, vocab, (batch, seq), generator=gen)
        decoder_input_ids[:, 0] = config.decoder_start_token_id
        inputs["decoder_input_ids"] = decoder_input_ids
    return inputs


def tiny_dataset(n: int = 16, seq: int = 10, *, seed: int = 0, labels: str = "lm") -> list[dict[str, torch.Tensor]]:
    """``n`` seeded training rows for a ``Trainer`` on a :func:`tiny_model` (the global RNG is not touched):
    ``input_ids`` (``seq`` plain tokens below :data:`VOCAB`), an all-ones ``attention_mask`` and ``labels``:
    the ids themselves for ``"lm"``, one class of two (a 0-d tensor) for ``"cls"``."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(FIRST_PLAIN_TOKEN, VOCAB, (seq,), generator=gen)
        label = ids.clone() if labels == "lm" else torch.randint(0, 2, (), generator=gen)
        rows.append({"input_ids": ids, "attention_mask": torch.ones(seq, dtype=torch.long), "labels": label})
    return rows


#: ATen ops that only make a new view of existing data or touch metadata: no kernel runs for them.
_METADATA_OPS = frozenset({
    "alias", "as_strided", "detach", "expand", "permute", "reshape", "select", "slice", "split",
    "split_with_sizes", "squeeze", "t", "transpose", "unbind", "unflatten", "unsqueeze", "view",
    "_reshape_alias", "_unsafe_view", "lift_fresh", "empty", "empty_like", "empty_strided",
})


def count_kernel_ops(fn: Callable[[], Any]) -> Counter:
    """Run ``fn`` and count the ATen operations that do arithmetic or move data, forward and backward.

    Views, transposes, ``detach`` and allocations are left out: on a GPU each counted op is (at
    least) one kernel launch. Deterministic, so a test can pin how many operations a method adds
    per adapted site without timing anything. Keys are op names such as ``"aten.mm"``.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: Counter = Counter()

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            name = func.overloadpacket.__name__
            if name not in _METADATA_OPS:
                counts[f"aten.{name}"] += 1
            return func(*args, **(kwargs or {}))

    with _Count():
        fn()
    return counts


def count_step_ops(model: torch.nn.Module, embeds: torch.Tensor, train: bool) -> int:
    """:func:`count_kernel_ops` of one ``model(inputs_embeds=embeds)`` call, without gradients, or
    (``train``) with a backward pass from the last hidden state to a fresh leaf copy of ``embeds``.

    Compare a model with adapters against the same model without them to get what the adapters add;
    for models that take ``inputs_embeds`` and return ``last_hidden_state`` (the base models of
    :func:`tiny_model`'s text model types).
    """

    def step() -> None:
        if train:
            x = embeds.detach().requires_grad_(True)  # a fresh leaf: no gradient accumulates into it
            model(inputs_embeds=x, use_cache=False).last_hidden_state.float().pow(2).mean().backward()
        else:
            with torch.no_grad():
                model(inputs_embeds=embeds, use_cache=False)

    return sum(count_kernel_ops(step).values())


def frozen_base_step_ops(model_type: str, batch: int = 2, seq: int = 8) -> tuple[torch.Tensor, int, int]:
    """``inputs_embeds`` for :func:`tiny_model` ``(model_type)`` and :func:`count_step_ops` of that model
    with every weight frozen: ``(embeds, forward ops, training-step ops)``, the baseline to subtract
    from the same model type with adapters (built by a second ``tiny_model`` call: the same weights)."""
    base = tiny_model(model_type)
    for p in base.parameters():
        p.requires_grad_(False)
    embeds = torch.randn(batch, seq, base.config.hidden_size, generator=torch.Generator().manual_seed(0))
    return embeds, count_step_ops(base, embeds, False), count_step_ops(base, embeds, True)


def replicate_on_cpu(model: torch.nn.Module, copies: int = 2,
                     transform: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                     ) -> list[torch.nn.Module]:
    """``torch.nn.parallel.replicate(model, range(copies))`` (what ``nn.DataParallel`` does every step) on
    CPU: torch's own replication of the module tree, with the device broadcast replaced by clones.

    :param transform: ``transform(copy_index, original, copy) -> tensor`` applied to every parameter and
        buffer copy, e.g. to give one replica other weights and check that it computes with its own.
    :returns: the replicas (gradients flow from their clones back to ``model``'s parameters).

    A module that keeps a reference to another module outside its submodules (a closure, a hook bound
    to a module, a plain attribute) computes with the original's tensors in every replica: comparing
    a replica's output with the original's catches that on a machine without GPUs.
    """
    import importlib
    from unittest import mock

    replicate_module = importlib.import_module("torch.nn.parallel.replicate")  # the module, not the function

    def broadcast(tensors: Any, devices: Any, detach: bool = False) -> list[list[torch.Tensor]]:
        out = []
        for index in range(len(devices)):
            row = []
            for tensor in tensors:
                copy = (tensor.detach() if detach else tensor).clone()
                row.append(transform(index, tensor, copy) if transform is not None else copy)
            out.append(row)
        return out

    with mock.patch.object(replicate_module, "_broadcast_coalesced_reshape", broadcast):
        return replicate_module.replicate(model, list(range(copies)))


class _ToyBlock(torch.nn.Module):
    """A pre-norm Transformer block written by hand (no transformers): q/k/v/out attention, up/down FFN."""

    def __init__(self, d: int, ffn_mult: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.attn = torch.nn.ModuleDict({k: torch.nn.Linear(d, d) for k in ("q", "k", "v", "out")})
        wide = ffn_mult * d
        self.ffn = torch.nn.ModuleDict({"up": torch.nn.Linear(d, wide), "down": torch.nn.Linear(wide, d)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        q, k, v = self.attn["q"](h), self.attn["k"](h), self.attn["v"](h)
        a = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v
        x = x + self.attn["out"](a)
        return x + self.ffn["down"](torch.relu(self.ffn["up"](self.norm2(x))))


class ToyEncoder(torch.nn.Module):
    """A plain ``nn.Module`` encoder (embedding + blocks) for tests of models transformers does not know.

    ``checkpointing`` (``None``, ``"reentrant"``, ``"non-reentrant"``) runs each block call through
    ``torch.utils.checkpoint`` (hooks included, as activation-checkpoint wrappers do). ``config`` holds
    ``hidden_size`` (methods that read it, such as ReFT). Use with :func:`toy_interface`.
    """

    def __init__(self, d: int = 16, n: int = 2, ffn_mult: int = 4, vocab: int = 100) -> None:
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(hidden_size=d)
        self.embed = torch.nn.Embedding(vocab, d)
        self.blocks = torch.nn.ModuleList(_ToyBlock(d, ffn_mult) for _ in range(n))
        self.checkpointing: str | None = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(input_ids)
        reentrant = self.checkpointing == "reentrant"
        if reentrant:
            x = x.detach().requires_grad_()  # a reentrant checkpoint needs an input that requires grad
        for block in self.blocks:
            if self.checkpointing:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=reentrant)
            else:
                x = block(x)
        return x


def toy_interface() -> Any:
    """The :class:`~adapters.interface.AdapterModelInterface` of :class:`ToyEncoder`."""
    from ..interface import AdapterModelInterface

    return AdapterModelInterface(
        model_embeddings="embed", model_layers="blocks", layer_self_attn="attn", attn_q_proj="q", attn_k_proj="k",
        attn_v_proj="v", attn_o_proj="out", layer_intermediate_proj="ffn.up", layer_output_proj="ffn.down",
        layer_pre_self_attn="norm1", layer_pre_ffn="norm2",
    )
