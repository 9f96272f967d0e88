"""The fused training kernels (issue #23) under Triton's CPU interpreter, against the plain torch path.

``TRITON_INTERPRET=1`` is set while this module's tests run (Triton reads it when a kernel is defined,
and the kernels are imported on first use only, inside these tests; other modules run without it), and
``ADAPTERS_FUSED=force`` (:func:`set_fused_mode`) selects the fused path for CPU
tensors. Every test compares the forward output and every gradient with the plain path's operations;
the op-count tests replace the Triton launch by a counter and count the ATen operations around it.
Shapes are tiny (the interpreter runs a kernel's programs in Python). DoRA, whole models and checkpointing:
``test_fused_models.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from adapters import fused_switch
from adapters.testing import count_kernel_ops
from adapters_bottleneck import fused as bn_fused
from adapters_bottleneck.config import BnConfig, DoubleSeqBnConfig, ParBnConfig, SeqBnConfig
from adapters_bottleneck.units import Bottleneck
from adapters_lora import fused

pytestmark = pytest.mark.usefixtures("fused_forced")  # the interpreter and ADAPTERS_FUSED=force (conftest)


# ------------------------------------------------------------------------------------------ LoRA
def _lora_tensors(m: int, k: int, n: int, r: int, dtype: torch.dtype, bias: bool = True, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    x = rand(m, k).requires_grad_()
    weight = rand(n, k, scale=k ** -0.5)
    b = rand(n) if bias else None
    lora_a = rand(r, k, scale=k ** -0.5).requires_grad_()
    lora_b = rand(n, r, scale=0.5).requires_grad_()
    return x, weight, b, lora_a, lora_b, rand(m, n)


def _plain_lora(x, weight, bias, lora_a, lora_b, scaling):
    """LoRALinear._straight_line's operations (the plain path)."""
    y = x.mm(weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
    return torch.addmm(y, x.mm(lora_a.t()), lora_b.t(), alpha=scaling)


def _grads(fn, x, weight, bias, lora_a, lora_b, g, scaling):
    for t in (x, lora_a, lora_b):
        t.grad = None
    y = fn(x, weight, bias, lora_a, lora_b, scaling)
    assert y is not None, "the fused path was not taken"
    y.backward(g)
    return [y.detach()] + [t.grad for t in (x, lora_a, lora_b)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(24, 40, 72, 4), (130, 64, 100, 8), (5, 33, 150, 20)])
def test_lora_matches_plain_path(close, dtype, shape) -> None:
    """Forward and the gradients of x, A, B; ragged sizes, ranks that are not powers of two, row blocks
    shorter than a block and column splits (four programs per launch on CPU)."""
    x, weight, bias, lora_a, lora_b, g = _lora_tensors(*shape, dtype)
    got = _grads(fused.lora_linear, x, weight, bias, lora_a, lora_b, g, 2.0)
    want = _grads(_plain_lora, x, weight, bias, lora_a, lora_b, g, 2.0)
    for a, b in zip(got, want):
        close(a, b, dtype)
    assert got[1].abs().max() > 0 and got[2].abs().max() > 0


def test_lora_strided_inputs_no_bias_and_frozen_input(close) -> None:
    """Transposed views for x, A, B and the incoming gradient (strides are passed, nothing copied), no
    bias; then an input that needs no gradient (the kernel only computes s·g B)."""
    x, weight, _, lora_a, lora_b, g = _lora_tensors(40, 48, 36, 6, torch.float32, bias=False)
    xt = x.detach().t().contiguous().t().requires_grad_()  # same values, column-major
    at = lora_a.detach().t().contiguous().t().requires_grad_()
    bt = lora_b.detach().t().contiguous().t().requires_grad_()
    gt = g.t().contiguous().t()
    assert not xt.is_contiguous() and not gt.is_contiguous()
    got = _grads(fused.lora_linear, xt, weight, None, at, bt, gt, 0.5)
    want = _grads(_plain_lora, x, weight, None, lora_a, lora_b, g, 0.5)
    for a, b in zip(got, want):
        close(a, b, torch.float32)
    frozen_x = x.detach()
    for t in (lora_a, lora_b):
        t.grad = None
    fused.lora_linear(frozen_x, weight, None, lora_a, lora_b, 0.5).backward(g)
    got_ab = lora_a.grad, lora_b.grad
    for t in (lora_a, lora_b):
        t.grad = None
    _plain_lora(frozen_x, weight, None, lora_a, lora_b, 0.5).backward(g)
    close(got_ab[0], lora_a.grad, torch.float32)
    close(got_ab[1], lora_b.grad, torch.float32)


