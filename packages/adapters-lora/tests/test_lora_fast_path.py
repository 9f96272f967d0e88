"""The straight-line LoRA path: autocast, gradients to second order, torch.func.

The straight-line path fuses the low-rank update into the base output (in place without gradients);
autocast does not cast in-place ops, so under autocast the layer must take the general path. The path
is checked against the reference math to second order, and per-sample gradients through
``torch.func`` against a loop over the samples.
"""

from __future__ import annotations

import pytest
import torch

from adapters_lora import LoRAConfig
from adapters_lora.layer import LoRALinear

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


def _call(layer, x, a, b):
    """The layer's forward with ``A`` and ``B`` given as plain tensors (so gradcheck can perturb them)."""
    plain = layer.adapters["a"]
    saved = plain._parameters["lora_A"], plain._parameters["lora_B"]
    plain._parameters["lora_A"], plain._parameters["lora_B"] = a, b
    try:
        return layer(x)
    finally:
        plain._parameters["lora_A"], plain._parameters["lora_B"] = saved


@pytest.mark.parametrize("arch", ["qwen3", "bert"])  # a projection without bias, one with
def test_fast_path_matches_reference_math_to_second_order(helpers, arch) -> None:
    model = helpers.build(arch).to(torch.float64)
    model.add_adapter("a", LoRAConfig(r=4, alpha=6, init_weights="bert", init_weights_seed=1))
    model.train_adapter("a")
    model.eval()
    layer = next(m for m in model.modules() if isinstance(m, LoRALinear) and m.adapters["a"].straight)
    plain = layer.adapters["a"]
    scaling = plain.scaling
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, layer.in_features, generator=gen, dtype=torch.float64, requires_grad=True)
    a = plain.lora_A.detach().clone().requires_grad_(True)
    b = plain.lora_B.detach().clone().requires_grad_(True)

    def reference(x, a, b):
        return torch.nn.functional.linear(x, layer.weight, layer.bias) + scaling * (x @ a.t()) @ b.t()

    def fast(x, a, b):
        return _call(layer, x, a, b)

    torch.testing.assert_close(fast(x, a, b), reference(x, a, b))
    grad_out = torch.randn(fast(x, a, b).shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(fast(x, a, b), (x, a, b), grad_out)
    want = torch.autograd.grad(reference(x, a, b), (x, a, b), grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)

    # second order (gradient penalties, meta-learning): the derivatives of the first-order gradients with
    # respect to x, A, B and the output gradient, against the reference math's, for random directions ...
    def second_order(fn, directions):
        g = grad_out.clone().requires_grad_(True)
        first = torch.autograd.grad(fn(x, a, b), (x, a, b), g, create_graph=True)
        total = sum((f * d).sum() for f, d in zip(first, directions))
        return torch.autograd.grad(total, (x, a, b, g), materialize_grads=True)

    for _ in range(3):
        directions = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (x, a, b)]
        for g, w in zip(second_order(fast, directions), second_order(reference, directions)):
            torch.testing.assert_close(g, w)
    # ... and against finite differences (gradgradcheck in fast mode: random projections of the full check,
    # drawn from a fixed seed, so the cost is a few evaluations instead of one per input element)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        assert torch.autograd.gradgradcheck(fast, (x, a, b), fast_mode=True)


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


@pytest.mark.parametrize("alpha, extra_backward", [(4, 0), (8, 2)])
def test_single_lora_adds_the_minimum_of_operations_per_projection(alpha, extra_backward) -> None:
    """The straight-line path stays at its floor: per adapted projection, 2 ops forward (``x Aᵀ`` and
    the fused ``addmm``) and 5 backward (``g B``, ``gᵀ h``, ``g_h A``, ``g_hᵀ x`` and the sum of the
    two input gradients); a scaling other than 1 rides in the ``addmm`` forward and costs autograd
    two rank-sized multiplications backward. A regression here (an extra copy, cast or view node)
    costs a kernel launch per projection in every training step on a GPU."""
    import adapters
    from adapters.testing import count_step_ops, frozen_base_step_ops, tiny_model

    embeds, base_infer, base_train = frozen_base_step_ops("qwen3")
    model = adapters.init(tiny_model("qwen3"))
    model.add_adapter("a", config=LoRAConfig(r=4, alpha=alpha))  # q and v
    model.train_adapter("a")
    projections = 2 * model.config.num_hidden_layers
    assert count_step_ops(model, embeds, True) - base_train == (7 + extra_backward) * projections
    assert count_step_ops(model, embeds, False) - base_infer == 2 * projections
    model.merge_adapter("a")
    assert count_step_ops(model, embeds, False) == base_infer  # merged: exactly the base's operations
    model.reset_adapter()
    model.set_active_adapters(None)
    assert count_step_ops(model, embeds, False) == base_infer  # inactive: exactly the base's operations


@pytest.mark.parametrize("swapped", ["weight", "bias", "lora_A", "lora_B"])
def test_straight_line_follows_a_tensor_put_in_place_of_a_parameter(swapped) -> None:
    """FSDP1 with flat parameters (``use_orig_params=False``) deregisters a module's parameters during
    forward and sets plain tensor views as attributes; the layer must compute with those, not fail or
    silently drop a bias."""
    from torch import nn

    from adapters.plan import Leaf
    from adapters_lora.layer import LoRADelta, LoRALinear

    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 5), "p")
    config = LoRAConfig(r=2, alpha=4)
    layer.adapters["a"] = LoRADelta(config, 6, 5, None, torch.float32, torch.device("cpu"))
    layer.adapters["a"].straight = True  # the straight-line path is the one under test
    with torch.no_grad():
        layer.adapters["a"].lora_B.normal_()
    layer.set_plan(Leaf("a"))
    owner = layer if swapped in ("weight", "bias") else layer.adapters["a"]
    replacement = getattr(owner, swapped).detach() * 3 + 0.5  # a plain tensor, not a Parameter
    delattr(owner, swapped)
    setattr(owner, swapped, replacement)
    assert swapped not in owner._parameters
    delta = layer.adapters["a"]
    x = torch.randn(3, 6)
    expected = x @ layer.weight.t() + layer.bias + config.scaling * (x @ delta.lora_A.t()) @ delta.lora_B.t()
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(layer(x), expected)
