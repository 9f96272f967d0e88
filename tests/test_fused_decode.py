"""LoRA's one-launch inference kernel for few rows (``adapters_lora.fused_decode``, issue #17's decode steps),
under Triton's CPU interpreter, against the plain path's operations: the kernel alone (float32 exactly,
bfloat16 to rounding; row counts around the block sizes, ranks, biases), what it declines (strided inputs
among them), a tiny model's ``generate()`` and logits with the kernel on and off, and the launches it saves,
counted."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from adapters_lora import fused_decode

pytestmark = pytest.mark.usefixtures("fused_forced")  # the interpreter and ADAPTERS_FUSED=force (conftest)


def _tensors(m: int, k: int, n: int, r: int, dtype: torch.dtype, bias: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    return (rand(m, k), rand(n, k, scale=k ** -0.5), rand(n) if bias else None, rand(r, k, scale=k ** -0.5),
            rand(n, r, scale=0.5))


def _plain(x, weight, bias, lora_a, lora_b, scaling):
    """LoRALinear._straight_line's operations without gradients (the plain path)."""
    y = x.mm(weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
    return y.addmm_(x.mm(lora_a.t()), lora_b.t(), alpha=scaling)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m, r, bias", [(1, 8, False), (5, 1, True), (16, 8, True), (33, 20, False), (64, 4, True)])
def test_kernel_matches_plain_path(close, dtype, m, r, bias) -> None:
    """One launch computes what the base GEMM, ``mm`` and ``addmm_`` compute: columns (72) and the
    reduction (200) off the block sizes, one row to the 64-row limit, ranks 1 to 20, with and without bias."""
    x, weight, b, lora_a, lora_b = _tensors(m, 200, 72, r, dtype, bias)
    with torch.no_grad():
        got = fused_decode.lora_decode(x, weight, b, lora_a, lora_b, 1.5)
        want = _plain(x, weight, b, lora_a, lora_b, 1.5)
    assert got is not None, "the kernel was not used"
    close(got, want, dtype)


def test_strided_inputs_declined() -> None:
    """The kernel takes no strides (fewer arguments: a cheaper launch): a transposed weight or an input sliced
    out of a wider tensor gets ``None``, and the plain path computes (a ``LoRALinear`` reshapes its input, so
    in a model only a strided input the reshape cannot flatten reaches here)."""
    x, weight, b, lora_a, lora_b = _tensors(6, 48, 40, 4, torch.float32, True)
    wide = torch.cat([x, torch.randn(6, 16)], dim=1)[:, :48]
    with torch.no_grad():
        assert fused_decode.lora_decode(wide, weight, b, lora_a, lora_b, 0.5) is None
        assert fused_decode.lora_decode(x, weight.t().contiguous().t(), b, lora_a, lora_b, 0.5) is None
        assert fused_decode.lora_decode(x, weight, b, lora_a, lora_b.t().contiguous().t(), 0.5) is None
        assert fused_decode.lora_decode(x, weight, b, lora_a, lora_b, 0.5) is not None


def test_declines_what_it_does_not_cover() -> None:
    """Gradients enabled (training has its own kernels), more than 64 rows, mixed dtypes, the mode off:
    ``None``, and the caller's plain path runs."""
    from adapters.plugin import set_fused_mode

    x, weight, b, lora_a, lora_b = _tensors(65, 32, 24, 4, torch.float32, True)
    with torch.no_grad():
        assert fused_decode.lora_decode(x, weight, b, lora_a, lora_b, 1.0) is None  # 65 rows
        assert fused_decode.lora_decode(x[:8], weight, b, lora_a.double(), lora_b, 1.0) is None
    assert fused_decode.lora_decode(x[:8], weight, b, lora_a, lora_b, 1.0) is None  # gradients enabled
    previous = set_fused_mode("0")
    try:
        with torch.no_grad():
            assert fused_decode.lora_decode(x[:8], weight, b, lora_a, lora_b, 1.0) is None
    finally:
        set_fused_mode(previous)


def _tiny_lm():
    import adapters
    from adapters.testing import tiny_model

    model = adapters.init(tiny_model("qwen3", "causal_lm", num_hidden_layers=2))
    model.add_adapter("a", config="lora[r=4, alpha=8]")
    model.set_active_adapters("a")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def test_generate_and_logits_equal_plain_path() -> None:
    """``generate()`` on a tiny Qwen3 with LoRA on q and v: every decode step through the kernel (rows ≤ 64),
    the same tokens and the same logits (float32) as with the kernel off."""
    from adapters.plugin import set_fused_mode

    model = _tiny_lm()
    ids = torch.randint(4, model.config.vocab_size, (3, 5), generator=torch.Generator().manual_seed(1))
    before = fused_decode.LAUNCHES[0]
    with torch.no_grad():
        logits_on = model(input_ids=ids).logits
        tokens_on = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    launches = fused_decode.LAUNCHES[0] - before
    previous = set_fused_mode("0")
    try:
        with torch.no_grad():
            logits_off = model(input_ids=ids).logits
            tokens_off = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    finally:
        set_fused_mode(previous)
    sites = 2 * model.config.num_hidden_layers
    assert launches == sites * (1 + 4)  # the forward, then the prompt and 3 decode steps of generate()
    torch.testing.assert_close(logits_on, logits_off, rtol=1e-5, atol=1e-5)
    assert torch.equal(tokens_on, tokens_off)


def test_one_launch_replaces_three_operations(launch_counter) -> None:
    """ATen operations of an inference forward (16 rows) with the launches replaced by counters: the LoRA
    model runs one operation fewer per site than the frozen base (the base GEMM moved into the kernel too)
    and launches one kernel per site; with the kernel off it runs two more per site than the base."""
    import adapters
    from adapters.plugin import set_fused_mode
    from adapters.testing import count_step_ops, frozen_base_step_ops, tiny_model

    embeds, base_infer, _ = frozen_base_step_ops("qwen3")
    model = adapters.init(tiny_model("qwen3"))
    model.add_adapter("a", config="lora[r=4, alpha=8]")
    model.set_active_adapters("a")
    sites = 2 * model.config.num_hidden_layers
    previous = set_fused_mode("0")
    try:
        assert count_step_ops(model, embeds, False) - base_infer == 2 * sites
    finally:
        set_fused_mode(previous)
    calls = launch_counter(fused_decode)
    assert count_step_ops(model, embeds, False) - base_infer == -sites
    assert calls[0] == sites


def test_generate_under_torch_compile_uses_the_kernel_op() -> None:
    """A static cache makes transformers compile the decode step; inside that graph the kernel is the custom
    op ``adapters_lora::lora_decode`` (no graph break: ``fullgraph=True``), launched once per site and step,
    with the same tokens as the eager plain path."""
    from transformers.generation import CompileConfig

    from adapters.plugin import set_fused_mode

    model = _tiny_lm()
    ids = torch.randint(4, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(2))
    config = CompileConfig(fullgraph=True, backend="eager")  # dynamo's graph, run by torch (no inductor on CPU)
    config._compile_all_devices = True  # transformers compiles on CUDA only unless told

    def tokens(**kwargs) -> torch.Tensor:
        with torch.no_grad():
            return model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0,
                                  cache_implementation="static", **kwargs)

    torch._dynamo.reset()
    before = fused_decode.LAUNCHES[0]
    compiled = tokens(compile_config=config)
    launches = fused_decode.LAUNCHES[0] - before
    assert model._compiled_call is not None
    previous = set_fused_mode("0")
    try:
        plain = tokens()
    finally:
        set_fused_mode(previous)
        torch._dynamo.reset()
    sites = 2 * model.config.num_hidden_layers
    assert launches == sites * 4  # the prompt (eager, 10 rows) and 3 compiled decode steps (2 rows)
    assert torch.equal(compiled, plain)
