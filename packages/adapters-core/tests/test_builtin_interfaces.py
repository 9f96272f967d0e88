"""The built-in model interfaces resolve on real (tiny) transformers models and point at the right modules.

Besides structural checks (layer counts, projection widths from the config), the wiring checks run
a forward pass with hooks and verify the residual-stream semantics the bottleneck methods rely on:
the ``layer_pre_*`` modules receive the residual stream entering their sub-block, the attention and
FFN output projections feed the residual adds, and ``layer_ln_1`` / ``layer_ln_2`` are the norms right
after those adds.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from adapters.interface import AdapterModelInterface
from adapters.interfaces.builtin import BUILTIN_INTERFACES, VARIANT_INTERFACES, interface_for_config
from adapters.plugins import GROUP_INTERFACES, registry
from adapters.points import InterfaceError, ModelPoints, resolve_path, resolve_points
from adapters.testing import (
    ENCODER_DECODER,
    GQA,
    HEAD_DIM,
    HEADS,
    HIDDEN,
    INTERMEDIATE,
    KV_HEADS,
    MODEL_TYPES,
    TASKS,
    VISION,
    supports,
    tiny_inputs,
    tiny_model,
)

POST_NORM = {"bert", "roberta", "xlm-roberta", "electra", "distilbert", "bart"}
#: FFN first projections that fuse gate and up (output 2 * intermediate_size).
FUSED_GLU = {"phi3", "modernbert"}
FUSED_QKV = {"gpt2", "phi3", "gpt_neox", "modernbert"}
#: Attention and MLP read the same residual stream and are added together: x + attn + mlp.
PARALLEL = {"phi", "gpt_neox"}

TOL = {"atol": 1e-5, "rtol": 1e-4}


@functools.cache
def _model(model_type: str, task: str = "base", **overrides) -> nn.Module:
    # Tests in this file never modify a model (hooks are removed again), so each one is built once.
    return tiny_model(model_type, task, **overrides)


def _points(model_type: str, task: str = "base") -> ModelPoints:
    return resolve_points(_model(model_type, task), registry.interface(model_type))


def _dims(config) -> dict[str, int]:
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    intermediate = next(
        getattr(config, name)
        for name in ("intermediate_size", "ffn_dim", "d_ff", "n_inner", "hidden_dim", "encoder_ffn_dim")
        if getattr(config, name, None) is not None
    )
    if config.model_type == "t5":
        layers = config.num_layers + config.num_decoder_layers
    elif config.model_type == "bart":
        layers = config.encoder_layers + config.decoder_layers
    else:
        layers = config.num_hidden_layers
    return {"hidden": hidden, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "intermediate": intermediate,
                "layers": layers}


def _features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of an nn.Linear or a GPT-2 Conv1D, checking it is one of them."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    assert isinstance(module, Conv1D), f"expected nn.Linear or Conv1D, got {type(module).__name__}"
    return module.weight.shape[0], module.weight.shape[1]


# --------------------------------------------------------------------------- registry


def test_every_builtin_type_is_registered_and_has_an_entry_point():
    assert set(BUILTIN_INTERFACES) == set(MODEL_TYPES)
    entry_points = registry.entry_points()[GROUP_INTERFACES]
    for model_type in MODEL_TYPES:
        assert model_type in entry_points, f"{model_type} is missing from core's adapters.interfaces entry points"
        interface = registry.interface(model_type)
        assert interface is BUILTIN_INTERFACES[model_type]
        assert interface.model_type == model_type
        assert interface.adapter_methods is None
        assert AdapterModelInterface.from_dict(interface.to_dict()) == interface
    assert set(MODEL_TYPES) <= set(registry.interface_types())


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_interface_for_config_defaults_to_the_registered_interface(model_type):
    assert interface_for_config(_model(model_type).config) is BUILTIN_INTERFACES[model_type]


# --------------------------------------------------------------------------- structure


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_structure(model_type):
    model = _model(model_type)
    dims = _dims(model.config)
    # The tiny models really are tiny and (where supported) use grouped-query attention.
    assert (dims["hidden"], dims["heads"], dims["intermediate"]) == (HIDDEN, HEADS, INTERMEDIATE)
    assert dims["head_dim"] == HEAD_DIM
    assert dims["kv_heads"] == (KV_HEADS if model_type in GQA else HEADS)

    points = _points(model_type)
    assert points.num_layers == dims["layers"]
    assert points.hidden_size == dims["hidden"]
    assert len({id(lp.module.module) for lp in points.layers}) == points.num_layers
    assert [lp.index for lp in points.layers] == list(range(points.num_layers))

    # embeddings: the token embedding (or a module holding it); the patch embedding for ViT
    emb = points.embeddings.module
    if model_type in VISION:
        assert hasattr(emb, "patch_embeddings")
    else:
        vocab = model.config.vocab_size
        tables = [m for m in emb.modules() if isinstance(m, nn.Embedding) and m.num_embeddings == vocab]
        assert tables, f"no token embedding table under {points.embeddings.path}"

    q_out, kv_out = dims["heads"] * dims["head_dim"], dims["kv_heads"] * dims["head_dim"]
    inter_out = dims["intermediate"] * (2 if model_type in FUSED_GLU else 1)
    for lp in points.layers:
        attns = [lp.self_attn] + ([lp.cross_attn] if lp.cross_attn is not None else [])
        for ap in attns:
            if model_type in FUSED_QKV:
                assert ap.q is ap.k is ap.v is None
                in_f, out_f = _features(ap.qkv.module)
                assert in_f == dims["hidden"]
                assert ap.fused.sizes == (q_out, kv_out, kv_out)
                assert sum(ap.fused.sizes) == out_f
                assert ap.fused.layout == ("per_head" if model_type == "gpt_neox" else "concat")
                assert ap.fused.num_heads == dims["heads"]
            else:
                assert ap.qkv is None and ap.fused is None
                assert _features(ap.q.module) == (dims["hidden"], q_out)
                assert _features(ap.k.module) == (dims["hidden"], kv_out)
                assert _features(ap.v.module) == (dims["hidden"], kv_out)
                assert len({id(ap.q.module), id(ap.k.module), id(ap.v.module)}) == 3
            assert _features(ap.o.module) == (q_out, dims["hidden"])
        assert _features(lp.intermediate.module) == (dims["hidden"], inter_out)
        assert _features(lp.output.module) == (dims["intermediate"], dims["hidden"])
        assert lp.pre_self_attn is not None and lp.pre_ffn is not None
        if model_type in POST_NORM:
            assert isinstance(lp.ln_1.module, nn.LayerNorm) and isinstance(lp.ln_2.module, nn.LayerNorm)
            assert lp.ln_1.module is not lp.ln_2.module
        else:
            assert lp.ln_1 is None and lp.ln_2 is None
        # location keys are portable and name the layer by its global index
        assert lp.module.location == f"layers.{lp.index}"
        assert lp.self_attn.o.location == f"layers.{lp.index}.self_attn.o"


@pytest.mark.parametrize("model_type", ENCODER_DECODER)
def test_cross_attention_exactly_in_decoder_layers(model_type):
    model = _model(model_type)
    points = _points(model_type)
    n_enc = model.config.num_layers if model_type == "t5" else model.config.encoder_layers
    for lp in points.layers:
        is_decoder = lp.index >= n_enc
        assert lp.stack == int(is_decoder)
        assert lp.module.path.split(".")[0] == ("decoder" if is_decoder else "encoder")
        assert (lp.cross_attn is not None) is is_decoder
        if is_decoder:
            assert lp.pre_cross_attn is not None
            assert lp.cross_attn.module.module is not lp.self_attn.module.module
            assert lp.cross_attn.o.location == f"layers.{lp.index}.cross_attn.o"


@pytest.mark.parametrize("model_type", ["gpt2", "phi3", "gpt_neox", "modernbert"])
def test_fused_qkv_layout_matches_the_models_own_split(model_type):
    """FusedQKV.index picks the same output features the model's attention uses as q, k and v."""
    model = _model(model_type)
    ap = _points(model_type).layers[0].self_attn
    heads, hd = HEADS, HEAD_DIM
    out = ap.qkv.module(torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(1)))
    if model_type == "gpt2":  # GPT2Attention: c_attn(h).split(split_size, dim=2)
        q, k, v = out.split(model.config.hidden_size, dim=-1)
    elif model_type == "phi3":  # Phi3Attention: slices [q | k (kv heads) | v (kv heads)]
        q, k, v = out.split([heads * hd, KV_HEADS * hd, KV_HEADS * hd], dim=-1)
    elif model_type == "gpt_neox":  # GPTNeoXAttention: view(..., heads, 3 * head).chunk(3, dim=-1)
        q, k, v = (t.flatten(-2) for t in out.view(2, 5, heads, 3 * hd).chunk(3, dim=-1))
    else:  # ModernBertAttention: view(..., 3, heads, head).unbind(dim=-3)
        q, k, v = (t.flatten(-2) for t in out.view(2, 5, 3, heads, hd).unbind(dim=-3))
    for which, expected in zip("qkv", (q, k, v)):
        torch.testing.assert_close(out[..., ap.fused.index(which)], expected)


