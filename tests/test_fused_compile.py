"""The fused Triton kernels compile for real GPUs, not only in Triton's CPU interpreter.

The interpreter runs a kernel's Python: it does not check what the compiler refuses (a Triton 3.6 H200 run
found the bottleneck kernels reading plain-float globals, which compiled kernels may not). Here every kernel
launch that the fused LoRA, DoRA and bottleneck paths make in a training step, and LoRA's decode kernel in an
inference forward (float32 and bfloat16, every bottleneck input form and activation), is recorded under the
interpreter; then the same kernel with the same argument types and compile-time constants is compiled ahead
of time to PTX for Hopper (sm_90) and Ampere (sm_80) with the installed Triton: no GPU is needed for that,
only Triton's bundled ``ptxas``.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

triton = pytest.importorskip("triton")  # the tests session installs Triton: this runs in CI

from adapters_bottleneck import fused as bn_fused  # noqa: E402
from adapters_lora import fused  # noqa: E402

pytestmark = pytest.mark.usefixtures("fused_forced")  # the interpreter and ADAPTERS_FUSED=force (conftest)

_POINTER = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int32: "*i32",
            torch.int64: "*i64"}
#: bottleneck activation codes (``ACT``): identity, relu, silu, gelu, gelu (tanh)
_ACTIVATIONS = {"relu": 1, "silu": 2, "gelu": 3, "gelu_new": 4}


class _Recorder:
    """Stands in for an interpreted kernel: records each launch's argument types and constants, then runs it."""

    def __init__(self, kernel: Any, seen: set[tuple]) -> None:
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        def launch(*args: Any, **constants: Any) -> Any:
            kinds = tuple(_arg_type(a) for a in args)
            self.seen.add((self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else self.kernel.__name__, kinds,
                           tuple(sorted(constants.items()))))
            return self.kernel[grid](*args, **constants)

        return launch


def _arg_type(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return _POINTER[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument {value!r}")


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Iterator[set[tuple]]:
    """Every (kernel, argument types, constants) the fused paths launch while the test body runs."""
    seen: set[tuple] = set()
    for module in (fused._kernels(), bn_fused._kernels()):
        for name in list(vars(module)):
            kernel = getattr(module, name)
            if type(kernel).__name__ == "InterpretedFunction" and name in module.__all__:
                monkeypatch.setattr(module, name, _Recorder(kernel, seen))
    yield seen


def _tiny(lora: str, bottleneck: str, dtype: torch.dtype) -> torch.nn.Module:
    import adapters
    from adapters import Stack
    from adapters.testing import tiny_model

    model = adapters.init(tiny_model("qwen3", num_hidden_layers=1))
    model.add_adapter("lora", config=lora)
    model.add_adapter("bn", config=bottleneck)
    model.train_adapter(Stack("lora", "bn"))
    return model.to(dtype)


def _training_step_and_inference(model: torch.nn.Module, dtype: torch.dtype) -> None:
    embeds = torch.randn(2, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(dtype)
    model(inputs_embeds=embeds.clone().requires_grad_()).last_hidden_state.float().square().mean().backward()
    with torch.no_grad():  # inference at few rows: LoRA's decode kernel
        model(inputs_embeds=embeds)


def _jit_copy(path: str, name: str) -> Any:
    """The kernels module at ``path`` imported afresh with the interpreter off: compilable ``JITFunction``s."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        os.environ["TRITON_INTERPRET"] = previous if previous is not None else "1"
    return module


#: launch keywords that are compile options, not kernel constants
_OPTIONS = ("num_warps", "num_stages")


def _compile(kernel: Any, kinds: tuple[str, ...], constants: dict[str, Any], arch: int) -> None:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options = {name: constants.pop(name) for name in _OPTIONS if name in constants}
    params = list(inspect.signature(kernel.fn).parameters)
    signature = dict(zip(params, kinds))
    signature.update({name: "constexpr" for name in constants})
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(params.index(name),): value for name, value in constants.items()})
    triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


@pytest.mark.parametrize("arch", [90, 80])
def test_every_launched_kernel_compiles_for_gpus(recorded, arch) -> None:
    """Every kernel launch a LoRA, DoRA, seq_bn and par_bn training step (and a LoRA inference forward)
    makes, in float32 and bfloat16 and with each bottleneck activation, compiles to PTX (the GPU's own
    settings: no interpreter upcast)."""
    setups = [("lora[r=4, alpha=8, attn_matrices=['q','k','v','o'], intermediate_lora=True, output_lora=True]",
               "seq_bn[reduction_factor=8]"),
              ("dora[r=4, alpha=8]", "par_bn[reduction_factor=8]"),
              ("lora[r=4, alpha=8]", "seq_bn[reduction_factor=8, non_linearity=identity]")]
    setups += [("lora[r=4, alpha=8]", f"seq_bn[reduction_factor=8, non_linearity={act}]") for act in _ACTIVATIONS]
    for dtype in (torch.float32, torch.bfloat16):
        for lora, bottleneck in setups:
            _training_step_and_inference(_tiny(lora, bottleneck, dtype), dtype)
    names = {name for name, _, _ in recorded}
    assert names == {"low_rank_add", "dora_norm", "dora_grad", "lora_decode", "bottleneck_fwd", "bottleneck_bwd"}, names
    acts = {dict(c)["ACT"] for name, _, c in recorded if name.startswith("bottleneck")}
    assert acts >= set(_ACTIVATIONS.values()), acts
    modules = {"lora": _jit_copy(inspect.getfile(fused._kernels()), "_compile_check_lora_kernels"),
               "bottleneck": _jit_copy(inspect.getfile(bn_fused._kernels()), "_compile_check_bn_kernels")}
    for name, kinds, constants in sorted(recorded):
        module = modules["bottleneck" if name.startswith("bottleneck") else "lora"]
        kernel = getattr(module, name)
        assert type(kernel).__name__ == "JITFunction"
        _compile(kernel, kinds, {**dict(constants), "UPCAST": False} if "UPCAST" in dict(constants)
                 else dict(constants), arch)