def test_lora_declines_what_it_does_not_cover() -> None:
    x, weight, bias, lora_a, lora_b, _ = _lora_tensors(8, 16, 16, 4, torch.float32)
    assert fused.lora_linear(x, weight.requires_grad_(), bias, lora_a, lora_b, 1.0) is None  # trainable base
    weight.requires_grad_(False)
    assert fused.lora_linear(x, weight, bias, lora_a.detach(), lora_b.detach(), 1.0) is None  # frozen adapter
    assert fused.lora_linear(x, weight.double(), bias, lora_a, lora_b, 1.0) is None  # mixed dtypes
    big_a = torch.zeros(129, 16, requires_grad=True)
    assert fused.lora_linear(x, weight, bias, big_a, torch.zeros(16, 129), 1.0) is None  # rank above 128
    with torch.no_grad():
        assert fused.lora_linear(x, weight, bias, lora_a, lora_b, 1.0) is None  # inference: the plain path
    fused.set_fused_mode("0")
    assert fused.lora_linear(x, weight, bias, lora_a, lora_b, 1.0) is None
    fused.set_fused_mode("auto")  # auto: CUDA tensors only
    assert fused.lora_linear(x, weight, bias, lora_a, lora_b, 1.0) is None
    with pytest.raises(ValueError,
                       match=r"Unknown fused-kernel mode .sometimes.; use compiled \(the default: inside torch"):
        fused.set_fused_mode("sometimes")
    assert fused.fused_mode() == "auto"  # unchanged


def test_lora_under_compile_and_checkpointing(close) -> None:
    """``torch.compile(fullgraph=True)`` records the custom op (a graph break would raise) and gives
    the eager gradients; non-reentrant checkpointing recomputes the fused forward."""
    x, weight, bias, lora_a, lora_b, g = _lora_tensors(24, 32, 40, 4, torch.float32)

    def loss(x, lora_a, lora_b):
        y = fused.lora_linear(x, weight, bias, lora_a, lora_b, 2.0)
        return (y * g).sin().sum()

    def plain_loss(x, lora_a, lora_b):
        return (_plain_lora(x, weight, bias, lora_a, lora_b, 2.0) * g).sin().sum()

    want = torch.autograd.grad(plain_loss(x, lora_a, lora_b), (x, lora_a, lora_b))
    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    before = fused.LAUNCHES[0]
    got = torch.autograd.grad(compiled(x, lora_a, lora_b), (x, lora_a, lora_b))
    assert fused.LAUNCHES[0] - before == 2  # the kernel ran forward and backward inside the graph
    for a, b in zip(got, want):
        close(a, b, torch.float32)
    from torch.utils.checkpoint import checkpoint

    before = fused.LAUNCHES[0]
    got = torch.autograd.grad(checkpoint(loss, x, lora_a, lora_b, use_reentrant=False), (x, lora_a, lora_b))
    assert fused.LAUNCHES[0] - before == 3  # forward, recomputed forward, backward
    for a, b in zip(got, want):
        close(a, b, torch.float32)