# --------------------------------------------------------------------------- task models

TASK_CASES = [(mt, task) for mt in MODEL_TYPES for task in TASKS if task != "base" and supports(mt, task)]


@pytest.mark.parametrize("model_type,task", TASK_CASES)
def test_points_resolve_on_task_models(model_type, task):
    model = _model(model_type, task)
    base = _points(model_type)
    points = _points(model_type, task)
    # The base model is transformers' own notion of it (for T5ForConditionalGeneration, which holds the
    # stacks itself, that is the model).
    assert points.base_model is model.base_model
    assert bool(points.base_path) is (model.base_model is not model)
    prefix = f"{points.base_path}." if points.base_path else ""
    assert points.num_layers == base.num_layers
    for lp, blp in zip(points.layers, base.layers):
        assert lp.module.path == prefix + blp.module.path
        assert lp.output.path == prefix + blp.output.path
        assert lp.self_attn.o.location == blp.self_attn.o.location
        assert (lp.cross_attn is None) == (blp.cross_attn is None)


@pytest.mark.parametrize("model_type", ["bert", "qwen3", "gpt2", "t5"])
def test_seq_cls_head_is_outside_the_points(model_type):
    model = _model(model_type, "seq_cls")
    points = _points(model_type, "seq_cls")
    base_params = {id(p) for p in points.base_model.parameters()}
    head_params = [name for name, p in model.named_parameters() if id(p) not in base_params]
    assert head_params, "the classification head should live outside the base model"
    for lp in points.layers:
        assert all(id(p) in base_params for p in lp.module.module.parameters())


