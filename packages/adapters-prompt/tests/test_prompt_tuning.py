"""Prompt tuning: the prompt in front of the embeddings, outputs of the input's length, padding, generation."""

from __future__ import annotations

import pytest
import torch

import adapters
from adapters import AdapterError
from adapters.testing import tiny_inputs, tiny_model

P = 3


def _reference(model, name: str, embed: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, **kw):
    """The base model run on ``[prompt; embed(ids)]`` with the mask extended: what prompt tuning means."""
    prompt = model._adapters_state.layers(name)[0].adapters[name].embedding
    embeds = torch.cat([prompt.unsqueeze(0).expand(ids.shape[0], -1, -1), embed(ids)], dim=1)
    full = torch.cat([torch.ones(ids.shape[0], prompt.shape[0], dtype=mask.dtype), mask], dim=1)
    with adapters.AdapterSetup(None), torch.no_grad():
        return model(inputs_embeds=embeds, attention_mask=full, **kw)


@pytest.mark.parametrize("arch", ["qwen3", "gpt2", "bert"])
def test_outputs_are_the_prompted_base_model_without_the_virtual_positions(arch, helpers):
    model = helpers.prepared(arch, "base", f"prompt_tuning[prompt_length={P}]")
    inputs = tiny_inputs(model)
    with torch.no_grad():
        out = model(**inputs).last_hidden_state
        with adapters.AdapterSetup(None):
            base = model(**inputs).last_hidden_state
    ref = _reference(model, "p", model.get_input_embeddings(), inputs["input_ids"], inputs["attention_mask"])
    assert out.shape == base.shape
    assert not torch.allclose(out, base, atol=1e-3)
    torch.testing.assert_close(out, ref.last_hidden_state[:, P:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_either_side_gives_each_row_its_unpadded_result(side, helpers):
    """Real tokens of a padded row compute what the row alone computes (positions from the mask, as
    generate-style callers pass them); the prompt is visible to every row."""
    model = helpers.prepared("llama", "base", f"prompt_tuning[prompt_length={P}]")
    full = tiny_inputs(model, batch=2, seq=7)["input_ids"]
    lengths = [4, 7]
    ids, mask = helpers.padded(full, lengths, pad=0, side=side)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
        assert out.shape == (2, 7, 32)
        for row, n in enumerate(lengths):
            alone = model(input_ids=full[row:row + 1, :n]).last_hidden_state[0]
            real = mask[row].bool()
            torch.testing.assert_close(out[row][real], alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen3", "gpt_neox", "t5"])
def test_generate_with_and_without_cache_agree(arch, helpers):
    model = helpers.prepared(arch, "causal_lm", f"prompt_tuning[prompt_length={P}]")
    full = tiny_inputs(model, batch=2, seq=6)["input_ids"]
    ids, mask = helpers.padded(full, [4, 6], pad=model.config.pad_token_id or 0, side="left")
    cached = helpers.generate_logits(model, ids, mask, use_cache=True)
    uncached = helpers.generate_logits(model, ids, mask, use_cache=False)
    torch.testing.assert_close(cached, uncached, rtol=0, atol=1e-4)
    model.set_active_adapters(None)
    assert not torch.allclose(helpers.generate_logits(model, ids, mask, use_cache=True), cached, atol=1e-3)


def test_causal_lm_logits_align_with_labels(helpers):
    model = helpers.prepared("qwen3", "causal_lm", f"prompt_tuning[prompt_length={P}]")
    inputs = tiny_inputs(model)
    out = model(**inputs, labels=inputs["input_ids"])
    assert out.logits.shape == (2, 8, 128)
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 128),
                                               inputs["input_ids"][:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, manual)
    out.loss.backward()
    prompt = model._adapters_state.layers("p")[0].adapters["p"].embedding
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0


def test_token_classification_head_sees_the_input_length(helpers):
    from transformers import AutoModelForTokenClassification

    from adapters.testing import tiny_config

    torch.manual_seed(0)
    model = AutoModelForTokenClassification.from_config(tiny_config("bert", num_labels=3),
                                                        attn_implementation="eager").eval()
    adapters.init(model)
    model.add_adapter("p", config=f"prompt_tuning[prompt_length={P}]")
    model.train_adapter("p")
    inputs = tiny_inputs(model)
    labels = torch.randint(0, 3, inputs["input_ids"].shape, generator=torch.Generator().manual_seed(1))
    out = model(**inputs, token_type_ids=torch.zeros_like(labels), labels=labels)
    assert out.logits.shape == (2, 8, 3)
    manual = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 3), labels.reshape(-1))
    torch.testing.assert_close(out.loss, manual)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out.loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("prompt_tuning" in n or n.startswith("classifier.") for n in moved), moved
    assert any("prompt_tuning" in n for n in moved)


