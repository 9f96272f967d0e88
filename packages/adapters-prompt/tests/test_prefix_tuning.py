"""Prefix tuning: keys / values in front of every attention's, across architectures, with and without a cache."""

from __future__ import annotations

import pytest
import torch

import adapters
from adapters import AdapterError
from adapters.testing import tiny_inputs, tiny_model

P = 3
CONFIG = f"prefix_tuning[prefix_length={P}, bottleneck_size=8]"


def _prefilled(model, name: str, batch: int):
    """A transformers cache holding adapter ``name``'s prefix of every layer as ``P`` past tokens."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for i, layer in enumerate(model._adapters_state.layers(name)):
        kv = layer.adapters[name].kv().detach()
        cache.update(kv[0].unsqueeze(0).expand(batch, -1, -1, -1), kv[1].unsqueeze(0).expand(batch, -1, -1, -1), i)
    return cache


@pytest.mark.parametrize("arch", ["qwen3", "gpt2", "phi3"])
@pytest.mark.parametrize("offset", [False, True])
def test_decoder_equals_the_base_model_reading_the_prefix_from_its_cache(arch, offset, helpers):
    """Independent reference: the frozen base model whose cache already holds the prefixes as ``P`` past
    tokens (grouped-query attention on qwen3 / phi3). Tokens keep positions ``0..T-1`` unless
    ``offset_positions`` (then ``P..``, peft's convention)."""
    model = helpers.prepared(arch, "base", CONFIG[:-1] + f", offset_positions={offset}]")
    inputs = tiny_inputs(model)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        out = model(**inputs).last_hidden_state
        pos = None if offset else torch.arange(ids.shape[1]).unsqueeze(0)
        with adapters.AdapterSetup(None):
            base = model(**inputs).last_hidden_state
            ref = model(input_ids=ids, attention_mask=torch.cat([torch.ones(2, P, dtype=mask.dtype), mask], 1),
                        position_ids=pos, cache=_prefilled(model, "p", 2)).last_hidden_state
    assert out.shape == base.shape and not torch.allclose(out, base, atol=1e-3)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_sdpa_without_a_mask_equals_eager(arch, helpers):
    """sdpa's causal shortcut (no mask) would hide the tokens behind the prefix: an explicit mask is built."""
    eager = helpers.prepared(arch, "base", CONFIG)
    sdpa = helpers.prepared(arch, "base", CONFIG, attn_implementation="sdpa")
    sdpa.load_state_dict(eager.state_dict())
    ids = tiny_inputs(eager)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(sdpa(input_ids=ids).last_hidden_state, eager(input_ids=ids).last_hidden_state,
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen3", "gpt2", "gpt_neox", "opt", "t5", "bart"])
def test_generate_with_cache_equals_without(arch, helpers):
    model = helpers.prepared(arch, "causal_lm", CONFIG)
    full = tiny_inputs(model, batch=2, seq=6)["input_ids"]
    ids, mask = helpers.padded(full, [4, 6], pad=model.config.pad_token_id or 0, side="left")
    cached = helpers.generate_logits(model, ids, mask, use_cache=True)
    torch.testing.assert_close(cached, helpers.generate_logits(model, ids, mask, use_cache=False), rtol=0, atol=1e-4)
    model.set_active_adapters(None)
    assert not torch.allclose(helpers.generate_logits(model, ids, mask, use_cache=True), cached, atol=1e-3)


@pytest.mark.parametrize("arch", ["bert", "t5", "bart"])
def test_encoders_and_encoder_decoders_change_only_where_prefixes_are(arch, helpers):
    """Self-attention of encoders, and (encoder-decoder) encoder, decoder and cross-attention each get a pool."""
    model = helpers.prepared(arch, "base", CONFIG)
    pools = set(model._adapters_state.shared_modules("p"))
    expected = {"prefix_self"} if arch == "bert" else {"prefix_encoder", "prefix_self", "prefix_cross"}
    assert pools == expected
    inputs = tiny_inputs(model)
    with torch.no_grad():
        out = model(**inputs)[0]
        with adapters.AdapterSetup(None):
            base = model(**inputs)[0]
    assert out.shape == base.shape and not torch.allclose(out, base, atol=1e-4)
    if arch != "bert":
        only_cross = helpers.prepared(arch, "base", CONFIG[:-1] + ", encoder_prefix=False]", name="c")
        assert set(only_cross._adapters_state.shared_modules("c")) == {"prefix_self", "prefix_cross"}


def test_bert_padding_keeps_rows_independent(helpers):
    model = helpers.prepared("bert", "base", CONFIG)
    full = tiny_inputs(model, batch=2, seq=7)["input_ids"]
    ids, mask = helpers.padded(full, [4, 7], pad=0, side="right")
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        alone = model(input_ids=full[:1, :4]).last_hidden_state
    torch.testing.assert_close(out[0, :4], alone[0], rtol=0, atol=1e-5)


def test_eject_keeps_the_function_and_saves_flat(helpers, tmp_path):
    from adapters_prompt import eject_prefix
    from adapters_prompt.prefix import PrefixFlat, PrefixMLP

    model = helpers.prepared("qwen3", "base", CONFIG)
    inputs = tiny_inputs(model)
    assert isinstance(model._adapters_state.shared_modules("p")["prefix_self"], PrefixMLP)
    with torch.no_grad():
        before = model(**inputs).last_hidden_state
    model.train_adapter("p")
    eject_prefix(model, "p")
    model.eval()
    assert isinstance(model._adapters_state.shared_modules("p")["prefix_self"], PrefixFlat)
    assert model.adapters_config["p"].flat is True
    assert all(p.requires_grad for p in model._adapters_state.adapter_parameters("p"))
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).last_hidden_state, before, rtol=0, atol=1e-6)
    model.save_adapter(str(tmp_path), "p")
    fresh = adapters.init(tiny_model("qwen3", "base"))
    fresh.load_adapter(str(tmp_path), set_active=True)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).last_hidden_state, model(**inputs).last_hidden_state)
    summary = {r["name"]: r["#params"] for r in model.adapter_summary(as_dict=True)}
    assert summary["p"] == 2 * P * 2 * 2 * 8  # layers × P × (keys, values) × 2 kv heads × head dim 8


