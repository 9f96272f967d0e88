"""``adapters.infer_interface`` / ``adapters.init(model, interface="auto")``: structural interface inference.

The inferred interface is compared with the built-in one by the *modules* both resolve to (by
``id``), for every tiny model type and a few configuration variants, so a path that is spelled
differently but names the same module (``layer.1.wi`` vs ``layer.-1.wi``) still counts as equal.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import adapters
from adapters import AdapterModelInterface, InterfaceError
from adapters.infer import infer_interface
from adapters.interface_fit import fit_layer_stacks
from adapters.interfaces.builtin import interface_for_config
from adapters.plugins import registry
from adapters.points import ModelPoints, resolve_points
from adapters.testing import MODEL_TYPES, ToyEncoder, tiny_inputs, tiny_model, toy_interface

LAYER_FIELDS = ("intermediate", "output", "pre_self_attn", "pre_cross_attn", "pre_ffn", "ln_1", "ln_2")
#: Residual/norm points the inference must find (not only: must not get wrong) on every tiny model type.
NORM_POINTS = ("pre_self_attn", "pre_ffn")


@functools.cache
def _model(model_type: str, task: str = "base", **overrides) -> nn.Module:
    # inference leaves a model unchanged (tested below), so each model is built once
    return tiny_model(model_type, task, **overrides)


def _builtin(model: nn.Module) -> AdapterModelInterface:
    return fit_layer_stacks(interface_for_config(model.config), model)


def _ids(point) -> int | None:
    return None if point is None else id(point.module)


def _attn_ids(ap) -> dict:
    if ap is None:
        return {}
    return {"module": id(ap.module.module), **{w: _ids(ap.projection(w)) for w in ("q", "k", "v", "qkv", "o")},
            "fused": ap.fused}


def _compare(inferred: ModelPoints, expected: ModelPoints, *, skip: tuple[str, ...] = ()) -> None:
    """Same modules at every hook point; a residual field the inference left unset is skipped."""
    assert inferred.base_model is expected.base_model
    assert [id(lp.module.module) for lp in inferred.layers] == [id(lp.module.module) for lp in expected.layers]
    assert [lp.stack for lp in inferred.layers] == [lp.stack for lp in expected.layers]
    for got, want in zip(inferred.layers, expected.layers):
        assert _attn_ids(got.self_attn) == _attn_ids(want.self_attn)
        assert _attn_ids(got.cross_attn) == _attn_ids(want.cross_attn)
        for name in LAYER_FIELDS:
            if name in skip:
                continue
            mine = getattr(got, name)
            if mine is None and name not in ("intermediate", "output"):
                continue  # unset: allowed (never wrong)
            assert _ids(mine) == _ids(getattr(want, name)), f"layer {got.index}: {name}"


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_inferred_interface_finds_the_builtin_hook_points(model_type):
    model = _model(model_type)
    inferred = infer_interface(model)
    assert inferred.adapter_methods is None
    assert inferred.base_model is None
    expected = _builtin(model)
    _compare(resolve_points(model, inferred), resolve_points(model, expected))
    # the tiny models are all determinable: the residual points are found, not only "not wrong"
    points = resolve_points(model, inferred)
    for name in NORM_POINTS:
        assert getattr(points.layers[0], name) is not None, name
    assert (inferred.layer_ln_1 is None) == (expected.layer_ln_1 is None)
    assert inferred.attn_qkv_layout == expected.attn_qkv_layout
    assert inferred.model_embeddings == expected.model_embeddings
    # on these models the inferred paths are even spelled like the built-in ones
    assert inferred.path_fields() == expected.path_fields()


@pytest.mark.parametrize(("model_type", "overrides"), [
    ("t5", {"feed_forward_proj": "gated-gelu"}),     # wi_0 gate + wi_1 up: the up branch is picked
    ("opt", {"do_layer_norm_before": False}),        # post-norm OPT
    ("bert", {"is_decoder": True, "add_cross_attention": True}),  # BERT decoder with cross-attention
    ("gpt_neox", {"use_parallel_residual": False}),  # sequential residual
])
def test_inferred_interface_follows_configuration_variants(model_type, overrides):
    model = _model(model_type, **overrides)
    inferred = infer_interface(model)
    expected = _builtin(model)
    assert expected.model_type == model_type
    _compare(resolve_points(model, inferred), resolve_points(model, expected))
    assert inferred.path_fields() == expected.path_fields()


@pytest.mark.parametrize(("model_type", "task"), [("t5", "causal_lm"), ("bart", "seq_cls"), ("gpt2", "seq_cls"),
                                                  ("qwen3", "causal_lm")])
def test_inferred_interface_with_task_heads(model_type, task):
    model = _model(model_type, task)
    _compare(resolve_points(model, infer_interface(model)), resolve_points(model, _builtin(model)))


def test_single_stack_classes_of_encoder_decoder_models():
    import transformers

    from adapters.testing import tiny_config

    torch.manual_seed(0)
    encoder = transformers.T5EncoderModel(tiny_config("t5")).eval()
    _compare(resolve_points(encoder, infer_interface(encoder)), resolve_points(encoder, _builtin(encoder)))
    decoder = transformers.BartForCausalLM(tiny_config("bart")).eval()
    inferred = infer_interface(decoder)
    # BartForCausalLM: the decoder never runs its cross-attention without encoder states, so the traced
    # forward cannot tell what reads the residual stream entering it: left unset (the built-in names encoder_attn).
    assert inferred.layer_cross_attn == "encoder_attn" and inferred.layer_pre_cross_attn is None
    # It has no shared embedding; inference names the decoder's token embedding instead (the built-in drops it).
    assert inferred.model_embeddings == "decoder.embed_tokens"
    _compare(resolve_points(decoder, inferred), resolve_points(decoder, _builtin(decoder)))


def test_init_auto_infers_for_a_model_type_without_interface(monkeypatch, toy):
    reference = adapters.init(tiny_model("qwen3", "causal_lm"))
    reference.add_adapter("s", config=toy.NAME, set_active=True)
    toy.randomize(reference, "s")

    real = registry.interface
    monkeypatch.setattr(registry, "interface", lambda model_type: None if model_type == "qwen3" else real(model_type))
    with pytest.raises(InterfaceError, match=r"interface=\"auto\""):
        adapters.init(tiny_model("qwen3", "causal_lm"))
    model = adapters.init(tiny_model("qwen3", "causal_lm"), interface="auto")
    state = model._adapters_state
    assert state.interface.path_fields() == real("qwen3").path_fields()
    _compare(state.points, resolve_points(model, real("qwen3")))
    inputs = tiny_inputs(model)
    base_out = model(**inputs).logits
    model.add_adapter("s", config=toy.NAME, set_active=True)
    toy.randomize(model, "s")
    out = model(**inputs).logits
    assert not torch.allclose(out, base_out)
    torch.testing.assert_close(out, reference(**inputs).logits, rtol=0, atol=0)
    assert adapters.init(model, interface="auto") is model  # idempotent


def test_init_auto_keeps_the_registered_interface():
    model = adapters.init(tiny_model("t5", feed_forward_proj="gated-gelu"), interface="auto")
    assert model._adapters_state.interface.layer_intermediate_proj == "layer.-1.DenseReluDense.wi_1"
    from adapters.interfaces.builtin import VARIANT_INTERFACES

    assert model._adapters_state.interface is VARIANT_INTERFACES["t5:gated"]


def test_init_rejects_other_strings():
    with pytest.raises(TypeError, match="'auto'"):
        adapters.init(tiny_model("qwen3"), interface="guess")


# ---------------------------------------------------------------------------------------------- non-HF models
def TinyEncoder() -> nn.Module:
    return ToyEncoder()


README_INTERFACE = toy_interface()


def test_custom_model_is_inferred_and_left_unchanged():
    torch.manual_seed(0)
    model = TinyEncoder()
    model.train()
    model.blocks[1].eval()  # mixed training flags must come back exactly
    ids = torch.tensor([[1, 2, 3, 4]])
    flags = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(ids)
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]

    inferred = infer_interface(model)

    assert inferred.path_fields() == README_INTERFACE.path_fields()
    _compare(resolve_points(model, inferred), resolve_points(model, README_INTERFACE))
    assert [m.training for m in model.modules()] == flags
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and state.keys() == \
        model.state_dict().keys()
    with torch.no_grad():
        assert torch.equal(model(ids), before)
    assert not hasattr(model, "_adapters_state")


def test_custom_model_init_auto_with_an_adapter(toy):
    torch.manual_seed(0)
    model = adapters.init(TinyEncoder(), interface="auto")
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        base = model(ids)
    model.add_adapter("s", config=toy.Config(init_scale=2.0), set_active=True)
    with torch.no_grad():
        scaled = model(ids)
    assert not torch.allclose(scaled, base)
    model.set_active_adapters(None)
    with torch.no_grad():
        assert torch.equal(model(ids), base)


class _PostNormBlock(nn.Module):
    """LN(x + attn(x)); LN(x + ffn(x)) with a fused qkv projection and BERT-like nesting."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.mixer = nn.ModuleDict({"qkv": nn.Linear(d, 3 * d), "proj": nn.Linear(d, d)})
        self.ln_a, self.ln_b = nn.LayerNorm(d), nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.mixer["qkv"](x).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        x = self.ln_a(x + self.mixer["proj"](a))
        return self.ln_b(x + self.fc2(torch.relu(self.fc1(x))))