def test_seq2seq_prompt_sits_on_the_encoder_and_the_decoder_attends_to_it(helpers):
    model = helpers.prepared("t5", "seq2seq_lm", f"prompt_tuning[prompt_length={P}]")
    inputs = tiny_inputs(model)
    with torch.no_grad():
        out = model(**inputs)
    ref = _reference(model, "p", model.get_input_embeddings(), inputs["input_ids"], inputs["attention_mask"],
                     decoder_input_ids=inputs["decoder_input_ids"])
    assert out.logits.shape == (2, 8, 128)
    assert out.encoder_last_hidden_state.shape == (2, 8 + P, 32)  # the decoder's memory holds the prompt
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)
    with adapters.AdapterSetup(None), torch.no_grad():
        assert not torch.allclose(model(**inputs).logits, out.logits, atol=1e-3)


def test_stack_of_prompts_puts_the_first_adapters_prompt_first(helpers):
    model = helpers.prepared("qwen3", "base", "prompt_tuning[prompt_length=2]", name="a")
    model.add_adapter("b", config="prompt_tuning[prompt_length=3]")
    inputs = tiny_inputs(model)
    layer = model._adapters_state.layers("a")[0]
    a, b = layer.adapters["a"].embedding, layer.adapters["b"].embedding
    with adapters.AdapterSetup(adapters.Stack("a", "b")), torch.no_grad():
        out = model(**inputs).last_hidden_state
    tokens = model.get_input_embeddings()(inputs["input_ids"])
    embeds = torch.cat([a.expand(2, -1, -1), b.expand(2, -1, -1), tokens], 1)
    with adapters.AdapterSetup(None), torch.no_grad():
        ref = model(inputs_embeds=embeds, attention_mask=torch.ones(2, 13, dtype=torch.long)).last_hidden_state[:, 5:]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_from_string_initialises_with_the_texts_token_embeddings(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp_path)
    model = adapters.init(tiny_model("qwen3", "base"))
    config = adapters.PromptTuningConfig(prompt_length=5, prompt_init="from_string", prompt_init_text="w7 w9",
                                         tokenizer_name_or_path=str(tmp_path))
    model.add_adapter("p", config=config)
    prompt = model._adapters_state.layers("p")[0].adapters["p"].embedding
    expected = model.get_input_embeddings().weight[[7, 9, 7, 9, 7]]
    torch.testing.assert_close(prompt.detach(), expected.detach(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="prompt_init_text"):
        adapters.PromptTuningConfig(prompt_init="from_string")


def test_refusals_are_clear():
    with pytest.raises(ValueError, match="combine"):
        adapters.PromptTuningConfig(combine="prefix_after_bos")
    model = adapters.init(tiny_model("qwen3", "base"))
    model.add_adapter("p", config="prompt_tuning", set_active=True)
    inputs = tiny_inputs(model)
    mask4d = inputs["attention_mask"][:, None, None, :].float()
    with pytest.raises(AdapterError, match="2-D attention mask"):
        model(input_ids=inputs["input_ids"], attention_mask=mask4d)
