"""torch.compile(fullgraph=True) and gradient checkpointing with an active LoRA adapter."""

from __future__ import annotations

import torch

from adapters_lora import LoRAConfig


def test_compile_fullgraph_matches_eager(helpers) -> None:
    model = helpers.build("qwen3")
    model.add_adapter("a", LoRAConfig(r=4, attn_matrices=["q", "k", "v", "o"], output_lora=True), set_active=True)
    helpers.randomize_adapter(model, "a")
    inputs = helpers.tiny_inputs(model)
    eager = helpers.forward(model, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out = compiled(**inputs).last_hidden_state
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing(helpers) -> None:
    grads = []
    for checkpointing in (False, True):
        model = helpers.build("qwen3", "causal_lm")
        model.add_adapter("a", LoRAConfig(r=4, init_weights="bert", init_weights_seed=3))
        model.train_adapter("a")
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.model.gradient_checkpointing
        inputs = helpers.tiny_inputs(model)
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert all(g.abs().sum() > 0 for g in grads[1].values())
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5)


def test_multitask_with_gradient_checkpointing_matches_plain_gradients() -> None:
    """Checkpointed layers are recomputed in the backward pass without a forward context; MultiTask
    routing must still send each row to its task's adapter there."""
    import adapters
    import adapters.composition as ac
    from adapters.testing import tiny_inputs, tiny_model

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = tiny_model("qwen3", "causal_lm")
        adapters.init(model)
        model.add_adapter("a", "lora[init_weights='bert']")
        model.add_adapter("b", "lora[init_weights='bert']")
        model.train_adapter(ac.MultiTask("a", "b"))
        model.lm_head.weight.requires_grad_(False)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        inputs = tiny_inputs(model, batch=4, seq=6)
        out = model(**inputs, labels=inputs["input_ids"], task_ids=[1, 0, 1, 0])
        out.loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) == 16
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_a_bias_free_projection_keeps_bias_registered_as_none():
    """Dynamo (inductor on CUDA) recursed without end reading a bias kept outside ``_parameters`` through the
    layer's ``bias`` property; a bias-free projection registers ``None`` as nn.Linear does."""
    import adapters
    from adapters.testing import tiny_model

    model = adapters.init(tiny_model("qwen3"))
    model.add_adapter("a", "lora")
    layer = model.layers[0].self_attn.q_proj
    assert "bias" in layer._parameters and layer._parameters["bias"] is None and layer.bias is None
    assert layer.weight is layer._parameters["weight"]
