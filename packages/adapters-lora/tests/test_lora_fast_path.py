"""The straight-line LoRA path: autocast, gradients of the single-node training path, torch.func.

The straight-line path fuses the low-rank update into the base output in place; autocast does not
cast in-place ops, so under autocast the layer must take the general path. The training fast path
is a single autograd node; its gradients (first and second order) are checked against the same math
written with ordinary differentiable ops, and per-sample gradients through ``torch.func`` against a
loop over the samples.
"""

from __future__ import annotations

import pytest
import torch

from adapters_lora import LoRAConfig

CONFIGS = ["lora", "dora", "ia3", "mtl_lora", "lora[dropout=0.1]"]


@pytest.mark.parametrize("arch", ["qwen3", "gpt2"])
@pytest.mark.parametrize("config", CONFIGS)
def test_bf16_autocast_on_cpu(helpers, arch, config) -> None:
    model = helpers.build(arch)
    model.add_adapter("a", config=config)
    helpers.randomize_adapter(model, "a")
    model.train_adapter("a")
    model.eval()  # no dropout: autocast and float32 runs see the same function
    inputs = helpers.tiny_inputs(model)
    kwargs = {"task_ids": torch.zeros(inputs["input_ids"].shape[0], dtype=torch.long)} if config == "mtl_lora" else {}
    reference = helpers.forward(model, inputs, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inferred = helpers.forward(model, inputs, **kwargs)
        out = helpers.output_of(model(**inputs, **kwargs))
        out.float().pow(2).mean().backward()
    scale = reference.abs().max().item()
    torch.testing.assert_close(inferred.float(), reference, atol=0.05 * scale, rtol=0.05)
    adapter_params = model._adapters_state.adapter_parameters("a")
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in adapter_params if p.requires_grad)
    # the frozen weights stay float32 and receive nothing
    base = [p for n, p in model.named_parameters() if not p.requires_grad]
    assert base and all(p.dtype == torch.float32 and p.grad is None for p in base)


@pytest.mark.parametrize("bias", [False, True])
def test_fast_path_gradients_match_plain_autograd(bias) -> None:
    from adapters_lora.layer import _PlainLoRALinear

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(12, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(12, generator=gen, dtype=torch.float64, requires_grad=True) if bias else None
    lora_a = torch.randn(4, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    lora_b = torch.randn(12, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    inputs = [t for t in (x, weight, b, lora_a, lora_b) if t is not None]

    def plain(x, weight, b, lora_a, lora_b):
        return torch.nn.functional.linear(x, weight, b) + 1.5 * (x @ lora_a.t()) @ lora_b.t()

    grad_out = torch.randn(3, 5, 12, generator=gen, dtype=torch.float64)
    expected = torch.autograd.grad(plain(x, weight, b, lora_a, lora_b), inputs, grad_out)
    out = _PlainLoRALinear.apply(x, weight, b, lora_a, lora_b, 1.5)[0]
    torch.testing.assert_close(out, plain(x, weight, b, lora_a, lora_b))
    for got, want in zip(torch.autograd.grad(out, inputs, grad_out), expected):
        torch.testing.assert_close(got, want)
    # only what requires a gradient is computed: frozen base weight and bias, like in a model
    weight.requires_grad_(False)
    if b is not None:
        b.requires_grad_(False)
    out = _PlainLoRALinear.apply(x, weight, b, lora_a, lora_b, 1.5)[0]
    grads = torch.autograd.grad(out, (x, lora_a, lora_b), grad_out)
    for got, want in zip(grads, (expected[0], expected[-2], expected[-1])):
        torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(
        lambda x, a, bb: _PlainLoRALinear.apply(x, weight, b, a, bb, 1.5)[0], (x, lora_a, lora_b)
    )
    # second order (gradient penalties, meta-learning): the backward is itself differentiable
    assert torch.autograd.gradgradcheck(
        lambda x, a, bb: _PlainLoRALinear.apply(x, weight, b, a, bb, 1.5)[0], (x, lora_a, lora_b)
    )


def test_compiled_training_step_matches_eager(helpers) -> None:
    grads = []
    for compiled in (False, True):
        model = helpers.build("qwen3")
        model.add_adapter("a", LoRAConfig(r=4, init_weights="bert", init_weights_seed=7))
        model.train_adapter("a")
        model.eval()
        inputs = helpers.tiny_inputs(model)
        torch._dynamo.reset()
        run = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
        run(**inputs).last_hidden_state.pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5)


def test_torch_func_per_sample_gradients(helpers) -> None:
    from torch.func import functional_call, grad, vmap

    model = helpers.build("qwen3")
    model.add_adapter("a", LoRAConfig(r=4, init_weights="bert", init_weights_seed=5))
    model.train_adapter("a")
    model.eval()
    ids = helpers.tiny_inputs(model)["input_ids"]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert params

    def loss(params, sample):
        return functional_call(model, params, (sample,)).last_hidden_state.pow(2).mean()

    batched = vmap(grad(loss), in_dims=(None, 0))(params, ids.unsqueeze(1))
    for row in range(ids.shape[0]):
        single = grad(loss)(params, ids[row : row + 1])
        for name, value in single.items():
            torch.testing.assert_close(batched[name][row], value, atol=1e-6, rtol=1e-5, msg=name)
    # and the same gradient as autograd through the module
    model(ids[:1]).last_hidden_state.pow(2).mean().backward()
    reference = grad(loss)(params, ids[:1])
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, reference[name], atol=1e-6, rtol=1e-5, msg=name)
