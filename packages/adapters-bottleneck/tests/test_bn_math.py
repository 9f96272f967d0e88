"""Hand-computed references of the bottleneck math (SPEC §4) against the library output."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adapters_bottleneck import AdapterPlusConfig, BnConfig, ParBnConfig, SeqBnConfig
from adapters_bottleneck.layer import Bottleneck, PHMLinear


def _capture_input(module: torch.nn.Module, store: dict, key: str):
    def hook(mod, args, kwargs):
        store[key] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def _capture_output(module: torch.nn.Module, store: dict, key: str):
    def hook(mod, args, out):
        store[key] = (out[0] if isinstance(out, tuple) else out).detach().clone()

    return module.register_forward_hook(hook)


def _ln(t: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(t, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def _rms(t: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    return norm.weight * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))


def _lin(t: torch.Tensor, lin: torch.nn.Linear) -> torch.Tensor:
    return t @ lin.weight.T + (lin.bias if lin.bias is not None else 0)


def _bert_ffn(layer, x):
    return _lin(F.gelu(_lin(x, layer.intermediate.dense)), layer.output.dense)


def _llama_mlp(layer, n):
    mlp = layer.mlp
    return _lin(F.silu(_lin(n, mlp.gate_proj)) * _lin(n, mlp.up_proj), mlp.down_proj)


def test_seq_bn_by_hand_on_bert(make, helpers):
    model, inputs = make("bert")
    layer = model.encoder.layer[0]
    store: dict = {}
    _capture_input(layer.intermediate, store, "x")
    model.add_adapter("a", SeqBnConfig(reduction_factor=4), set_active=True)
    helpers.randomize(model, "a")
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[1]
        x = store["x"]
        ad = layer.bottleneck_adapters_output.adapters["a"]
        h = _bert_ffn(layer, x)
        h_in = _ln(h + x, layer.output.LayerNorm)  # original_ln_before: LN_2(h + x)
        out = h + _lin(torch.relu(_lin(h_in, ad.down)), ad.up)  # residual h, s = 1
        expected = _ln(out + x, layer.output.LayerNorm)  # the model's own add & norm
    torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)


def test_par_bn_by_hand_on_llama(make, helpers):
    model, inputs = make("llama")
    layer = model.layers[0]
    store: dict = {}
    _capture_input(layer.post_attention_layernorm, store, "x")
    model.add_adapter("a", ParBnConfig(), set_active=True)
    helpers.randomize(model, "a")
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[1]
        x = store["x"]
        ad = layer.bottleneck_adapters_output.adapters["a"]
        h = _llama_mlp(layer, _rms(x, layer.post_attention_layernorm))
        out = h + 4.0 * _lin(torch.relu(_lin(x, ad.down)), ad.up)  # h + s·f(x)
        expected = x + out  # pre-norm residual add by the model
    torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)


def test_original_ln_after_false_on_bert_ffn(make, helpers):
    model, inputs = make("bert")
    layer = model.encoder.layer[0]
    store: dict = {}
    _capture_input(layer.intermediate, store, "x")
    model.add_adapter("a", AdapterPlusConfig(reduction_factor=8), set_active=True)
    helpers.randomize(model, "a")
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[1]
        x = store["x"]
        ad = layer.bottleneck_adapters_output.adapters["a"]
        u = _ln(_bert_ffn(layer, x) + x, layer.output.LayerNorm)
        expected = u + ad.scaling * _lin(F.gelu(_lin(u, ad.down)), ad.up)  # the adapter output IS the layer output
    torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)


def test_original_ln_after_false_on_bert_attention(make, helpers):
    model, inputs = make("bert")
    layer = model.encoder.layer[0]
    store: dict = {}
    _capture_output(layer.attention.output.dense, store, "h")  # registered first: the raw projection output
    _capture_input(layer.attention.self, store, "x")
    model.add_adapter("a", AdapterPlusConfig(mh_adapter=True, output_adapter=False, reduction_factor=8,
                                             residual_before_ln="post_add", original_ln_before=False),
                      set_active=True)
    helpers.randomize(model, "a")
    _capture_output(layer.attention.output, store, "final")
    with torch.no_grad():
        model(**inputs)
        ad = layer.bottleneck_adapters_attn.adapters["a"]
        h, x = store["h"], store["x"]
        expected = (h + x) + ad.scaling * _lin(F.gelu(_lin(h, ad.down)), ad.up)  # residual h + x, input h
    torch.testing.assert_close(store["final"], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "vit"])
def test_original_ln_after_false_pre_norm(make, helpers, model_type):
    model, inputs = make(model_type)
    layer = model.layers[0]
    pre_ffn = layer.post_attention_layernorm if model_type == "llama" else layer.layernorm_after
    down = layer.mlp.down_proj if model_type == "llama" else layer.mlp.fc2
    store: dict = {}
    _capture_output(down, store, "h")
    _capture_input(pre_ffn, store, "x")
    model.add_adapter("a", AdapterPlusConfig(reduction_factor=8), set_active=True)
    helpers.randomize(model, "a")
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[1]
        ad = layer.bottleneck_adapters_output.adapters["a"]
        u = store["h"] + store["x"]  # no norm named: LN is the identity
        expected = u + ad.scaling * _lin(F.gelu(_lin(u, ad.down)), ad.up)
    torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)


def test_phm_layer_equals_kronecker_weight():
    torch.manual_seed(0)
    for kw in ({}, {"factorized_phm_W": False}, {"factorized_phm_rule": True, "phm_rank": 2}):
        cfg = BnConfig(phm_layer=True, phm_dim=4, phm_init_range=0.5, **kw)
        lin = PHMLinear(16, 8, cfg, torch.float32, None)
        with torch.no_grad():
            lin.bias.normal_()
        x = torch.randn(3, 5, 16)
        w = lin.dense_weight()
        assert w.shape == (16, 8)
        torch.testing.assert_close(lin(x), x @ w + lin.bias, rtol=1e-5, atol=1e-5)


def test_module_options_gating_scaling_init_stochastic_depth():
    torch.manual_seed(0)
    h, x = torch.randn(4, 5, 16), torch.randn(4, 5, 16)
    ident = lambda t: t  # noqa: E731
    plain = Bottleneck(BnConfig(reduction_factor=4, original_ln_before=False), 16, 4, torch.float32, None)
    gated = Bottleneck(BnConfig(reduction_factor=4, original_ln_before=False, use_gating=True), 16, 4,
                       torch.float32, None)
    gated.load_state_dict(plain.state_dict(), strict=False)
    # a zero-initialised gate is sigmoid(0) = 0.5
    torch.testing.assert_close(gated(h, x, ident) - h, 0.5 * (plain(h, x, ident) - h))
    scaled = Bottleneck(BnConfig(reduction_factor=4, original_ln_before=False, scaling=3.0), 16, 4,
                        torch.float32, None)
    scaled.load_state_dict(plain.state_dict())
    torch.testing.assert_close(scaled(h, x, ident) - h, 3.0 * (plain(h, x, ident) - h))
    # mam_adapter starts as the identity
    mam = Bottleneck(BnConfig(init_weights="mam_adapter"), 16, 4, torch.float32, None)
    assert torch.equal(mam(h, x, ident), h)
    # stochastic depth: in training each row keeps the branch (scaled by 1/keep) or drops it
    sd = Bottleneck(BnConfig(reduction_factor=4, original_ln_before=False, stochastic_depth=0.5), 16, 4,
                    torch.float32, None)
    sd.load_state_dict(plain.state_dict())
    torch.testing.assert_close(sd.eval()(h, x, ident), plain(h, x, ident))
    big_h = h.repeat(8, 1, 1)
    branch = plain(big_h, None, ident) - big_h
    got = sd.train()(big_h, None, ident) - big_h
    kept = [torch.allclose(g, 2 * b, atol=1e-6) for g, b in zip(got, branch)]
    dropped = [torch.equal(g, torch.zeros_like(g)) for g in got]
    assert all(k or d for k, d in zip(kept, dropped)) and any(kept) and any(dropped)


def test_configs_and_strings():
    import adapters
    from adapters import AdapterConfig

    assert isinstance(AdapterConfig.load("pfeiffer"), SeqBnConfig)
    assert AdapterConfig.load("houlsby") == AdapterConfig.load("double_seq_bn")
    assert AdapterConfig.load("parallel") == ParBnConfig()
    assert AdapterConfig.load("scaled_par_bn").scaling == "learned"
    cpp = AdapterConfig.load("compacter++")
    assert type(cpp).__name__ == "CompacterPlusPlusConfig" and cpp.phm_layer and not cpp.mh_adapter
    comp = AdapterConfig.load("compacter[reduction_factor=8]")
    assert comp.mh_adapter and comp.output_adapter and comp.reduction_factor == 8
    assert adapters.CompacterPlusPlusConfig is type(cpp)
    assert adapters.DynamicAdapterFusionConfig().value_initialized
    plus = AdapterPlusConfig()
    assert (plus.reduction_factor, plus.non_linearity, plus.scaling, plus.init_weights, plus.stochastic_depth,
            plus.original_ln_after) == (96, "gelu", "channel", "houlsby", 0.1, False)
    par = ParBnConfig()
    assert (par.reduction_factor, par.scaling, par.init_weights, par.non_linearity) == (2, 4.0, "mam_adapter", "relu")
    cfg = SeqBnConfig(reduction_factor={"3": 8, "default": 16}, leave_out=[1])
    assert AdapterConfig.load(cfg.to_dict()) == cfg
    assert cfg.reduction_for(3) == 8 and cfg.reduction_for(0) == 16
    with pytest.raises(ValueError):
        SeqBnConfig(non_linearity="nope")
    with pytest.raises(ValueError):
        SeqBnConfig(scaling="sometimes")


def test_par_bn_on_gemma2_flows_through_post_norm(make, helpers):
    model, inputs = make("gemma2")
    layer = model.layers[0]
    store: dict = {}
    _capture_input(layer.pre_feedforward_layernorm, store, "x")
    model.add_adapter("a", ParBnConfig(), set_active=True)
    helpers.randomize(model, "a")
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[1]
        x = store["x"]
        model.set_active_adapters(None)  # the base sub-block, computed with the model's own modules
        h = layer.mlp(layer.pre_feedforward_layernorm(x))
        ad = layer.bottleneck_adapters_output.adapters["a"]
        out = h + 4.0 * _lin(torch.relu(_lin(x, ad.down)), ad.up)
        expected = x + layer.post_feedforward_layernorm(out)  # Gemma-2's sandwich norm, then the residual add
    torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)


def test_compile_fullgraph_and_gradient_checkpointing(make, helpers):
    model, inputs = make("bert")
    model.add_adapter("a", AdapterPlusConfig(mh_adapter=True, reduction_factor=8), set_active=True)
    helpers.randomize(model, "a")
    ref = helpers.output(model, inputs)
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # dynamo tracing: no graph breaks
    with torch.no_grad():
        assert torch.equal(compiled(**inputs)[0], ref)
    torch._dynamo.reset()

    model, inputs = make("llama")
    model.add_adapter("a", "double_seq_bn")
    model.train_adapter("a")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model(**inputs)[0].pow(2).mean().backward()
    assert all(p.grad is not None for p in model._adapters_state.adapter_parameters("a"))