# --------------------------------------------------------------------------- residual wiring

#: Per model (or variant): modules whose output is what actually gets added to the residual stream when
#: it is not the output projection itself, and the norm after a cross-attention residual add.
WIRING = {
    "gemma2": {"attn_branch": "post_attention_layernorm", "ffn_branch": "post_feedforward_layernorm"},
    "gemma3_text": {"attn_branch": "post_attention_layernorm", "ffn_branch": "post_feedforward_layernorm"},
    "bart": {"cross_ln": "encoder_attn_layer_norm"},
    "bert:cross_attention": {"cross_ln": "crossattention.output.LayerNorm"},
}


def _first_input(args, kwargs) -> torch.Tensor:
    if args and torch.is_tensor(args[0]):
        return args[0]
    return kwargs["hidden_states"]


def _first_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _check_wiring(model: nn.Module, interface: AdapterModelInterface, wiring: dict, parallel: bool,
                  **extra_inputs) -> None:
    points = resolve_points(model, interface)
    seen: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []

    def watch(index: int, role: str, module: nn.Module) -> None:
        def hook(_module, args, kwargs, out):
            assert (index, role) not in seen, f"{role} of layer {index} ran twice"
            seen[(index, role)] = (_first_input(args, kwargs), _first_output(out))

        handles.append(module.register_forward_hook(hook, with_kwargs=True))

    for lp in points.layers:
        layer = lp.module.module
        roles = {"layer": layer, "pre_self": lp.pre_self_attn.module, "pre_ffn": lp.pre_ffn.module,
                 "attn": lp.self_attn.o.module, "ffn": lp.output.module}
        if lp.ln_1 is not None:
            roles.update(ln_1=lp.ln_1.module, ln_2=lp.ln_2.module)
        if lp.cross_attn is not None:
            roles.update(pre_cross=lp.pre_cross_attn.module, cross=lp.cross_attn.o.module)
            if "cross_ln" in wiring:
                roles["cross_ln"] = resolve_path(layer, wiring["cross_ln"])[2]
        for role in ("attn", "ffn"):
            if f"{role}_branch" in wiring:
                roles[role] = resolve_path(layer, wiring[f"{role}_branch"])[2]
        for role, module in roles.items():
            watch(lp.index, role, module)
    try:
        with torch.no_grad():
            model(**tiny_inputs(model), **extra_inputs)
    finally:
        for handle in handles:
            handle.remove()

    for lp in points.layers:
        _check_layer(lp, seen, wiring, parallel)
    assert {i for i, _ in seen} == set(range(points.num_layers))


