"""Quantized bases (issue 20): every method on bitsandbytes 4-bit NF4 and 8-bit bases, loaded through
transformers' own quantized loading path, on CPU (bitsandbytes >= 0.49 runs both there), and on torchao
int8 weight-only bases.

The quantized models are used in training mode: bitsandbytes repacks a 4-bit weight for its CPU inference
kernel at the first eval-mode forward without gradients, after which the weight no longer computes
gradients for its input (a bitsandbytes limitation on CPU only); training mode keeps the training kernels.
"""

from __future__ import annotations

import copy
import glob
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("bitsandbytes")  # the tests session installs it (noxfile: adapters-core[bnb])

import adapters
from adapters.linear import AdapterLinear
from adapters.quantized import dequantize, is_quantized_tensor, quantization_kind
from adapters.testing import tiny_inputs, tiny_model
from adapters.testing.conformance import perturb

#: method -> (config, starts as the identity, can merge, learning rate of the training check)
METHODS = {
    "lora": ("lora[attn_matrices=['q','k','v','o'], intermediate_lora=True, output_lora=True]", True, True, 1e-2),
    "dora": ("dora", True, True, 1e-2),
    "ia3": ("ia3", True, True, 5e-2),
    "vera": ("vera", True, True, 5e-2),
    "mtl_lora": ("mtl_lora", True, True, 1e-2),
    "seq_bn": ("seq_bn[init_weights=mam_adapter]", True, False, 1e-2),
    "loreft": ("loreft[dropout=0.0]", False, False, 1e-2),  # no dropout: outputs are compared in train mode
}
MERGEABLE = [name for name, spec in METHODS.items() if spec[2]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A tiny random Qwen3 causal LM (hidden 64, 2 layers) saved in float32."""
    path = str(tmp_path_factory.mktemp("tiny-qwen3"))
    tiny_model("qwen3", "causal_lm", hidden_size=64, head_dim=16).save_pretrained(path)
    return path


def load(path: str, bits: int, compute: torch.dtype = torch.float32, dtype: torch.dtype | None = None):
    """``path`` loaded the way users load a quantized model, in training mode."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if bits == 4:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=compute)
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=dtype)
    return model.train()


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def quantized_layers(model) -> list[AdapterLinear]:
    return [m for m in model.modules() if isinstance(m, AdapterLinear) and m.quantization is not None]


