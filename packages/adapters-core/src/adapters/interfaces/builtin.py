"""Built-in model interfaces, keyed by ``config.model_type``.

Registered through core's ``adapters.interfaces`` entry points, the same way a third-party
interface package would register its own.

Paths follow the module structure of transformers 5.x. Conventions used below:

* ``layer_intermediate_proj`` is the FFN's first projection. For gated MLPs it is the *up*
  (non-activated) branch when gate and up are separate modules (llama ``mlp.up_proj``), or the
  fused gate+up projection when they share one module (phi3 ``gate_up_proj``, ModernBERT ``Wi``:
  both output ``2 * intermediate_size``).
* ``layer_pre_*`` name a module whose first input is the residual stream entering the sub-block:
  the norm in front of it for pre-norm models, the sub-block itself for post-norm models.
* ``layer_ln_1`` / ``layer_ln_2`` are set only for post-norm models (the norm right after the
  attention / FFN residual add).

A few configurations of a model type need a different interface (gated T5 / T5 v1.1 / FLAN-T5,
post-norm OPT, BERT-style decoders with cross-attention); :func:`interface_for_config` picks it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..hookspecs import hookimpl
from ..interface import AdapterModelInterface

__all__ = ["BUILTIN_INTERFACES", "VARIANT_INTERFACES", "adapters_register_model_interfaces",
           "interface_for_config"]

ALL_METHODS = None  # every installed method family may attach

# --------------------------------------------------------------------------- decoder-only, pre-norm
# llama, mistral, qwen2, qwen3, gemma: x + attn(input_layernorm(x)); x + mlp(post_attention_layernorm(x)).
_LLAMA_LIKE = {
    "model_embeddings": "embed_tokens",
    "model_layers": "layers",
    "layer_self_attn": "self_attn",
    "attn_q_proj": "q_proj",
    "attn_k_proj": "k_proj",
    "attn_v_proj": "v_proj",
    "attn_o_proj": "o_proj",
    "layer_intermediate_proj": "mlp.up_proj",
    "layer_output_proj": "mlp.down_proj",
    "layer_pre_self_attn": "input_layernorm",
    "layer_pre_ffn": "post_attention_layernorm",
}

# gemma2 / gemma3: "sandwich" norms. post_attention_layernorm normalises the attention *output* before
# the residual add (its input is not the residual stream); the FFN's input norm is pre_feedforward_layernorm.
_GEMMA2_LIKE = {**_LLAMA_LIKE, "layer_pre_ffn": "pre_feedforward_layernorm"}

# --------------------------------------------------------------------------- encoder-only, post-norm
# bert, roberta, xlm-roberta, electra: LN(x + attn(x)); LN(x + ffn(x)). The self-attention module is
# BertAttention (projections under .self, output projection and norm under .output).
_BERT_LIKE = {
    "model_embeddings": "embeddings",
    "model_layers": "encoder.layer",
    "layer_self_attn": "attention",
    "attn_q_proj": "self.query",
    "attn_k_proj": "self.key",
    "attn_v_proj": "self.value",
    "attn_o_proj": "output.dense",
    "layer_intermediate_proj": "intermediate.dense",
    "layer_output_proj": "output.dense",
    "layer_pre_self_attn": "attention.self",
    "layer_pre_ffn": "intermediate",
    "layer_ln_1": "attention.output.LayerNorm",
    "layer_ln_2": "output.LayerNorm",
}

_T5 = {
    "model_embeddings": "shared",
    # T5Model / T5ForConditionalGeneration hold both stacks themselves (there is no `transformer`
    # attribute, so the model itself is the base model); T5ForSequenceClassification holds a T5Model
    # at `transformer`, its base_model_prefix.
    "model_layers": ["encoder.block", "decoder.block"],
    # T5Block.layer: [T5LayerSelfAttention, (T5LayerCrossAttention, decoder only), T5LayerFF].
    "layer_self_attn": "layer.0.SelfAttention",
    "layer_cross_attn": "layer.1.EncDecAttention",  # absent in encoder blocks (layer.1 is the FFN there)
    "attn_q_proj": "q",
    "attn_k_proj": "k",
    "attn_v_proj": "v",
    "attn_o_proj": "o",
    "layer_intermediate_proj": "layer.-1.DenseReluDense.wi",
    "layer_output_proj": "layer.-1.DenseReluDense.wo",
    "layer_pre_self_attn": "layer.0.layer_norm",
    # In encoder blocks this path also exists (it is the FFN's norm), but those blocks have no
    # cross-attention, so nothing attaches there.
    "layer_pre_cross_attn": "layer.1.layer_norm",
    "layer_pre_ffn": "layer.-1.layer_norm",
}

_OPT = {
    # OPTModel holds the layers under .decoder; OPTFor* hold an OPTModel at .model (base_model_prefix).
    "model_embeddings": "decoder.embed_tokens",
    "model_layers": "decoder.layers",
    "layer_self_attn": "self_attn",
    "attn_q_proj": "q_proj",
    "attn_k_proj": "k_proj",
    "attn_v_proj": "v_proj",
    "attn_o_proj": "out_proj",
    "layer_intermediate_proj": "fc1",
    "layer_output_proj": "fc2",
    # Pre-norm OPT (do_layer_norm_before=True, the default and all sizes except 350m). The FFN runs on
    # hidden states flattened to (batch * seq, hidden): final_layer_norm, fc1 and fc2 see 2-D tensors.
    "layer_pre_self_attn": "self_attn_layer_norm",
    "layer_pre_ffn": "final_layer_norm",
}

BUILTIN_INTERFACES: dict[str, AdapterModelInterface] = {
    "llama": AdapterModelInterface(model_type="llama", **_LLAMA_LIKE),
    "mistral": AdapterModelInterface(model_type="mistral", **_LLAMA_LIKE),
    "qwen2": AdapterModelInterface(model_type="qwen2", **_LLAMA_LIKE),
    "qwen3": AdapterModelInterface(model_type="qwen3", **_LLAMA_LIKE),
    "gemma": AdapterModelInterface(model_type="gemma", **_LLAMA_LIKE),
    "gemma2": AdapterModelInterface(model_type="gemma2", **_GEMMA2_LIKE),
    "gemma3_text": AdapterModelInterface(model_type="gemma3_text", **_GEMMA2_LIKE),
    # phi: one norm feeds a *parallel* attention + MLP block: x + attn(ln(x)) + mlp(ln(x)). The residual
    # stream entering the FFN is therefore the layer input too, i.e. the input of input_layernorm.
    "phi": AdapterModelInterface(
        model_type="phi",
        model_embeddings="embed_tokens",
        model_layers="layers",
        layer_self_attn="self_attn",
        attn_q_proj="q_proj",
        attn_k_proj="k_proj",
        attn_v_proj="v_proj",
        attn_o_proj="dense",
        layer_intermediate_proj="mlp.fc1",
        layer_output_proj="mlp.fc2",
        layer_pre_self_attn="input_layernorm",
        layer_pre_ffn="input_layernorm",
    ),
    # phi3: fused q|k|v (grouped-query widths, derived from the config) and fused gate|up (2 * intermediate).
    "phi3": AdapterModelInterface(
        model_type="phi3",
        model_embeddings="embed_tokens",
        model_layers="layers",
        layer_self_attn="self_attn",
        attn_qkv_proj="qkv_proj",
        attn_o_proj="o_proj",
        layer_intermediate_proj="mlp.gate_up_proj",
        layer_output_proj="mlp.down_proj",
        layer_pre_self_attn="input_layernorm",
        layer_pre_ffn="post_attention_layernorm",
    ),
    # gpt2: Conv1D projections (weight is in x out). The block's own `ln_1` / `ln_2` are *pre*-norms,
    # so they are pre_self_attn / pre_ffn here, not layer_ln_1 / layer_ln_2. Cross-attention
    # (add_cross_attention=True) is not mapped: its c_attn projects only k|v and q comes from q_attn.
    "gpt2": AdapterModelInterface(
        model_type="gpt2",
        model_embeddings="wte",
        model_layers="h",
        layer_self_attn="attn",
        attn_qkv_proj="c_attn",
        attn_o_proj="c_proj",
        layer_intermediate_proj="mlp.c_fc",
        layer_output_proj="mlp.c_proj",
        layer_pre_self_attn="ln_1",
        layer_pre_ffn="ln_2",
    ),
    # gpt_neox: query_key_value is laid out per head ([q_h | k_h | v_h] for every head). With
    # use_parallel_residual=True (the default) both norms read the layer input: x + attn(ln1(x)) +
    # mlp(ln2(x)); with False, post_attention_layernorm reads x + attn(...). Either way the input of
    # post_attention_layernorm is the residual stream entering the MLP.
    "gpt_neox": AdapterModelInterface(
        model_type="gpt_neox",
        model_embeddings="embed_in",
        model_layers="layers",
        layer_self_attn="attention",
        attn_qkv_proj="query_key_value",
        attn_qkv_layout="per_head",
        attn_o_proj="dense",
        layer_intermediate_proj="mlp.dense_h_to_4h",
        layer_output_proj="mlp.dense_4h_to_h",
        layer_pre_self_attn="input_layernorm",
        layer_pre_ffn="post_attention_layernorm",
    ),
    "opt": AdapterModelInterface(model_type="opt", **_OPT),
    "bert": AdapterModelInterface(model_type="bert", **_BERT_LIKE),
    "roberta": AdapterModelInterface(model_type="roberta", **_BERT_LIKE),
    "xlm-roberta": AdapterModelInterface(model_type="xlm-roberta", **_BERT_LIKE),
    "electra": AdapterModelInterface(model_type="electra", **_BERT_LIKE),
    # distilbert: post-norm; attention and ffn are called on the residual stream directly.
    "distilbert": AdapterModelInterface(
        model_type="distilbert",
        model_embeddings="embeddings",
        model_layers="transformer.layer",
        layer_self_attn="attention",
        attn_q_proj="q_lin",
        attn_k_proj="k_lin",
        attn_v_proj="v_lin",
        attn_o_proj="out_lin",
        layer_intermediate_proj="ffn.lin1",
        layer_output_proj="ffn.lin2",
        layer_pre_self_attn="attention",
        layer_pre_ffn="ffn",
        layer_ln_1="sa_layer_norm",
        layer_ln_2="output_layer_norm",
    ),
    # modernbert: pre-norm; Wqkv is [q | k | v] (no grouped-query attention); Wi is a fused GLU
    # projection with 2 * intermediate_size outputs. attn_norm is nn.Identity in layer 0 (the embeddings
    # are already normalised) -- it still receives the residual stream, so it is a valid pre_self_attn.
    "modernbert": AdapterModelInterface(
        model_type="modernbert",
        model_embeddings="embeddings",
        model_layers="layers",
        layer_self_attn="attn",
        attn_qkv_proj="Wqkv",
        attn_o_proj="Wo",
        layer_intermediate_proj="mlp.Wi",
        layer_output_proj="mlp.Wo",
        layer_pre_self_attn="attn_norm",
        layer_pre_ffn="mlp_norm",
    ),
    "t5": AdapterModelInterface(model_type="t5", **_T5),
    # bart: post-norm encoder-decoder. The decoder's norm after the cross-attention residual add
    # (encoder_attn_layer_norm) has no interface field.
    "bart": AdapterModelInterface(
        model_type="bart",
        model_embeddings="shared",
        model_layers=["encoder.layers", "decoder.layers"],
        layer_self_attn="self_attn",
        layer_cross_attn="encoder_attn",  # decoder layers only
        attn_q_proj="q_proj",
        attn_k_proj="k_proj",
        attn_v_proj="v_proj",
        attn_o_proj="out_proj",
        layer_intermediate_proj="fc1",
        layer_output_proj="fc2",
        layer_pre_self_attn="self_attn",
        layer_pre_cross_attn="encoder_attn",
        layer_pre_ffn="fc1",
        layer_ln_1="self_attn_layer_norm",
        layer_ln_2="final_layer_norm",
    ),
    # vit (transformers 5: ViTModel.layers, ViTAttention with q/k/v/o_proj, ViTMLP fc1/fc2): pre-norm.
    "vit": AdapterModelInterface(
        model_type="vit",
        model_embeddings="embeddings",
        model_layers="layers",
        layer_self_attn="attention",
        attn_q_proj="q_proj",
        attn_k_proj="k_proj",
        attn_v_proj="v_proj",
        attn_o_proj="o_proj",
        layer_intermediate_proj="mlp.fc1",
        layer_output_proj="mlp.fc2",
        layer_pre_self_attn="layernorm_before",
        layer_pre_ffn="layernorm_after",
    ),
}

_BERT_CROSS = {**_BERT_LIKE, "layer_cross_attn": "crossattention", "layer_pre_cross_attn": "crossattention.self"}

#: Interfaces for configurations whose module structure differs from the model type's default.
#: Keys are ``"<model_type>:<variant>"``; :func:`interface_for_config` chooses among them.
VARIANT_INTERFACES: dict[str, AdapterModelInterface] = {
    # T5 v1.1 / FLAN-T5 / mT5-style gated FFN (feed_forward_proj="gated-*"): wi_0 is the activated gate,
    # wi_1 the linear "up" branch.
    "t5:gated": AdapterModelInterface(
        model_type="t5", **{**_T5, "layer_intermediate_proj": "layer.-1.DenseReluDense.wi_1"}
    ),
    # Post-norm OPT (do_layer_norm_before=False, e.g. opt-350m): LN(x + attn(x)); LN(x + ffn(x)).
    "opt:post_norm": AdapterModelInterface(
        model_type="opt",
        **{
            **_OPT,
            "layer_pre_self_attn": "self_attn",
            "layer_pre_ffn": "fc1",
            "layer_ln_1": "self_attn_layer_norm",
            "layer_ln_2": "final_layer_norm",
        },
    ),
    # BERT-style decoders (is_decoder=True, add_cross_attention=True), e.g. inside an EncoderDecoderModel.
    **{
        f"{model_type}:cross_attention": AdapterModelInterface(model_type=model_type, **_BERT_CROSS)
        for model_type in ("bert", "roberta", "xlm-roberta", "electra")
    },
}


def interface_for_config(config: Any) -> AdapterModelInterface | None:
    """The built-in interface that fits ``config`` (a transformers config), or ``None`` if there is none.

    Same as ``BUILTIN_INTERFACES[config.model_type]`` except for configurations with a different
    module structure (see :data:`VARIANT_INTERFACES`).
    """
    model_type = getattr(config, "model_type", None)
    if model_type == "t5" and getattr(config, "is_gated_act", False):
        return VARIANT_INTERFACES["t5:gated"]
    if model_type == "opt" and getattr(config, "do_layer_norm_before", True) is False:
        return VARIANT_INTERFACES["opt:post_norm"]
    if getattr(config, "add_cross_attention", False) and f"{model_type}:cross_attention" in VARIANT_INTERFACES:
        return VARIANT_INTERFACES[f"{model_type}:cross_attention"]
    return BUILTIN_INTERFACES.get(model_type)


@hookimpl
def adapters_register_model_interfaces(register: Callable[..., None]) -> None:
    """Register every built-in interface."""
    for model_type, interface in BUILTIN_INTERFACES.items():
        register(model_type, interface, for_config=interface_for_config)
