"""``target_modules``: LoRA-family adapters (LoRA, DoRA, IA3, VeRA, MTL-LoRA) on any module, by name.

For each form (a list of names, a regular expression, ``"all-linear"``) on several architectures (GQA,
fused GPT-2 ``Conv1D``, fused Phi-3 ``qkv_proj``, encoder, encoder-decoder): exactly the named modules
are adapted; off is the base exactly; merged equals unmerged; save -> load into a fresh model is exact.
``"all-linear"`` gives peft's trainable-parameter count; embeddings and the LM head take LoRA; per-module
ranks and alphas (``rank_pattern`` / ``alpha_pattern``) compute ``alpha_i / r_i · B A x``; a
mixture-of-experts layer with linear experts is reached; names that match nothing (or match a module
that is not a projection) are refused with a clear error and the model unchanged.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import adapters
import adapters.composition as ac
from adapters.errors import AdapterError
from adapters.testing import tiny_inputs, tiny_model

LINEAR_TYPES = ("LoRALinear", "VeraLinear")


def _out(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out[0]


def _perturb(model, name: str, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model._adapters_state.adapter_parameters(name):
            p.add_((0.1 * torch.randn(p.shape, generator=gen)).to(p.dtype))


def _adapted_paths(model) -> set[str]:
    return {path for path, m in model.named_modules() if type(m).__name__ in (*LINEAR_TYPES, "LoRAEmbedding")}


def _base_linears(model, pattern) -> set[str]:
    return {path for path, m in model.named_modules() if pattern(path, m)}


def _is_linear(m) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


FORMS = [
    # (arch, task, target_modules, which base modules must be adapted)
    ("qwen3", "causal_lm", ["gate_proj", "k_proj"], lambda p, m: p.endswith(("gate_proj", "k_proj"))),
    ("llama", "causal_lm", r".*layers\.1\.mlp\.(up|down)_proj",
     lambda p, m: re.search(r"layers\.1\.mlp\.(up|down)", p)),
    ("gpt2", "causal_lm", "all-linear", lambda p, m: ".h." in p and _is_linear(m)),
    ("phi3", "causal_lm", ["qkv_proj", "down_proj"], lambda p, m: p.endswith(("qkv_proj", "down_proj"))),
    ("bert", "seq_cls", ["query", "output.dense"], lambda p, m: p.endswith(("query", "output.dense"))),
    ("t5", "causal_lm", "all-linear", lambda p, m: ".block." in p and _is_linear(m)),
]


# every form on every architecture for LoRA and IA3; the other methods on one decoder with separate and one
# with fused projections
FORM_CASES = [pytest.param(*form, method, id=f"{form[0]}-{method}") for form in FORMS
              for method in ("lora", "ia3", "dora", "vera", "mtl_lora")
              if method in ("lora", "ia3") or form[0] in ("qwen3", "gpt2")]


@pytest.mark.parametrize(("arch", "task", "targets", "expected", "method"), FORM_CASES)
def test_each_form_adapts_exactly_the_named_modules(arch, task, targets, expected, method, tmp_path):
    model = adapters.init(tiny_model(arch, task))
    want = _base_linears(model, expected)
    inputs = tiny_inputs(model, batch=2, seq=6)
    base = _out(model, inputs)
    config = adapters.AdapterConfig.load(method, target_modules=targets, **({"r": 8} if method == "vera" else {}))
    model.add_adapter("x", config=config)
    assert _adapted_paths(model) == want and want
    _perturb(model, "x")
    model.set_active_adapters(None)
    assert torch.equal(_out(model, inputs), base)
    model.set_active_adapters("x")
    adapted = _out(model, inputs)
    assert not torch.allclose(adapted, base)
    model.train_adapter("x")
    model.eval()
    model.save_adapter(str(tmp_path / "x"), "x")
    fresh = adapters.init(tiny_model(arch, task))
    fresh.load_adapter(str(tmp_path / "x"), set_active=True)
    assert torch.equal(_out(fresh, inputs), adapted)
    model.merge_adapter("x")
    torch.testing.assert_close(_out(model, inputs), adapted, rtol=1e-4, atol=1e-5)
    model.reset_adapter()
    assert torch.equal(_out(model, inputs), adapted)


@pytest.mark.parametrize(("arch", "task"), [("qwen3", "causal_lm"), ("llama", "causal_lm"), ("gpt2", "causal_lm"),
                                            ("phi3", "causal_lm"), ("t5", "causal_lm"), ("gpt_neox", "causal_lm")])
def test_all_linear_has_peft_trainable_parameter_count(arch, task):
    peft = pytest.importorskip("peft")
    model = tiny_model(arch, task)
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules="all-linear", r=8))
    expected = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    adapters.init(model)
    model.add_adapter("x", adapters.LoRAConfig(target_modules="all-linear", r=8))
    model.train_adapter("x")
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_layers_to_transform_and_exclude_modules():
    model = adapters.init(tiny_model("qwen3"))
    model.add_adapter("x", adapters.LoRAConfig(target_modules="all-linear", layers_to_transform=[1],
                                               exclude_modules=["o_proj", "down_proj"]))
    names = {p.split("layers.1.", 1)[1] for p in _adapted_paths(model)}
    assert all(p.startswith("layers.1.") for p in _adapted_paths(model))
    assert names == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"}
    # the interface fields honour layers_to_transform as well
    model.add_adapter("y", adapters.LoRAConfig(layers_to_transform=0))
    assert {layer.location for layer in model._adapters_state.layers("y")} == {
        "layers.0.self_attn.q", "layers.0.self_attn.v"}


def test_rank_and_alpha_patterns_give_each_module_its_own_scaling():
    model = adapters.init(tiny_model("qwen3"))
    config = adapters.LoRAConfig(target_modules=["q_proj", "gate_proj"], r=4, alpha=8,
                                 rank_pattern={"gate_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3})
    model.add_adapter("x", config)
    _perturb(model, "x")
    model.set_active_adapters("x")
    layers = {layer.location: layer for layer in model._adapters_state.layers("x")}
    expected = {"layers.0.self_attn.q": (4, 8 / 4), "layers.1.self_attn.q": (4, 3 / 4),
                "layers.0.mlp.gate_proj": (2, 8 / 2), "layers.1.mlp.gate_proj": (2, 8 / 2)}
    assert set(layers) == set(expected)
    x = torch.randn(2, 3, model.config.hidden_size)
    for location, (rank, scaling) in expected.items():
        layer = layers[location]
        unit = layer.adapters["x"]
        assert unit.lora_A.shape[0] == rank
        want = layer.base_forward(x) + scaling * (x @ unit.lora_A.t() @ unit.lora_B.t())
        with torch.no_grad():
            torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)


def _lm(tied: bool):
    return adapters.init(tiny_model("qwen3", "causal_lm", tie_word_embeddings=tied))


def test_lora_on_input_embeddings_and_lm_head(tmp_path):
    model = _lm(tied=False)
    inputs = tiny_inputs(model, batch=2, seq=6)
    base = _out(model, inputs)
    model.add_adapter("x", adapters.LoRAConfig(target_modules=["embed_tokens", "lm_head"], r=4))
    assert type(model.model.embed_tokens).__name__ == "LoRAEmbedding"
    assert type(model.lm_head).__name__ == "LoRALinear"
    model.set_active_adapters("x")
    assert torch.equal(_out(model, inputs), base)  # A = 0 for the embedding, B = 0 for the head
    model.train_adapter("x")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"model.embed_tokens.adapters.x.lora_A", "model.embed_tokens.adapters.x.lora_B",
                         "lm_head.adapters.x.lora_A", "lm_head.adapters.x.lora_B"}
    _perturb(model, "x")
    model.eval()
    adapted = _out(model, inputs)
    assert not torch.allclose(adapted, base)
    model.save_adapter(str(tmp_path / "x"), "x")
    fresh = _lm(tied=False)
    fresh.load_adapter(str(tmp_path / "x"), set_active=True)
    assert torch.equal(_out(fresh, inputs), adapted)
    generated = model.generate(inputs["input_ids"], max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3
    model.merge_adapter("x")
    torch.testing.assert_close(_out(model, inputs), adapted, rtol=1e-4, atol=1e-5)
    merged = model.merge_and_unload()
    assert type(merged.model.embed_tokens) is nn.Embedding and type(merged.lm_head) is nn.Linear
    torch.testing.assert_close(_out(merged, inputs), adapted, rtol=1e-4, atol=1e-5)


def test_merge_into_a_tied_weight_is_refused_and_changes_nothing():
    model = _lm(tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.add_adapter("x", adapters.LoRAConfig(target_modules=["embed_tokens"]))
    _perturb(model, "x")
    before = model.lm_head.weight.detach().clone()
    with pytest.raises(AdapterError, match=r"also the weight of 'lm_head'.*tied"):
        model.merge_adapter("x")
    assert torch.equal(model.lm_head.weight, before) and not model._adapters_state.merged


@pytest.mark.parametrize("block", ["Stack", "Average", "BatchSplit", "MultiTask", "Parallel"])
def test_embedding_lora_under_every_block_equals_row_by_row(block):
    model = _lm(tied=False)
    for i, name in enumerate(("a", "b")):
        model.add_adapter(name, adapters.LoRAConfig(target_modules=["embed_tokens", "q_proj"], r=2))
        _perturb(model, name, seed=i)
    inputs = tiny_inputs(model, batch=2, seq=5)
    single = {}
    for name in ("a", "b"):
        model.set_active_adapters(name)
        single[name] = _out(model, inputs)
    if block == "BatchSplit":
        model.set_active_adapters(ac.BatchSplit("a", "b", batch_sizes=[1, 1]))
        torch.testing.assert_close(_out(model, inputs), torch.cat([single["a"][:1], single["b"][1:]]))
    elif block == "MultiTask":
        model.set_active_adapters(ac.MultiTask("a", "b"))
        with torch.no_grad():
            out = model(**inputs, task_ids=["b", "a"]).logits
        torch.testing.assert_close(out, torch.cat([single["b"][:1], single["a"][1:]]))
    elif block == "Parallel":
        model.set_active_adapters(ac.Parallel("a", "b"))
        out = _out(model, inputs)
        torch.testing.assert_close(out, torch.cat([single["a"], single["b"]]))
    else:
        model.set_active_adapters(getattr(ac, block)("a", "b"))
        out = _out(model, inputs)
        model.set_active_adapters(None)
        base = _out(model, inputs)
        assert not torch.allclose(out, single["a"]) and not torch.allclose(out, base)


class _Experts(nn.Module):
    """A mixture-of-experts FFN whose experts are ordinary linear modules (top-1 routing)."""

    def __init__(self, hidden: int, inner: int, n: int = 3) -> None:
        super().__init__()
        self.router = nn.Linear(hidden, n, bias=False)
        self.experts = nn.ModuleList(
            nn.ModuleDict({"up_proj": nn.Linear(hidden, inner), "down_proj": nn.Linear(inner, hidden)})
            for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        choice = self.router(x).argmax(-1)
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            mask = (choice == i).unsqueeze(-1)
            out = out + mask * expert["down_proj"](torch.relu(expert["up_proj"](x)))
        return out


def test_mixture_of_experts_with_linear_experts(tmp_path):
    def build():
        model = tiny_model("qwen3")
        torch.manual_seed(1)
        for layer in model.layers:
            layer.mlp = _Experts(model.config.hidden_size, model.config.intermediate_size)
        return adapters.init(model, interface=adapters.infer_interface(model))  # the built-in one names mlp.up_proj

    model = build()
    inputs = tiny_inputs(model, batch=2, seq=6)
    model.add_adapter("x", adapters.LoRAConfig(target_modules=["experts.0.up_proj", "down_proj"]))
    paths = _adapted_paths(model)
    assert paths == {f"layers.{i}.mlp.experts.0.up_proj" for i in range(2)} | {
        f"layers.{i}.mlp.experts.{j}.down_proj" for i in range(2) for j in range(3)}
    assert {layer.location for layer in model._adapters_state.layers("x")} >= {"layers.0.mlp.experts.0.up_proj"}
    _perturb(model, "x")
    model.set_active_adapters("x")
    adapted = _out(model, inputs)
    model.save_adapter(str(tmp_path / "x"), "x")
    fresh = build()
    fresh.load_adapter(str(tmp_path / "x"), set_active=True)
    assert torch.equal(_out(fresh, inputs), adapted)
    model.merge_adapter("x")
    torch.testing.assert_close(_out(model, inputs), adapted, rtol=1e-4, atol=1e-5)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("config", "needle"), [
    (adapters.LoRAConfig(target_modules=["q_proj", "gate_projj"]), r"'gate_projj' \(did you mean \['gate_proj'"),
    (adapters.LoRAConfig(target_modules=r".*\.nothing_here"), r"is a regular expression that must match a whole "
                                                               r"module path \(as in peft\), and matches none \(paths "
                                                               r"look like 'layers\.0\.self_attn\.q_proj'\)\.$"),
    (adapters.LoRAConfig(target_modules="q_proj"), r"for module names use a list: target_modules=\['q_proj'\]"),
    (adapters.LoRAConfig(target_modules="All-Linear"), "'all-linear' is spelt in lower case"),
    (adapters.LoRAConfig(target_modules=["q_proj"], exclude_modules=["q_proj"]),
     r"names 2 module\(s\), and exclude_modules=\['q_proj'\] leave none"),
    (adapters.LoRAConfig(target_modules=["mlp"]), "matched 'layers.0.mlp', a Qwen3MLP"),
    (adapters.IA3Config(target_modules=["embed_tokens"]), "IA3.*cannot adapt an embedding"),
    (adapters.DoRAConfig(target_modules=["embed_tokens"]), "use_dora=True cannot adapt an embedding"),
    ("vera[target_modules=['embed_tokens']]", "a Embedding; VeRA adapts nn.Linear, Conv1D modules"),
    (adapters.LoRAConfig(target_modules="all-linear", layers_to_transform=[7]),
     r"places no adapter: layers_to_transform=\[7\] leave no layer of this model \(it has layers 0 to 1\)"),
    ("lora[layers_to_transform=[7]]", r"LoRA places no adapter: layers_to_transform=\[7\] leave no layer"),
    ("vera[leave_out=[0, 1]]", r"VeRA places no adapter: leave_out=\[0, 1\] leave no layer"),
])
def test_bad_targets_are_refused_and_leave_the_model_unchanged(config, needle):
    model = adapters.init(tiny_model("qwen3"))
    before = _state(model)
    with pytest.raises(AdapterError, match=needle):
        model.add_adapter("x", config=config)
    after = _state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not model._adapters_state.adapters


def test_pattern_keys_and_exclusions_that_match_nothing_warn():
    """A ``rank_pattern`` / ``alpha_pattern`` key matching no adapted module, or an ``exclude_modules`` entry
    matching no module, is named in a warning (a typo would go unnoticed otherwise); used ones do not warn."""
    model = adapters.init(tiny_model("qwen3"))
    config = adapters.LoRAConfig(target_modules=["q_proj", "v_proj"], rank_pattern={"q_projj": 2, "v_proj": 4},
                                 alpha_pattern={"q_proj": 8}, exclude_modules=["k_prj"])
    with pytest.warns(UserWarning) as record:
        model.add_adapter("x", config=config)
    messages = [str(w.message) for w in record]
    assert any("rank_pattern keys ['q_projj'] match none of the 4 adapted modules" in m for m in messages), messages
    assert any("exclude_modules entries ['k_prj'] match no module" in m for m in messages), messages
    assert not any("alpha_pattern" in m for m in messages)
    assert model.layers[0].self_attn.v_proj.adapters["x"].lora_A.shape[0] == 4


@pytest.mark.parametrize("bad", [{"target_modules": "("}, {"target_modules": []}, {"target_modules": [3]},
                                 {"rank_pattern": {"q_proj": 0}}, {"layers_to_transform": [-1]}])
def test_invalid_fields_fail_when_the_config_is_made(bad):
    with pytest.raises(ValueError):
        adapters.LoRAConfig(**bad)


def test_ia3_scaling_inputs_of_feedforward_modules():
    model = adapters.init(tiny_model("qwen3"))
    inputs = tiny_inputs(model, batch=2, seq=5)
    model.add_adapter("i", adapters.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                                              init_weights="bert"))
    model.add_adapter("l", adapters.LoRAConfig(target_modules=["down_proj"], init_weights="bert"))
    layer = model.layers[0].mlp.down_proj
    unit = layer.adapters["i"]
    assert unit.input_scale.shape == (model.config.intermediate_size,)
    x = torch.randn(2, 3, model.config.intermediate_size)
    model.set_active_adapters("i")
    with torch.no_grad():
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x * unit.input_scale, layer.weight))
    model.set_active_adapters(ac.Stack("i", "l"))
    stacked = _out(model, inputs)
    model.merge_adapter("i")  # input scaling merged first: W diag(l), then the LoRA delta adds
    model.merge_adapter("l")
    torch.testing.assert_close(_out(model, inputs), stacked, rtol=1e-4, atol=1e-5)
    model.reset_adapter()
    model.merge_adapter("l")
    weights = _state(model)
    with pytest.raises(AdapterError, match="merge it first"):
        model.merge_adapter("i")
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="composition_mode='scale'"):
        adapters.LoRAConfig(feedforward_modules=["down_proj"])
    with pytest.raises(AdapterError, match="names none of the adapted"):
        model.add_adapter("x", adapters.IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"]))
    gpt2 = adapters.init(tiny_model("gpt2"))
    with pytest.raises(AdapterError, match="in parts"):
        gpt2.add_adapter("x", adapters.IA3Config(feedforward_modules=["c_attn"]))