def test_lora_launches_saved(launch_counter) -> None:
    """Per site the plain path runs 3 operations forward and 8 backward (5 ``mm``, 2 ``mul`` for the
    scaling, 1 ``add`` joining the input gradients); the fused path 2 forward (``addmm`` + the kernel)
    and 4 backward (3 ``mm`` + the kernel)."""
    x, weight, bias, lora_a, lora_b, g = _lora_tensors(16, 16, 16, 4, torch.float32)

    def fwd(fn):
        return lambda: fn(x, weight, bias, lora_a, lora_b, 2.0)

    def step(fn):
        def run():
            for t in (x, lora_a, lora_b):
                t.grad = None
            fn(x, weight, bias, lora_a, lora_b, 2.0).backward(g)
        return run

    plain_fwd, plain_step = count_kernel_ops(fwd(_plain_lora)), count_kernel_ops(step(_plain_lora))
    calls = launch_counter(fused)
    fused_fwd = count_kernel_ops(fwd(fused.lora_linear))
    assert calls[0] == 1
    fused_step = count_kernel_ops(step(fused.lora_linear))
    assert calls[0] == 3
    assert sum(plain_fwd.values()) == 3 and sum(plain_step.values()) == 3 + 8
    assert fused_fwd == {"aten.addmm": 1}  # + 1 kernel
    assert fused_step == {"aten.addmm": 1, "aten.mm": 3}  # + 2 kernels
    assert plain_step["aten.mul"] == 2 and plain_step["aten.add"] == 1


def test_lora_failed_check_warns_and_falls_back(close, monkeypatch) -> None:
    """A kernel that fails its first-use check is not used: a warning, the plain path eagerly, and the
    custom op's implementation computes with torch ops (what a compiled graph calls)."""
    x, weight, bias, lora_a, lora_b, g = _lora_tensors(12, 16, 20, 4, torch.float32)
    monkeypatch.setattr(fused_switch, "_CHECKS", {})  # the first-use check runs again

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel here")

    monkeypatch.setattr(fused, "launch_low_rank", broken)
    with pytest.warns(fused.FusedPathWarning, match="no kernel here"):
        assert fused.lora_linear(x, weight, bias, lora_a, lora_b, 2.0) is None
    y, hs = fused.forward_impl(x.detach(), weight, bias, lora_a.detach(), lora_b.detach(), 2.0)
    close(y, _plain_lora(x, weight, bias, lora_a, lora_b, 2.0).detach(), torch.float32)
    close(hs, 2.0 * x.detach() @ lora_a.detach().t(), torch.float32)
    gx, ga, gb = fused.backward_impl(g, x.detach(), weight, lora_a.detach(), lora_b.detach(), hs, 2.0,
                                     True, True, True)
    want = _grads(_plain_lora, x, weight, bias, lora_a, lora_b, g, 2.0)[1:]
    for a, b in zip((gx, ga, gb), want):
        close(a, b, torch.float32)


def test_import_adapters_does_not_import_triton() -> None:
    """``import adapters`` and the LoRA / bottleneck layers import no Triton; ``ADAPTERS_FUSED=0`` is read."""
    code = ("import sys, adapters, adapters_lora.layer, adapters_lora.fused as f, adapters_bottleneck.layer; "
            "assert 'triton' not in sys.modules, 'triton imported'; print(f.fused_mode())")
    env = {**os.environ, "ADAPTERS_FUSED": "0"}
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"