def _check_layer(lp, seen: dict, wiring: dict, parallel: bool) -> None:
    i = lp.index

    def inp(role):
        return seen[(i, role)][0]

    def out(role):
        return seen[(i, role)][1]

    def close(actual, expected, what):
        torch.testing.assert_close(actual.reshape(expected.shape), expected, **TOL,
                                   msg=lambda m: f"layer {i}: {what}\n{m}")

    x, y = inp("layer"), out("layer")
    close(inp("pre_self"), x, "pre_self_attn input is not the layer input")
    attn, ffn = out("attn"), out("ffn").reshape(x.shape)
    if parallel:
        close(inp("pre_ffn"), x, "pre_ffn input is not the layer input (parallel block)")
        close(y, x + attn + ffn, "layer output is not x + attn + ffn (parallel block)")
        return
    r = x + attn
    if lp.ln_1 is not None:
        close(inp("ln_1"), r, "ln_1 input is not x + attention output")
        r = out("ln_1")
    if lp.cross_attn is not None:
        close(inp("pre_cross"), r, "pre_cross_attn input is not the residual stream")
        r = r + out("cross")
        if "cross_ln" in wiring:
            close(inp("cross_ln"), r, "cross-attention norm input is not x + cross-attention output")
            r = out("cross_ln")
    close(inp("pre_ffn"), r, "pre_ffn input is not the residual stream after attention")
    r = r + ffn
    if lp.ln_2 is not None:
        close(inp("ln_2"), r, "ln_2 input is not x + FFN output")
        r = out("ln_2")
    close(y, r, "layer output is not the residual stream after the FFN")


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_residual_wiring(model_type):
    _check_wiring(_model(model_type), registry.interface(model_type), WIRING.get(model_type, {}),
                  parallel=model_type in PARALLEL)


def test_gpt_neox_sequential_residual_wiring():
    # use_parallel_residual=False: x + attn(ln1(x)) feeds ln2; the same interface holds.
    model = tiny_model("gpt_neox", use_parallel_residual=False)
    _check_wiring(model, registry.interface("gpt_neox"), {}, parallel=False)


# --------------------------------------------------------------------------- variants


def test_gated_t5_variant():
    model = tiny_model("t5", feed_forward_proj="gated-gelu")
    with pytest.raises(InterfaceError, match="layer_intermediate_proj"):
        resolve_points(model, registry.interface("t5"))
    interface = interface_for_config(model.config)
    assert interface is VARIANT_INTERFACES["t5:gated"]
    points = resolve_points(model, interface)
    for lp in points.layers:
        assert _features(lp.intermediate.module) == (HIDDEN, INTERMEDIATE)
        assert lp.intermediate.path.endswith("DenseReluDense.wi_1")
    _check_wiring(model, interface, {}, parallel=False)


def test_post_norm_opt_variant():
    model = tiny_model("opt", do_layer_norm_before=False)
    interface = interface_for_config(model.config)
    assert interface is VARIANT_INTERFACES["opt:post_norm"]
    _check_wiring(model, interface, {}, parallel=False)
    # The default (pre-norm) interface resolves on it but is wrong there: the wiring check catches that.
    with pytest.raises(AssertionError):
        _check_wiring(model, registry.interface("opt"), {}, parallel=False)


@pytest.mark.parametrize("model_type", ["bert", "roberta", "xlm-roberta", "electra"])
def test_bert_like_decoder_with_cross_attention_variant(model_type):
    model = tiny_model(model_type, is_decoder=True, add_cross_attention=True)
    interface = interface_for_config(model.config)
    assert interface is VARIANT_INTERFACES[f"{model_type}:cross_attention"]
    points = resolve_points(model, interface)
    assert all(lp.cross_attn is not None and lp.pre_cross_attn is not None for lp in points.layers)
    assert _features(points.layers[0].cross_attn.k.module) == (HIDDEN, HIDDEN)
    encoder_hidden_states = torch.randn(2, 6, HIDDEN, generator=torch.Generator().manual_seed(2))
    _check_wiring(model, interface, WIRING["bert:cross_attention"], parallel=False,
                  encoder_hidden_states=encoder_hidden_states)
