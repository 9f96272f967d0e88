"""Prompt and prefix adapters stacked with the other methods compute what each means on top of the other.

References are independent of the prompt package's hooks: ``Stack(prompt, X)`` equals ``X`` alone on the
prompted input (``inputs_embeds = [prompt; embeddings]``, mask extended, virtual positions dropped);
``Stack(prefix, X)`` equals ``X`` alone with the prefixes in the model's key/value cache as past tokens.
"""

from __future__ import annotations

import pytest
import torch

import adapters
import adapters.composition as ac
from adapters.testing import DECODER_ONLY, supports, tiny_inputs, tiny_model
from adapters.testing.conformance import perturb

OTHERS = ["lora[r=2, init_weights='bert']", "seq_bn", "ia3", "vera[r=8]", "par_bn"]
P = 3


def _model(arch: str, first: str, other: str):
    model = adapters.init(tiny_model(arch, "base"))
    model.add_adapter("p", config=first)
    model.add_adapter("o", config=other)
    perturb(model, "p", std=0.5)
    perturb(model, "o", seed=3)
    return model


@pytest.mark.parametrize("other", OTHERS)
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_prompt_under_another_method(arch, other):
    model = _model(arch, f"prompt_tuning[prompt_length={P}]", other)
    inputs = tiny_inputs(model)
    prompt = model._adapters_state.layers("p")[0].adapters["p"].embedding
    embeds = torch.cat([prompt.expand(2, -1, -1), model.get_input_embeddings()(inputs["input_ids"])], dim=1)
    mask = torch.cat([torch.ones(2, P, dtype=torch.long), inputs["attention_mask"]], dim=1)
    with torch.no_grad():
        with adapters.AdapterSetup(ac.Stack("p", "o")):
            stacked = model(**inputs).last_hidden_state
        with adapters.AdapterSetup("o"):
            ref = model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state[:, P:]
            alone = model(**inputs).last_hidden_state
    assert not torch.allclose(stacked, alone, atol=1e-4)
    torch.testing.assert_close(stacked, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("other", OTHERS)
def test_prefix_under_another_method(other):
    from transformers import DynamicCache

    model = _model("qwen3", f"prefix_tuning[prefix_length={P}, bottleneck_size=8]", other)
    inputs = tiny_inputs(model)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        for i, layer in enumerate(model._adapters_state.layers("p")):
            kv = layer.adapters["p"].kv()
            cache.update(kv[0].expand(2, -1, -1, -1), kv[1].expand(2, -1, -1, -1), i)
        with adapters.AdapterSetup(ac.Stack("p", "o")):
            stacked = model(**inputs).last_hidden_state
        with adapters.AdapterSetup("o"):
            ref = model(input_ids=inputs["input_ids"], cache=cache, position_ids=torch.arange(8).unsqueeze(0),
                        attention_mask=torch.cat([torch.ones(2, P, dtype=torch.long), inputs["attention_mask"]], 1))
            alone = model(**inputs).last_hidden_state
    assert not torch.allclose(stacked, alone, atol=1e-4)
    torch.testing.assert_close(stacked, ref.last_hidden_state, rtol=0, atol=1e-5)


def test_prompt_under_reft_counts_the_prompt_as_real_tokens_and_keeps_padding_out():
    """ReFT reads the call's token layout: with a prompt in front, its positions are the prompt's first and
    left padding stays unedited, so a padded row computes what it computes alone."""
    model = _model("llama", f"prompt_tuning[prompt_length={P}]", "loreft[prefix_positions=4, suffix_positions=2]")
    model.set_active_adapters(ac.Stack("p", "o"))
    full = tiny_inputs(model, batch=2, seq=7)["input_ids"]
    ids, mask = full.clone(), torch.ones_like(full)
    ids[0, :3], mask[0, :3] = 0, 0  # row 0: 4 real tokens, left padded
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        alone = model(input_ids=full[:1, 3:]).last_hidden_state
    torch.testing.assert_close(out.last_hidden_state[0, 3:], alone[0], rtol=0, atol=1e-5)


def test_prompt_under_reft_generates_the_same_with_and_without_cache():
    model = adapters.init(tiny_model("llama", "causal_lm"))
    model.add_adapter("p", config=f"prompt_tuning[prompt_length={P}]")
    model.add_adapter("o", config="loreft[prefix_positions=2, suffix_positions=2]")
    perturb(model, "p", std=0.5)
    perturb(model, "o", seed=3, std=0.5)
    model.set_active_adapters(ac.Stack("p", "o"))
    ids = tiny_inputs(model, batch=2, seq=6)["input_ids"]
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0

    def logits(use_cache: bool) -> torch.Tensor:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                             use_cache=use_cache, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        return torch.stack(out.logits)

    cached = logits(True)
    torch.testing.assert_close(cached, logits(False), rtol=0, atol=1e-4)
    # the first step reads the prompt as a plain forward does (ReFT's suffix ends the text; generate numbers
    # positions from the mask)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
    torch.testing.assert_close(cached[0], plain, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", [t for t in DECODER_ONLY if supports(t, "causal_lm")])
@pytest.mark.parametrize("method", ["prompt_tuning[prompt_length=3]", "prefix_tuning[prefix_length=2]"])
def test_prompt_methods_act_on_every_causal_lm(arch, method):
    """Prompt and prefix tuning on the causal-LM class of every decoder architecture: the logits change (OPT's
    task class calls its decoder directly, past the base model's forward: a prompt hooked there did nothing),
    the loss reaches the adapter, and turning it off gives the base logits exactly."""
    model = adapters.init(tiny_model(arch, "causal_lm"))
    inputs = tiny_inputs(model, batch=2, seq=5)
    with torch.no_grad():
        base = model(**inputs).logits
    model.add_adapter("p", config=method)
    model.train_adapter("p")
    model.eval()  # (no dropout: the outputs are compared)
    perturb(model, "p")
    out = model(**inputs, labels=inputs["input_ids"])
    assert out.logits.shape == base.shape
    assert not torch.allclose(out.logits, base, atol=1e-4), arch
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model._adapters_state.adapter_parameters("p"))
    model.set_active_adapters(None)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, base)