def train(model, inputs, lr: float, steps: int = 6) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def float_twin(path: str, quantized_model):
    """The float32 model whose projections hold the quantized model's dequantized weights."""
    from transformers import AutoModelForCausalLM

    twin = AutoModelForCausalLM.from_pretrained(path).train()
    with torch.no_grad():
        for name, module in quantized_model.named_modules():
            kind = quantization_kind(module)
            if isinstance(module, AdapterLinear) and module.quantization is not None:
                twin.get_submodule(name).weight.copy_(module.dequantized_weight())
            elif kind is not None and not name.endswith(".base_layer"):  # a projection without an adapter
                twin.get_submodule(name).weight.copy_(dequantize(module, kind))
    return twin


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("method", list(METHODS))
def test_method_on_quantized_base(checkpoint, tmp_path, bits, method):
    config, identity, _, lr = METHODS[method]
    model = load(checkpoint, bits)
    inputs = tiny_inputs(model)
    base = logits(model, inputs)
    keys = list(model.state_dict())
    adapters.init(model)
    model.add_adapter("x", config=config)
    assert torch.equal(logits(model, inputs), base), "an inactive adapter changed the quantized model"
    model.train_adapter("x")
    out = logits(model, inputs)
    if identity:
        torch.testing.assert_close(out, base, rtol=0, atol=1e-6 if method == "dora" else 0)
    else:
        assert not torch.equal(out, base)
    # the base stays quantized and is the same module: no dequantized copy, keys unchanged
    for layer in quantized_layers(model):
        assert layer.quantization == f"bnb-{bits}bit"
        assert layer.weight.dtype == (torch.uint8 if bits == 4 else torch.int8)
        assert "weight" not in layer._parameters and layer._backup is None
        assert all(t.dtype != torch.float32 or t.shape != (layer.out_features, layer.in_features)
                   for t in layer.state_dict().values()), "a float copy of the base weight is kept"
    state = model._adapters_state
    adapter_ids = {id(p) for p in state.adapter_parameters("x")}
    assert [k for k in model.state_dict() if k in set(keys)] == keys
    assert {id(p) for p in model.parameters() if p.requires_grad} == adapter_ids
    before = {k: v.clone() for k, v in model.state_dict(keep_vars=True).items() if id(v) not in adapter_ids}
    adapter_before = [p.detach().clone() for p in state.adapter_parameters("x")]
    losses = train(model, inputs, lr)
    assert losses[-1] < losses[0] - 5e-3, losses
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()), "training moved a base weight"
    assert any(not torch.equal(p, b) for p, b in zip(state.adapter_parameters("x"), adapter_before))
    trained = logits(model, inputs)

    # saving writes the adapter only; a float model with the dequantized weights computes the same
    model.save_adapter(str(tmp_path / "x"), "x")
    from safetensors.torch import load_file

    saved = {k: v for f in glob.glob(str(tmp_path / "x" / "*.safetensors")) for k, v in load_file(f).items()}
    assert all(v.is_floating_point() for v in saved.values())
    added = sum(v.numel() for k, v in model.state_dict().items() if k not in set(keys))  # the adapter's tensors
    assert sum(v.numel() for v in saved.values()) == added
    twin = adapters.init(float_twin(checkpoint, model))
    twin.load_adapter(str(tmp_path / "x"), set_active=True)
    torch.testing.assert_close(logits(twin, inputs), trained, rtol=1e-4, atol=1e-4)

    # save -> load into a freshly quantized model reproduces the outputs
    fresh = adapters.init(load(checkpoint, bits))
    fresh.load_adapter(str(tmp_path / "x"), set_active=True)
    assert torch.equal(logits(fresh, inputs), trained)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("method", MERGEABLE)
def test_merge_requantizes_with_a_warning_and_resets_exactly(checkpoint, bits, method):
    model = adapters.init(load(checkpoint, bits))
    inputs = tiny_inputs(model)
    base = logits(model, inputs)
    model.add_adapter("x", config=METHODS[method][0])
    perturb(model, "x", std=0.5)  # an adapter that changes the outputs well beyond 4-bit rounding
    model.set_active_adapters("x")
    unmerged = logits(model, inputs)
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    originals = {id(layer): layer.weight for layer in quantized_layers(model)}
    with pytest.warns(adapters.QuantizedMergeWarning, match="quantizes it again"):
        model.merge_adapter("x")
    for layer in quantized_layers(model):
        assert is_quantized_tensor(layer.weight) and layer.weight is not originals[id(layer)]
        assert layer._backup[0] is originals[id(layer)], "the backup is the original quantized weight, not a copy"
    merged = logits(model, inputs)
    # the merged weights carry the adapter up to the re-quantization's rounding
    # (measured: the largest logit error is 0.3-35 % of the adapter's largest effect in 4 bits, 0.1-2 % in 8)
    error, effect = (merged - unmerged).abs().max(), (base - unmerged).abs().max()
    assert error < (0.5 if bits == 4 else 0.05) * effect
    model.reset_adapter()
    assert list(model.state_dict()) == list(state_dict)
    assert all(torch.equal(v, state_dict[k]) for k, v in model.state_dict().items()), "reset is not exact"
    assert torch.equal(logits(model, inputs), unmerged)