def test_unknown_environment_value_warns_and_leaves_everything_working() -> None:
    """``ADAPTERS_FUSED=maybe``: ``import adapters`` and every plugin load, a warning lists the accepted values,
    the kernels stay off, and an adapter model trains as usual."""
    code = ("import warnings; warnings.simplefilter('always')\n"
            "import adapters, torch\nfrom adapters.testing import tiny_model\n"
            "from adapters.plugin import fused_mode\n"
            "m = adapters.init(tiny_model('qwen3'))\n"
            "m.add_adapter('a', config='lora'); m.add_adapter('b', config='seq_bn'); m.add_adapter('c', 'loreft')\n"
            "m.train_adapter(adapters.Stack('a', 'b', 'c'))\n"
            "m(inputs_embeds=torch.randn(1, 3, m.config.hidden_size)).last_hidden_state.sum().backward()\n"
            "print(fused_mode())")
    env = {**os.environ, "ADAPTERS_FUSED": "maybe"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "0"
    assert ("ADAPTERS_FUSED='maybe' is not a fused-kernel mode (compiled (the default: inside torch.compile"
            in out.stderr)
    assert "the fused kernels stay off" in out.stderr


def test_compiled_mode_selects_only_kernels_that_pay_inside_compiled_graphs(monkeypatch) -> None:
    """``compiled`` by default (``ADAPTERS_FUSED`` unset): a kernel is selected only inside a
    ``torch.compile`` graph, only for CUDA tensors, and only where its package marks it as faster there
    (bottleneck training and LoRA decode: yes; LoRA and DoRA training: no); ``auto`` selects every kernel,
    eager too. The selection is traced by dynamo without a graph break in every mode."""
    import types

    from adapters import fused_switch
    from adapters.plugin import fused_selected, set_fused_mode
    from adapters_lora import fused_decode, fused_dora

    code = "import adapters_lora.fused as f; print(f.fused_mode())"
    env = {k: v for k, v in os.environ.items() if k != "ADAPTERS_FUSED"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "compiled"

    # Triton's presence is resolved at import: the traced selection reads a bool (an import-machinery lookup
    # inside it broke the compiled decode graph with torch 2.11 on an H200; torch 2.13 traces either)
    assert isinstance(fused_switch._HAS_TRITON, bool)
    for mode in ("0", "compiled", "auto", "force"):
        previous = set_fused_mode(mode)
        try:
            traced = torch.compile(lambda t: t + 1 if fused_selected(t, compiled_default=True) else t - 1,
                                   fullgraph=True, backend="eager")
            want = 1.0 if mode == "force" else -1.0  # CPU tensors: only force selects them
            assert float(traced(torch.zeros(1))) == want, mode
        finally:
            set_fused_mode(previous)
            torch._dynamo.reset()

    monkeypatch.setattr(fused_switch, "_HAS_TRITON", True)
    cuda, cpu = types.SimpleNamespace(is_cuda=True), types.SimpleNamespace(is_cuda=False)
    previous = set_fused_mode("compiled")
    try:
        for compiling in (False, True):
            monkeypatch.setattr(torch.compiler, "is_compiling", lambda c=compiling: c)
            assert fused_selected(cuda, compiled_default=True) is compiling
            assert not fused_selected(cuda, compiled_default=False)
            assert not fused_selected(cpu, compiled_default=True)
            assert bn_fused.selected(cuda) is compiling
            assert not fused.selected(cuda)
        assert not (fused.COMPILED_DEFAULT or fused_dora.COMPILED_DEFAULT) and fused_decode.COMPILED_DEFAULT
        set_fused_mode("auto")
        for compiling in (False, True):
            monkeypatch.setattr(torch.compiler, "is_compiling", lambda c=compiling: c)
            assert fused_selected(cuda) and bn_fused.selected(cuda) and fused.selected(cuda)
            assert not fused_selected(cpu)
    finally:
        set_fused_mode(previous)


# ------------------------------------------------------------------------------------------ bottleneck
def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _bottleneck(config: BnConfig, hidden: int, dtype: torch.dtype, seed: int = 0) -> Bottleneck:
    module = Bottleneck(config, hidden, max(1, int(hidden // config.reduction_factor)), dtype, None)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen).to(dtype) * 0.3)
    return module


def _bn_grads(run, module, h, x, g):
    for t in (h, x, *module.parameters()):
        t.grad = None
    out = run()
    assert out is not None, "the fused path was not taken"
    out.backward(g)
    return [out.detach(), h.grad, x.grad] + [p.grad for p in module.parameters()]


BN_CASES = [  # (config, dtype): each input form, every activation the kernel has, a scale other than 1
    (SeqBnConfig(), torch.float32),  # sum: h + up(relu(down(h + x)))
    (ParBnConfig(reduction_factor=4), torch.float32),  # parallel, scale 4
    (DoubleSeqBnConfig(), torch.float32),  # self, swish (only the output adapter runs here)
    (SeqBnConfig(non_linearity="gelu"), torch.bfloat16),
    (SeqBnConfig(non_linearity="gelu_new", scaling=0.5), torch.float32),
    (SeqBnConfig(non_linearity="identity", reduction_factor=2), torch.float32),
]


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # numpy in the interpreter
@pytest.mark.parametrize("config, dtype", BN_CASES, ids=lambda v: getattr(v, "non_linearity", str(v)))
def test_bottleneck_matches_plain_path(close, config, dtype) -> None:
    """Forward and the gradients of h, x and the four weights against :class:`Bottleneck`'s own forward."""
    module = _bottleneck(config, 80, dtype)
    gen = torch.Generator().manual_seed(1)
    h, x, g = (torch.randn(2, 37, 80, generator=gen).to(dtype) for _ in range(3))
    h.requires_grad_()
    x.requires_grad_()
    got = _bn_grads(lambda: bn_fused.bottleneck(module, h, x, True), module, h, x, g)
    want = _bn_grads(lambda: module(h, x, _identity), module, h, x, g)
    for a, b in zip(got, want):
        if b is None:  # "self": x is not an input
            assert a is None
            continue
        close(a, b, dtype)


def test_bottleneck_declines_what_it_does_not_cover() -> None:
    h = torch.randn(2, 4, 32, requires_grad=True)
    x = torch.randn(2, 4, 32)
    assert bn_fused.bottleneck(_bottleneck(SeqBnConfig(), 32, torch.float32), h, x, False) is None  # a real norm
    for config in (SeqBnConfig(ln_before=True), SeqBnConfig(use_gating=True), SeqBnConfig(scaling="learned"),
                   SeqBnConfig(non_linearity="tanh"), SeqBnConfig(residual_before_ln="post_add"),
                   SeqBnConfig(phm_layer=True, reduction_factor=4), SeqBnConfig(reduction_factor=0.2)):  # 160 > 128
        assert bn_fused.bottleneck(_bottleneck(config, 32, torch.float32), h, x, True) is None, config
    dropout = _bottleneck(SeqBnConfig(dropout=0.1), 32, torch.float32)
    assert bn_fused.bottleneck(dropout, h, x, True) is None  # training: dropout runs
    assert bn_fused.bottleneck(dropout.eval(), h, x, True) is not None  # eval: no dropout to run
    assert bn_fused.bottleneck(_bottleneck(SeqBnConfig(), 32, torch.float32), h, None, True) is None  # no residual
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the plain path's projections cast
        assert bn_fused.bottleneck(_bottleneck(SeqBnConfig(), 32, torch.float32), h, x, True) is None
    bn_fused.set_fused_mode("auto")  # CPU tensors
    assert bn_fused.bottleneck(_bottleneck(SeqBnConfig(), 32, torch.float32), h, x, True) is None


def test_bottleneck_under_compile(close) -> None:
    module = _bottleneck(SeqBnConfig(), 48, torch.float32)
    gen = torch.Generator().manual_seed(2)
    h, x, g = (torch.randn(20, 48, generator=gen) for _ in range(3))
    h.requires_grad_()
    x.requires_grad_()
    params = list(module.parameters())

    def loss(h, x):
        return (bn_fused.bottleneck(module, h, x, True) * g).sin().sum()

    def plain_loss(h, x):
        return (module(h, x, _identity) * g).sin().sum()

    want = torch.autograd.grad(plain_loss(h, x), (h, x, *params))
    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    before = bn_fused.LAUNCHES[0]
    got = torch.autograd.grad(compiled(h, x), (h, x, *params))
    assert bn_fused.LAUNCHES[0] - before == 2
    for a, b in zip(got, want):
        close(a, b, torch.float32)
