"""The fused training path (issue #23) in layers and models, under Triton's CPU interpreter: DoRA on a
projection, tiny Qwen3 training steps against the plain path (with gradient checkpointing), and the
operations each adapted site adds, counted. The kernels alone: ``test_fused_kernels.py`` (same setup:
``TRITON_INTERPRET=1`` for this module, ``ADAPTERS_FUSED=force``)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from adapters_bottleneck import fused as bn_fused
from adapters_lora import fused, fused_decode, fused_dora

pytestmark = pytest.mark.usefixtures("fused_forced")  # the interpreter and ADAPTERS_FUSED=force (conftest)


# ------------------------------------------------------------------------------------------ DoRA
def _dora_layer(dtype: torch.dtype):
    """A DoRA adapter (r 4, scaling 2) on BERT's query projection (a bias), random weights."""
    import adapters
    from adapters.testing import tiny_model
    from adapters_lora.layer import LoRALinear

    model = adapters.init(tiny_model("bert"))
    model.add_adapter("d", config="dora[r=4, alpha=8]")
    model.train_adapter("d")
    model.eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    layer = next(m for m in model.modules() if isinstance(m, LoRALinear)).to(dtype)
    return layer, layer.adapters["d"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dora_matches_plain_path(close, dtype) -> None:
    """The layer's forward on the fused path (norm kernel, LoRA kernel with DoRA's epilogue, gradient
    kernel) against DoRADelta's: output and the gradients of x, A, B and the magnitude."""
    layer, module = _dora_layer(dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 37, layer.in_features, generator=gen).to(dtype).requires_grad_()
    g = torch.randn(2, 37, layer.out_features, generator=gen).to(dtype)
    wrt = [x, module.lora_A, module.lora_B, module.magnitude]
    before = fused.LAUNCHES[0]
    out = layer(x)
    got = [out, *torch.autograd.grad(out, wrt, g)]
    assert fused.LAUNCHES[0] - before >= 4  # (plus the first-use checks the first time)
    fused.set_fused_mode("0")
    out = layer(x)
    want = [out, *torch.autograd.grad(out, wrt, g)]
    for a, b in zip(got, want):
        close(a.detach(), b.detach(), dtype)


def test_dora_under_compile_and_declines(close) -> None:
    layer, module = _dora_layer(torch.float32)
    x = torch.randn(12, layer.in_features, generator=torch.Generator().manual_seed(2)).requires_grad_()
    wrt = [x, module.lora_A, module.lora_B, module.magnitude]
    want = torch.autograd.grad(layer(x).sin().sum(), wrt)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: layer(t).sin().sum(), backend="aot_eager", fullgraph=True)
    before = fused.LAUNCHES[0]
    got = torch.autograd.grad(compiled(x), wrt)
    assert fused.LAUNCHES[0] - before == 4
    for a, b in zip(got, want):
        close(a, b, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_dora.dora_layer(layer, module, x) is None  # autocast: the plain path casts
    module.dropout = torch.nn.Dropout(0.1)
    assert fused_dora.dora_layer(layer, module.train(), x) is None  # dropout while training
    assert fused_dora.dora_layer(layer, module.eval(), x) is not None


# ------------------------------------------------------------------------------------------ in a model
def _tiny_qwen3(config_lora: str, config_bn: str, **overrides: int):
    import adapters
    from adapters import Stack
    from adapters.testing import tiny_model

    model = adapters.init(tiny_model("qwen3", **overrides))
    model.add_adapter("lora", config=config_lora)
    model.add_adapter("bn", config=config_bn)
    model.train_adapter(Stack("lora", "bn"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


ALL_LORA = "lora[r=4, alpha=8, attn_matrices=['q','k','v','o'], intermediate_lora=True, output_lora=True]"


@pytest.mark.parametrize("lora, bn, per_layer, checkpointing", [
    (ALL_LORA, "seq_bn", 6, False),  # 6 LoRA projections (q, k, v, o, up, down): one kernel per pass each
    ("dora[r=4, alpha=8]", "par_bn", 4, True),  # DoRA on q and v: two kernels per pass each
])
def test_model_training_step_matches_plain(close, lora, bn, per_layer, checkpointing) -> None:
    """LoRA / DoRA and a bottleneck adapter in a tiny Qwen3: the fused step's loss and every adapter
    gradient equal the plain step's (``ADAPTERS_FUSED=0``), without and with gradient checkpointing
    (non-reentrant: the forward runs again in the backward pass)."""
    model = _tiny_qwen3(lora, bn, num_hidden_layers=1)  # one layer: each interpreted launch costs ~0.05 s
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    gen = torch.Generator().manual_seed(3)
    embeds = torch.randn(2, 6, model.config.hidden_size, generator=gen)
    probe = torch.randn(2, 6, model.config.hidden_size, generator=gen)  # the final norm makes ‖out‖² constant
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        x = embeds.clone().requires_grad_()
        loss = (model(inputs_embeds=x).last_hidden_state * probe).sum()
        return (loss, *torch.autograd.grad(loss, [x, *params]))

    assert fused._kernels_ok(embeds) and fused_dora._dora_ok(embeds) and bn_fused._kernels_ok(embeds)
    launches = fused.LAUNCHES[0], bn_fused.LAUNCHES[0]  # after the first-use checks
    got = step()
    layers = model.config.num_hidden_layers
    passes = 3 if checkpointing else 2  # forward, (recomputed forward,) backward
    assert fused.LAUNCHES[0] - launches[0] == per_layer * layers * passes
    assert bn_fused.LAUNCHES[0] - launches[1] == layers * passes
    fused.set_fused_mode("0")
    bn_fused.set_fused_mode("0")
    want = step()
    for a, b in zip(got, want):
        close(a.detach(), b.detach(), torch.float32)


def test_model_launches_saved(launch_counter) -> None:
    """ATen operations per adapted site in a tiny Qwen3, against the frozen base, with the launches
    replaced by counters: LoRA (scaling 2) adds 2 forward and 7 backward on the plain path, 0 + 1 kernel
    forward and 2 + 1 kernel backward fused; seq_bn adds 5 and 9 plain, 0 + 1 kernel and 5 + 1 kernel
    fused (two ``mm``, two ``sum``, the residual stream's gradient ``add``); a DoRA training step adds 28
    plain (19 of them forward), 3 + 4 kernels fused (the zeroed accumulator and two ``mm`` backward). An
    inference forward (16 rows) runs LoRA's decode kernel: one launch and no ATen operation per site."""
    from adapters.testing import count_step_ops, frozen_base_step_ops

    embeds, base_infer, base_train = frozen_base_step_ops("qwen3")
    fused.set_fused_mode("0")
    bn_fused.set_fused_mode("0")
    model = _tiny_qwen3("lora[r=4, alpha=8]", "seq_bn")  # LoRA on q and v
    layers = model.config.num_hidden_layers
    sites_lora, sites_bn = 2 * layers, layers
    plain = count_step_ops(model, embeds, False) - base_infer, count_step_ops(model, embeds, True) - base_train
    assert plain == ((2 * sites_lora + 5 * sites_bn), (2 + 7) * sites_lora + (5 + 9) * sites_bn)
    fused.set_fused_mode("force")
    bn_fused.set_fused_mode("force")
    lora_calls, bn_calls = launch_counter(fused), launch_counter(bn_fused)
    decode_calls = launch_counter(fused_decode)
    for p in model.parameters():
        p.grad = None  # the plain step's gradients would be accumulated into (one add_ per parameter)
    forward = count_step_ops(model, embeds, False) - base_infer  # no gradients: LoRA's decode kernel (16 rows)
    assert forward == -sites_lora + 5 * sites_bn and decode_calls[0] == sites_lora  # its base GEMM moved in too
    assert lora_calls[0] == bn_calls[0] == 0
    training = count_step_ops(model, embeds, True) - base_train
    assert lora_calls[0] == 2 * sites_lora and bn_calls[0] == 2 * sites_bn
    assert training == 2 * sites_lora + 5 * sites_bn  # ATen operations; plus one kernel per site and pass
    model.delete_adapter("lora")
    model.add_adapter("dora", config="dora[r=4, alpha=8]")
    model.train_adapter("dora")
    fused.set_fused_mode("0")
    count_step_ops(model, embeds, False)  # DoRA's cached ‖W‖² (two operations on a step that computes it)
    assert count_step_ops(model, embeds, True) - base_train == 28 * sites_lora
    fused.set_fused_mode("force")
    for p in model.parameters():
        p.grad = None
    dora_calls = launch_counter(fused_dora)
    lora_calls[0] = 0
    # DoRA fused: x Wᵀ replaces the base's own GEMM; backward adds the zeroed accumulator and two mm
    assert count_step_ops(model, embeds, True) - base_train == 3 * sites_lora
    assert lora_calls[0] == dora_calls[0] == 2 * sites_lora  # + 4 kernels per site


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("lora, bn", [("lora[r=4, alpha=8]", "seq_bn"), ("dora[r=4, alpha=8]", "par_bn")])
def test_first_use_inside_a_compiled_graph(close, monkeypatch, backend, lora, bn) -> None:
    """The kernels' first use in a process can be inside a compiled graph (mode ``compiled``, the default,
    selects them nowhere else), where each is a custom op whose implementation runs below autograd's
    dispatch: the first-use checks pass there (no warning, no fallback), the compiled training step runs the
    kernels and equals the plain step, and so does a compiled inference call (LoRA's decode kernel)."""
    import warnings

    from adapters import fused_switch
    from adapters.plugin import FusedPathWarning

    monkeypatch.setattr(fused_switch, "_CHECKS", {})  # nothing checked yet in this "process"
    model = _tiny_qwen3(lora, bn, num_hidden_layers=1)
    gen = torch.Generator().manual_seed(5)
    embeds = torch.randn(2, 6, model.config.hidden_size, generator=gen)
    probe = torch.randn(2, 6, model.config.hidden_size, generator=gen)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(run):
        x = embeds.clone().requires_grad_()
        loss = (run(inputs_embeds=x).last_hidden_state * probe).sum()
        return (loss, *torch.autograd.grad(loss, [x, *params]))

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    launches = fused.LAUNCHES[0], bn_fused.LAUNCHES[0], fused_decode.LAUNCHES[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FusedPathWarning)
        got = step(compiled)
        with torch.no_grad():
            got_infer = compiled(inputs_embeds=embeds).last_hidden_state
    assert all(fused_switch._CHECKS.values()) and len(fused_switch._CHECKS) >= 2, fused_switch._CHECKS
    assert fused.LAUNCHES[0] > launches[0] and bn_fused.LAUNCHES[0] > launches[1]
    assert fused_decode.LAUNCHES[0] > launches[2] or lora.startswith("dora")  # DoRA has no decode kernel
    fused.set_fused_mode("0")
    want = step(model)
    with torch.no_grad():
        want_infer = model(inputs_embeds=embeds).last_hidden_state
    for a, b in zip(got, want):
        close(a.detach(), b.detach(), torch.float32)
    close(got_infer, want_infer, torch.float32)
    torch._dynamo.reset()