def test_gating_scales_keys_and_values_by_the_input(helpers):
    model = helpers.prepared("bert", "base", CONFIG[:-1] + ", use_gating=True, shared_gating=False]", std=0.0)
    unit = model._adapters_state.layers("p")[0].adapters["p"]
    assert unit.gate.out_features == 2
    hidden = torch.randn(2, 5, 32)
    kv = model._adapters_state.layers("p")[0].leaf("p", (hidden,))
    gate = torch.sigmoid(unit.gate(hidden)).mean(1)
    torch.testing.assert_close(kv[:, 0], unit.kv()[0].unsqueeze(0) * gate[:, 0].view(2, 1, 1, 1))
    torch.testing.assert_close(kv[:, 1], unit.kv()[1].unsqueeze(0) * gate[:, 1].view(2, 1, 1, 1))


def test_leave_out_and_lengths(helpers):
    model = helpers.prepared("llama", "base", CONFIG[:-1] + ", leave_out=[0]]")
    assert [layer.location for layer in model._adapters_state.layers("p")] == ["layers.1.self_attn.prefix_tuning"]
    assert model._adapters_state.shared_modules("p")["prefix_self"].layers == 1


@pytest.mark.parametrize(("arch", "config", "match"), [
    ("modernbert", CONFIG, "takes no cache argument"),
    ("distilbert", CONFIG, "takes no cache argument"),
    ("t5", CONFIG[:-1] + ", leave_out=[1]]", "share one position bias"),
    ("t5", CONFIG[:-1] + ", offset_positions=True]", "offset_positions"),
    ("qwen3", CONFIG[:-1] + ", leave_out=[7]]", "out of range"),
])
def test_refusals_leave_the_model_unchanged(arch, config, match):
    model = adapters.init(tiny_model(arch, "base"))
    keys = list(model.state_dict())
    with pytest.raises(AdapterError, match=match):
        model.add_adapter("p", config=config)
    assert list(model.state_dict()) == keys and not model.adapters_config


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("config", [CONFIG, f"prefix_tuning[prefix_length={P}, flat=True]",
                                    f"prompt_tuning[prompt_length={P}]"])
def test_gradient_checkpointing_gives_the_same_gradients(config, reentrant, helpers):
    """The layers of a call share one evaluation of the prefix pool (``prefix.call_blocks``); a checkpointed
    layer recomputed in the backward pass evaluates it afresh (reentrant: inside its own differentiated graph),
    to the same values. Two calls precede one backward."""
    grads = []
    for checkpointing in (False, True):
        model = helpers.prepared("qwen3", "causal_lm", config)
        model.train_adapter("p")
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        inputs = tiny_inputs(model)
        loss = model(**inputs, labels=inputs["input_ids"], use_cache=False).loss
        loss = loss + 0.5 * model(**inputs, labels=inputs["input_ids"].flip(1), use_cache=False).loss
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model._adapters_state.adapter_parameters("p")]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("config", [CONFIG, f"prefix_tuning[prefix_length={P}, flat=True]"])
def test_checkpointing_the_whole_model_gives_the_same_gradients(config, reentrant, helpers):
    """``torch.utils.checkpoint`` around the whole model call (an outer activation-checkpoint wrapper): its
    re-run is a new call, which evaluates the prefix pool as the forward pass did (non-reentrant
    checkpointing checks that the re-run repeats the forward operations)."""
    grads = []
    for checkpointing in (False, True):
        model = helpers.prepared("qwen3", "causal_lm", config)
        model.train_adapter("p")
        inputs = tiny_inputs(model)
        embeds = model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_()

        def loss(e, model=model, inputs=inputs):
            return model(inputs_embeds=e, attention_mask=inputs["attention_mask"], labels=inputs["input_ids"],
                         use_cache=False).loss

        value = torch.utils.checkpoint.checkpoint(loss, embeds, use_reentrant=reentrant) if checkpointing else loss(
            embeds)
        value.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model._adapters_state.adapter_parameters("p")]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize(("where", "kind"), [("encoder", "self"), ("decoder", "self"), ("decoder", "cross")])
