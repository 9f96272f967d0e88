"""Built-in model interfaces, keyed by ``config.model_type``.

Registered through core's ``adapters.interfaces`` entry points, the same way a third-party
interface package would register its own.
"""

from __future__ import annotations

from collections.abc import Callable

from ..hookspecs import hookimpl
from ..interface import AdapterModelInterface

ALL_METHODS = None  # every installed method family may attach

_LLAMA_LIKE = dict(
    model_embeddings="embed_tokens",
    model_layers="layers",
    layer_self_attn="self_attn",
    attn_q_proj="q_proj",
    attn_k_proj="k_proj",
    attn_v_proj="v_proj",
    attn_o_proj="o_proj",
    layer_intermediate_proj="mlp.up_proj",
    layer_output_proj="mlp.down_proj",
    layer_pre_self_attn="input_layernorm",
    layer_pre_ffn="post_attention_layernorm",
)

_BERT_LIKE = dict(
    model_embeddings="embeddings",
    model_layers="encoder.layer",
    layer_self_attn="attention",
    attn_q_proj="self.query",
    attn_k_proj="self.key",
    attn_v_proj="self.value",
    attn_o_proj="output.dense",
    layer_intermediate_proj="intermediate.dense",
    layer_output_proj="output.dense",
    layer_pre_self_attn="attention.self",
    layer_pre_ffn="intermediate",
    layer_ln_1="attention.output.LayerNorm",
    layer_ln_2="output.LayerNorm",
)

BUILTIN_INTERFACES: dict[str, AdapterModelInterface] = {
    "llama": AdapterModelInterface(model_type="llama", **_LLAMA_LIKE),
    "qwen3": AdapterModelInterface(model_type="qwen3", **_LLAMA_LIKE),
    "bert": AdapterModelInterface(model_type="bert", **_BERT_LIKE),
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
}


@hookimpl
def adapters_register_model_interfaces(register: Callable[[str, AdapterModelInterface], None]) -> None:
    """Register every built-in interface."""
    for model_type, interface in BUILTIN_INTERFACES.items():
        register(model_type, interface)