def test_merge_and_unload_returns_the_requantized_model(checkpoint, tmp_path):
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM

    model = load(checkpoint, 4)
    cls, keys = type(model), list(model.state_dict())
    adapters.init(model)
    inputs = tiny_inputs(model)
    model.add_adapter("x", config="lora")
    perturb(model, "x")
    model.set_active_adapters("x")
    with pytest.warns(adapters.QuantizedMergeWarning, match="merge_and_unload"):
        model = model.merge_and_unload()
    assert type(model) is cls and isinstance(model.model.layers[0].self_attn.q_proj, Linear4bit)
    assert list(model.state_dict()) == keys
    merged = logits(model, inputs)
    model.save_pretrained(str(tmp_path / "merged"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).train()
    assert torch.equal(logits(reloaded, inputs), merged)


def test_state_dict_round_trip_and_summary(checkpoint):
    model = adapters.init(load(checkpoint, 4))
    model.add_adapter("x", config="lora")
    assert "model.layers.0.self_attn.q_proj.weight.absmax" in model.state_dict()  # bitsandbytes' keys, as before
    eight = adapters.init(load(checkpoint, 8))  # (bitsandbytes loads 8-bit state dicts; 4-bit ones via transformers)
    eight.add_adapter("x", config="lora")
    state_dict = eight.state_dict()
    key = "model.layers.0.self_attn.q_proj.weight"
    state_dict[key] = torch.zeros_like(state_dict[key])
    result = eight.load_state_dict(state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert not eight.model.layers[0].self_attn.q_proj.weight.any(), "the base key did not reach the quantized module"
    float_count = sum(p.numel() for p in tiny_model("qwen3", "causal_lm", hidden_size=64, head_dim=16).parameters())
    rows = {r["name"]: r for r in model.adapter_summary(as_dict=True)}
    assert rows["Full model"]["#params"] == float_count  # 4-bit weights count as weights, not packed bytes
    model.freeze_model(False)  # unfreezing never makes a quantized weight trainable
    assert not any(p.requires_grad for p in model.parameters() if is_quantized_tensor(p))


@pytest.mark.parametrize("bits", [4, 8])
def test_adapters_take_the_compute_dtype(checkpoint, bits):
    model = adapters.init(load(checkpoint, bits, compute=torch.bfloat16, dtype=torch.bfloat16))
    for name in ("lora", "vera", "seq_bn", "loreft"):
        model.add_adapter(name, config=name)
        assert {p.dtype for p in model._adapters_state.adapter_parameters(name)} == {torch.bfloat16}, name
        model.delete_adapter(name)
    model.add_adapter("d", config="dora")
    model.train_adapter("d")
    assert train(model, tiny_inputs(model), 1e-2, steps=2)


@pytest.mark.parametrize("bits", [4, 8])
def test_float16_bases_get_float32_adapters_for_the_grad_scaler(checkpoint, bits):
    """fp16 mixed precision unscales float32 gradients only: a float16 adapter (forced here through
    ``dtype``) fails, the default (float32 on a float16 quantized base) trains."""
    for config, ok in (("lora[dtype=float16]", False), ("lora", True)):
        model = adapters.init(load(checkpoint, bits, compute=torch.float16, dtype=torch.float16))
        model.add_adapter("x", config=config)
        model.train_adapter("x")
        inputs = tiny_inputs(model)
        params = [p for p in model.parameters() if p.requires_grad]
        scaler = torch.amp.GradScaler("cpu")
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(**inputs, labels=inputs["input_ids"]).loss
        scaler.scale(loss).backward()
        if not ok:
            with pytest.raises(ValueError, match="FP16 gradients"):
                scaler.step(optimizer)
            continue
        assert {p.dtype for p in params} == {torch.float32}
        scaler.step(optimizer)
        scaler.update()
    hooked = adapters.init(load(checkpoint, bits, compute=torch.float16, dtype=torch.float16))
    for other in ("loreft", "seq_bn"):  # the methods that hook modules follow the same rule
        hooked.add_adapter(other, config=other)
        assert {p.dtype for p in hooked._adapters_state.adapter_parameters(other)} == {torch.float32}, other


def test_prepare_model_for_kbit_training(checkpoint):
    model = load(checkpoint, 4, compute=torch.bfloat16, dtype=torch.bfloat16)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    twin = copy.deepcopy(model)
    assert adapters.prepare_model_for_kbit_training(model) is model
    assert not any(p.requires_grad for p in model.parameters())
    assert {n: p.dtype for n, p in model.named_parameters()} == dtypes, "prepare cast a weight"
    assert model.is_gradient_checkpointing and model.config.use_cache is False
    adapters.prepare_model_for_kbit_training(twin, use_gradient_checkpointing=False)
    assert not twin.is_gradient_checkpointing
    grads = []
    for m in (model, twin):
        adapters.init(m)
        m.add_adapter("x", config="lora[init_weights_seed=0, init_weights=bert]")
        m.train_adapter("x")
        inputs = tiny_inputs(m)
        m(**inputs, labels=inputs["input_ids"]).loss.backward()
        grads.append([p.grad.clone() for p in m._adapters_state.adapter_parameters("x")])
    assert all(g.abs().sum() > 0 for g in grads[0])
    for with_checkpointing, without in zip(*grads):
        torch.testing.assert_close(with_checkpointing, without)
    # reentrant checkpointing (the default) needs inputs that require grad: only then the input-embeddings hook
    non_reentrant = load(checkpoint, 4, compute=torch.bfloat16, dtype=torch.bfloat16)
    adapters.prepare_model_for_kbit_training(non_reentrant, gradient_checkpointing_kwargs={"use_reentrant": False})
    inputs = tiny_inputs(non_reentrant)
    assert model.get_input_embeddings()(inputs["input_ids"]).requires_grad
    assert not non_reentrant.get_input_embeddings()(inputs["input_ids"]).requires_grad
    adapters.init(non_reentrant)
    non_reentrant.add_adapter("x", config="lora[init_weights_seed=0, init_weights=bert]")
    non_reentrant.train_adapter("x")
    non_reentrant(**inputs, labels=inputs["input_ids"]).loss.backward()
    for p, expected in zip(non_reentrant._adapters_state.adapter_parameters("x"), grads[0]):
        torch.testing.assert_close(p.grad, expected)


def test_quantization_libraries_are_optional(monkeypatch):
    code = ("import sys, adapters, adapters.quantized, adapters.plugin; adapters.prepare_model_for_kbit_training; "
            "import adapters_lora, adapters_vera, adapters_bottleneck, adapters_reft; "
            "print(sorted(m for m in ('bitsandbytes', 'torchao') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    from adapters import quantized

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    model = tiny_model("qwen3", "causal_lm")
    model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    with pytest.raises(ImportError, match=r"pip install 'adapters-core\[bnb\]'"):
        quantized.prepare_model_for_kbit_training(model)


@pytest.mark.parametrize("method", ["lora", "dora", "vera", "seq_bn", "loreft"])
def test_torchao_int8_weight_only(tmp_path, method):
    torchao_quantization = pytest.importorskip("torchao.quantization")  # installed in the tests session
    config, identity, mergeable, lr = METHODS[method]

    def quantized_model():
        model = tiny_model("qwen3", "causal_lm", hidden_size=64, head_dim=16)
        torchao_quantization.quantize_(model.model, torchao_quantization.Int8WeightOnlyConfig())
        return model.train()

    model = quantized_model()
    inputs = tiny_inputs(model)
    base = logits(model, inputs)
    adapters.init(model)
    model.add_adapter("x", config=config)
    model.train_adapter("x")
    if identity:
        torch.testing.assert_close(logits(model, inputs), base, rtol=0, atol=1e-6 if method == "dora" else 0)
    layers = quantized_layers(model)
    assert layers or method in ("seq_bn", "loreft")
    assert all(layer.quantization == "torchao" for layer in layers)
    losses = train(model, inputs, lr)
    assert losses[-1] < losses[0] - 5e-3
    assert {id(p) for p in model.parameters() if p.requires_grad} == \
        {id(p) for p in model._adapters_state.adapter_parameters("x")}
    trained = logits(model, inputs)
    if mergeable:
        weights = [layer.weight for layer in layers]
        with pytest.raises(adapters.AdapterError, match="merge"):
            model.merge_adapter("x")
        assert all(layer.weight is w for layer, w in zip(layers, weights))
        assert torch.equal(logits(model, inputs), trained)
    model.save_adapter(str(tmp_path / "x"), "x")
    fresh = adapters.init(quantized_model())
    fresh.load_adapter(str(tmp_path / "x"), set_active=True)
    assert torch.equal(logits(fresh, inputs), trained)


def test_cpu_inference_layout_then_training(checkpoint):
    """bitsandbytes repacks a 4-bit weight for its CPU inference kernel at an eval-mode forward (on CPUs with
    AVX512-BF16), after which it computes no gradients. Adapter layers undo and prevent that for the
    projections they wrap, ``train_adapter`` for all; a repacked weight still dequantizes."""
    from bitsandbytes.functional import has_avx512bf16
    from bitsandbytes.nn import Linear4bit

    def packed(model) -> list[bool]:
        return [getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                for m in model.modules() if isinstance(m, Linear4bit)]

    model = load(checkpoint, 4)
    inputs = tiny_inputs(model)
    logits(model.eval(), inputs)
    assert set(packed(model)) == {bool(has_avx512bf16())}
    k_proj = model.model.layers[0].self_attn.k_proj
    x = torch.randn(3, k_proj.in_features)
    with torch.no_grad():  # the repacked layout dequantizes through the layer's own kernel
        torch.testing.assert_close(x @ dequantize(k_proj, "bnb-4bit").t(), k_proj(x), rtol=0, atol=1e-2)
    adapters.init(model)
    model.add_adapter("x", config="dora")  # q and v: wrapped, unpacked, never repacked
    perturb(model, "x")
    model.set_active_adapters("x")
    evaluated = logits(model, inputs)
    assert not any(packed(model.model.layers[0].self_attn.q_proj))
    model.train_adapter("x")
    assert not any(packed(model))
    torch.testing.assert_close(logits(model, inputs), evaluated, rtol=0, atol=0.05)  # scales were rounded to bf16
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    grads = [p.grad for p in model._adapters_state.adapter_parameters("x")]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("trainer", ["Trainer", "AdapterTrainer"])
def test_trainers_train_a_quantized_base_with_adapters(checkpoint, tmp_path, trainer):
    """transformers' Trainer accepts a quantized model only with trainable adapters attached: ours count (the
    base alone is refused as before); checkpoints hold the adapter, which reloads into a fresh 4-bit model."""
    import transformers

    model = adapters.prepare_model_for_kbit_training(load(checkpoint, 4))
    adapters.init(model)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2,
                                          save_steps=2, learning_rate=1e-2, report_to=[], use_cpu=True)
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": (ids := torch.randint(4, 100, (8,), generator=gen)), "labels": ids} for _ in range(4)]
    cls = getattr(adapters, trainer) if trainer == "AdapterTrainer" else transformers.Trainer
    if trainer == "Trainer":
        with pytest.raises(ValueError, match="purely quantized"):
            cls(model=model, args=args, train_dataset=data)
    model.add_adapter("q", config="lora[target_modules='all-linear']")
    model.train_adapter("q")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    cls(model=model, args=args, train_dataset=data).train()
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    found = [os.path.join(root, f) for root, _, files in os.walk(tmp_path) for f in files]
    assert not any(f.endswith("model.safetensors") for f in found)
    directory = next(os.path.dirname(f) for f in found if f.endswith("adapter_config.json"))
    fresh = adapters.init(load(checkpoint, 4))
    fresh.load_adapter(directory, set_active=True)
    inputs = {"input_ids": data[0]["input_ids"][None]}
    assert torch.equal(logits(fresh.eval(), inputs), logits(model.eval(), inputs))