def test_t5_attention_by_hand(where, kind, helpers):
    """Independent reference, computed from T5's own weights: the prefix keys take part in the softmax with
    zero position bias, the tokens keep their relative bias (and the decoder its causal mask)."""
    model = helpers.prepared("t5", "base", CONFIG)
    block = getattr(model, where).block[0]
    attn = block.layer[0].SelfAttention if kind == "self" else block.layer[1].EncDecAttention
    seen = {}
    handle = attn.register_forward_hook(lambda m, a, kw, out: seen.update(h=a[0] if a else kw["hidden_states"],
                                                                       kv=kw.get("key_value_states"), out=out[0]),
                                        with_kwargs=True)
    with torch.no_grad():
        model(**tiny_inputs(model))
        handle.remove()
        h = seen["h"]
        source = h if kind == "self" else seen["kv"]
        b, t, s = h.shape[0], h.shape[1], source.shape[1]

        def heads(x):
            return x.view(b, x.shape[1], 4, 8).transpose(1, 2)

        prefix = attn.prefix_tuning.adapters["p"].kv()
        keys = torch.cat([prefix[0].expand(b, -1, -1, -1), heads(attn.k(source))], dim=2)
        values = torch.cat([prefix[1].expand(b, -1, -1, -1), heads(attn.v(source))], dim=2)
        bias = attn.compute_bias(t, s) if kind == "self" and attn.has_relative_attention_bias else \
            torch.zeros(1, 4, t, s)
        if where == "decoder" and kind == "self":
            bias = bias.masked_fill(torch.ones(t, s, dtype=torch.bool).triu(1), torch.finfo(torch.float32).min)
        bias = torch.cat([torch.zeros(1, 4, t, P), bias], dim=-1)
        weights = torch.softmax(heads(attn.q(h)) @ keys.transpose(2, 3) + bias, dim=-1)
        expected = attn.o((weights @ values).transpose(1, 2).reshape(b, t, 32))
    torch.testing.assert_close(seen["out"], expected, rtol=0, atol=1e-5)


def test_an_attention_caching_another_layout_is_named():
    """Keys an attention caches in another layout than batch × kv heads × positions × head dim (multi-query or
    ALiBi attentions of some models) get an error naming the layouts, not a bare shape error from torch.cat."""
    import pytest
    import torch
    from adapters_prompt.cache import PrefixedCache

    from adapters.plugin import AdapterError

    cache = PrefixedCache(None, torch.zeros(2, 2, 3, 8), torch.zeros(2, 2, 3, 8), store=False)
    keys, values = cache.update(torch.ones(2, 2, 5, 8), torch.ones(2, 2, 5, 8), 0)
    assert keys.shape == (2, 2, 8, 8) and values.shape == (2, 2, 8, 8)
    with pytest.raises(AdapterError, match=r"cannot join its keys/values .*\(2, 2, 3, 8\)\) to this attention's "
                                           r"\(2, 1, 5, 8\)"):
        cache.update(torch.ones(2, 1, 5, 8), torch.ones(2, 1, 5, 8), 0)


def test_alibi_attention_is_refused_when_added():
    """Bloom's attention adds ALiBi biases shaped for the tokens' own keys: prefix tuning is refused when added
    (it failed at the first forward with a shape error), nothing changes, and prompt tuning still works."""
    import pytest
    import torch
    import transformers

    import adapters

    torch.manual_seed(0)
    model = adapters.init(transformers.BloomForCausalLM(transformers.BloomConfig(
        vocab_size=128, hidden_size=32, n_layer=2, n_head=4)), interface="auto")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(adapters.AdapterError, match="Prefix tuning is not supported on 'bloom': its attention adds "
                                                    "ALiBi"):
        model.add_adapter("p", config="prefix_tuning[prefix_length=2]")
    assert not model._adapters_state.adapters and model.state_dict().keys() == before.keys()
    model.add_adapter("q", config="prompt_tuning[prompt_length=2]", set_active=True)
    assert model(input_ids=torch.randint(3, 128, (2, 5))).logits.shape == (2, 5, 128)
