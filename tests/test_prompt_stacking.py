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
from adapters.testing import tiny_inputs, tiny_model
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
