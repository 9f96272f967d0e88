"""ReFT on real architectures: activation, save/load, training, composition, generation."""

from __future__ import annotations

import json

import pytest
import torch

import adapters
import adapters.composition as ac
from adapters import DiReftConfig, LoReftConfig, ReftConfig
from adapters.errors import CompositionError
from adapters.testing import tiny_inputs, tiny_model

HEADS = ("lm_head", "score", "classifier")


def _first(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") and out.logits is not None else out[0]


@pytest.mark.parametrize("model_type", ["qwen3", "llama", "bert", "gpt2"])
def test_lifecycle_on_architecture(model_type, tmp_path):
    model = tiny_model(model_type, "seq_cls" if model_type == "bert" else "causal_lm")
    inputs = tiny_inputs(model)
    inputs["attention_mask"][0, -3:] = 0  # a padded row
    base = _first(model(**inputs)).detach()
    adapters.init(model)
    base_keys = {k: v.clone() for k, v in model.state_dict().items()}
    config = ReftConfig(layers="all", prefix_positions=2, suffix_positions=1, r=2, tied_weights=False,
                        dropout=0.1, non_linearity="relu", subtract_projection=True, orthogonality=True)
    model.add_adapter("a", config=config)
    assert set(base_keys) <= set(model.state_dict())
    assert torch.equal(_first(model(**inputs)), base)  # added but inactive: exactly the base
    model.set_active_adapters("a")
    out = _first(model(**inputs)).detach()
    assert (out - base).abs().max() > 1e-4

    # training moves only ReFT weights
    model.train_adapter("a")
    for n, p in model.named_parameters():
        if n.startswith(HEADS):  # task heads are core's business (not frozen by train_adapter)
            p.requires_grad_(False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".reft.adapters.a." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    _first(model(**inputs)).float().pow(2).mean().backward()
    opt.step()
    model.eval()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all(".reft.adapters.a." in n for n in changed)
    for key, value in base_keys.items():
        assert torch.equal(model.state_dict()[key], value)
    trained = _first(model(**inputs)).detach()

    # save -> load into a fresh model: identical outputs and config
    model.save_adapter(str(tmp_path), "a")
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["config"]
    assert saved["non_linearity"] == "relu" and saved["dropout"] == 0.1 and saved["suffix_positions"] == 1
    fresh = tiny_model(model_type, "seq_cls" if model_type == "bert" else "causal_lm")
    adapters.init(fresh)
    if model_type == "bert":
        fresh.load_state_dict({k: v for k, v in model.state_dict().items() if k in fresh.state_dict()})
    name = fresh.load_adapter(str(tmp_path), set_active=True)
    assert fresh._adapters_state.record(name).config == config
    assert torch.equal(_first(fresh(**inputs)), trained)

    # delete -> original model
    model.delete_adapter("a")
    assert set(model.state_dict()) == set(base_keys)
    assert not any("reft" in n for n, _ in model.named_modules())


def test_presets_and_config_strings():
    model = tiny_model("qwen3")
    adapters.init(model)
    model.add_adapter("lo", config="loreft")
    model.add_adapter("di", config="direft[r=2, suffix_positions=1]")
    model.add_adapter("no", config="noreft")
    cfg = {n: model._adapters_state.record(n).config for n in ("lo", "di", "no")}
    assert isinstance(cfg["lo"], LoReftConfig) and cfg["lo"].prefix_positions == 3 and cfg["lo"].r == 1
    assert cfg["lo"].orthogonality and not cfg["no"].orthogonality
    assert isinstance(cfg["di"], DiReftConfig) and not cfg["di"].subtract_projection and cfg["di"].r == 2
    for c in cfg.values():
        assert type(c).from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(Exception, match="out of range"):
        model.add_adapter("bad", config=ReftConfig(layers=[5]))
    assert "bad" not in model._adapters_state.adapters


def _reft_model(**kw):
    model = tiny_model("qwen3")
    adapters.init(model)
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        model.add_adapter(name, config=ReftConfig(layers=[0], prefix_positions=2, suffix_positions=1, r=2,
                                                  dropout=0.0, **kw))
    return model


def test_composition_stack_batchsplit_multitask(helpers):
    model = _reft_model()
    inputs = tiny_inputs(model, batch=2, seq=6)
    seen, handle = helpers.capture(model, 0)
    model.set_active_adapters(None)
    model(**inputs)
    base = seen.pop()
    units = {n: model.get_adapter(n)["layers.0.reft"] for n in ("a", "b")}
    order = torch.arange(6).expand(2, 6)
    lengths = torch.full((2,), 6)
    with torch.no_grad():
        only = {n: u(base, order, lengths) for n, u in units.items()}
        stacked = units["b"](only["a"], order, lengths)
    model.set_active_adapters(ac.Stack("a", "b"))
    model(**inputs)
    torch.testing.assert_close(seen.pop(), stacked)
    model.set_active_adapters(ac.BatchSplit("a", "b", batch_sizes=[1, 1]))
    model(**inputs)
    got = seen.pop()
    torch.testing.assert_close(got, torch.cat([only["a"][:1], only["b"][1:]]))
    model.set_active_adapters(ac.MultiTask("a", "b"))
    model(**inputs, task_ids=[1, 0])
    torch.testing.assert_close(seen.pop(), torch.cat([only["b"][:1], only["a"][1:]]))
    handle.remove()
    for block in (ac.Parallel("a", "b"), ac.Average("a", "b")):
        with pytest.raises(CompositionError, match="reft"):
            model.set_active_adapters(block)


def test_generate_edits_prompt_once_and_matches_full_reforward(monkeypatch):
    from adapters_reft import prompt_lengths
    from adapters_reft.layer import ReftUnit

    model = tiny_model("qwen3", "causal_lm")
    adapters.init(model)
    model.add_adapter("a", config=LoReftConfig(prefix_positions=2, suffix_positions=2, r=2, dropout=0.0),
                      set_active=True)
    with torch.no_grad():  # make the edit strong enough to change greedy tokens
        for p in model.get_adapter("a")["layers.0.reft"].parameters():
            p.mul_(4.0)
    ids = torch.tensor([[0, 0, 5, 9, 17, 33], [7, 8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    calls: list[int] = []
    original = ReftUnit.apply

    def counting(self, h, index, invalid):
        calls.append(h.shape[1])
        return original(self, h, index, invalid)

    monkeypatch.setattr(ReftUnit, "apply", counting)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, use_cache=True,
                         output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    assert calls == [6, 6]  # the pre-fill, once per layer; decode steps edit nothing
    seq = out.sequences
    assert seq.shape[1] == 11

    # reference: full re-forward without cache, edits counted within the prompt only
    monkeypatch.setattr(ReftUnit, "apply", original)
    full_mask = torch.cat([mask, torch.ones(2, 5, dtype=torch.long)], dim=1)
    prompt_real = mask.sum(1)
    tokens = ids
    for step in range(5):
        m = full_mask[:, : tokens.shape[1]]
        pos = (m.cumsum(-1) - 1).clamp_min(0)
        with torch.no_grad(), prompt_lengths(prompt_real):
            logits = model(input_ids=tokens, attention_mask=m, position_ids=pos, use_cache=False).logits[:, -1]
        torch.testing.assert_close(logits, out.scores[step], atol=1e-4, rtol=1e-4)
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(tokens, seq)
    model.set_active_adapters(None)
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    model.set_active_adapters("a")
    with torch.no_grad():
        edited_logits = model(input_ids=ids, attention_mask=mask).logits
        model.set_active_adapters(None)
        base_logits = model(input_ids=ids, attention_mask=mask).logits
    assert (edited_logits - base_logits).abs().max() > 1e-3
    assert plain.shape == seq.shape


@pytest.mark.parametrize("config", ["loreft[r=2, prefix_positions=2, suffix_positions=2]",
                                    "loreft[r=2, prefix_positions=1, suffix_positions=3, tied_weights=False]"])
def test_packed_sequences_are_edited_each_on_its_own(config):
    """Sequences packed into one row (``position_ids`` restarting at 0, no attention mask, as
    DataCollatorWithFlattening makes them): every sequence gets its own prefix and suffix edits."""
    from adapters.context import ForwardContext, pop_context, push_context

    model = tiny_model("qwen3", "causal_lm")
    adapters.init(model)
    model.add_adapter("r", config=config, set_active=True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model._adapters_state.adapter_parameters("r"):
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    layer = model._adapters_state.layers("r")[0]
    lengths = [5, 1, 7]
    h = torch.randn(1, sum(lengths), model.config.hidden_size, generator=gen)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    with torch.no_grad():
        push_context(ForwardContext(position_ids=position_ids))
        try:
            packed = layer.edit(h)
        finally:
            pop_context()
        push_context(ForwardContext())
        try:
            pieces = [layer.edit(part) for part in torch.split(h, lengths, dim=1)]
        finally:
            pop_context()
    torch.testing.assert_close(packed, torch.cat(pieces, dim=1), rtol=1e-5, atol=1e-6)
    assert not torch.equal(packed, h)
    # the whole row as one sequence would edit other tokens (the packing is what changes the result)
    with torch.no_grad():
        push_context(ForwardContext())
        try:
            unpacked = layer.edit(h)
        finally:
            pop_context()
    assert not torch.allclose(unpacked, packed)