class _PostNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(50, 12)
        self.layers = nn.Sequential(*(_PostNormBlock(12) for _ in range(3)))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.layers(self.tok(input_ids))


def test_custom_post_norm_model_with_fused_qkv():
    inferred = infer_interface(_PostNormNet())
    assert inferred.path_fields() == {
        "model_embeddings": "tok", "model_layers": "layers", "layer_self_attn": "mixer", "attn_qkv_proj": "qkv",
        "attn_o_proj": "proj", "layer_intermediate_proj": "fc1", "layer_output_proj": "fc2",
        "layer_pre_self_attn": "mixer.qkv", "layer_pre_ffn": "fc1", "layer_ln_1": "ln_a", "layer_ln_2": "ln_b",
    }
    assert inferred.attn_qkv_layout == "concat"


def test_model_that_cannot_run_gets_structure_only():
    class NoForward(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = ToyEncoder(d=8).blocks

    inferred = infer_interface(NoForward())
    assert inferred.model_layers == "blocks" and inferred.attn_q_proj == "q"
    assert inferred.layer_intermediate_proj == "ffn.up" and inferred.layer_output_proj == "ffn.down"
    assert all(getattr(inferred, f) is None for f in ("layer_pre_self_attn", "layer_pre_ffn", "layer_ln_1",
                                                      "layer_ln_2", "model_embeddings"))


def test_no_layer_stack_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(InterfaceError, match=r"found no layer stack.*AdapterModelInterface by hand"):
        infer_interface(model)
    with pytest.raises(InterfaceError, match="found no layer stack"):
        adapters.init(nn.Sequential(nn.Linear(4, 4)), interface="auto")


def test_infer_interface_is_exported_lazily():
    assert adapters.infer_interface is infer_interface
    assert "infer_interface" in adapters.__all__


def test_cli_inspect_infer(capsys):
    from adapters.cli import main

    assert main(["inspect", "gpt_neox", "--infer"]) == 0
    out = capsys.readouterr().out
    assert "inferred from the model's structure" in out
    assert "attn_qkv_proj = 'query_key_value'" in out and "fused q/k/v widths [32, 32, 32], per_head" in out
    assert "layers.0.pre_ffn -> layers.0.post_attention_layernorm" in out
    assert main(["inspect", "gpt2", "--infer", "--interface", "x.json"]) != 0


def test_fused_qkv_with_an_unconfirmed_layout_is_left_out():
    import transformers

    # CodeGen's qkv_proj interleaves [q | v | k] per model-parallel shard: neither concat nor per_head
    config = transformers.CodeGenConfig(vocab_size=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=32)
    torch.manual_seed(0)
    model = transformers.CodeGenModel(config).eval()
    inferred = infer_interface(model)
    assert inferred.attn_qkv_proj is None and inferred.attn_o_proj == "out_proj"
    assert inferred.layer_pre_self_attn == "ln_1" and inferred.layer_pre_ffn == "ln_1"  # parallel attention + MLP

    class Fused(nn.Module):  # cannot run (no forward): the fused projection's layout stays unconfirmed
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(_PostNormBlock(8) for _ in range(2))

    inferred = infer_interface(Fused())
    assert inferred.attn_qkv_proj is None and inferred.attn_o_proj == "proj"


def test_norms_after_each_sub_block_leave_both_sub_blocks_reading_the_residual_stream():
    import transformers

    # OLMo2: x + post_attention_layernorm(attn(x)), then x + post_feedforward_layernorm(mlp(x)): no norm
    # in front of either sub-block, so each reads the residual stream itself
    config = transformers.Olmo2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                                      eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.Olmo2Model(config).eval()
    inferred = infer_interface(model)
    assert (inferred.layer_pre_self_attn, inferred.layer_pre_ffn) == ("self_attn", "mlp")
    assert inferred.layer_ln_1 is None and inferred.layer_ln_2 is None
    # what the residual hook point captures is the FFN's input: x + post_attention_layernorm(attn(x))
    seen = {}
    layer = model.layers[0]
    handles = [layer.register_forward_pre_hook(lambda m, a, kw: seen.update(x=a[0] if a else kw["hidden_states"]),
                                               with_kwargs=True),
               layer.self_attn.register_forward_hook(lambda m, a, out: seen.update(attn=out[0])),
               layer.mlp.register_forward_pre_hook(lambda m, a: seen.update(ffn_in=a[0]))]
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7, 8]]))
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(seen["ffn_in"], seen["x"] + layer.post_attention_layernorm(seen["attn"]))

