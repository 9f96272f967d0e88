"""The optional fused training path of bottleneck adapters (issue #23): one kernel forward, five launches back.

The plain path of a sequential adapter on a pre-norm model (``seq_bn``: ``out = h + up(relu(down(h + x)))``)
runs 5 operations forward and 9 backward per location. Here (:mod:`.fused_kernels`):

* forward, 1 launch: the input sum, ``down``, its bias, the activation, ``up``, its bias, the scale and the
  residual add (``pre``, ``s·z`` and the input sum are kept for backward);
* backward, 5 launches (6 with a scale other than 1): the kernel (``dpre`` and the input gradients, ``h``'s
  with the residual's ``g`` added), ``∂Wu = gᵀ(s·z)``, ``∂bu = s·Σg``, ``∂Wd = dpreᵀ inp``, ``∂bd = Σ dpre``;
  autograd adds the residual stream's two gradients (one operation, on either path).

Covered: plain ``nn.Linear`` projections with a bottleneck of at most 128 features, activation relu, silu /
swish, gelu, gelu_tanh / gelu_new or identity, a fixed scale, no own LayerNorm, gate, or (while training)
dropout or stochastic depth, no autocast, one dtype (float16, bfloat16, float32), and an input / residual of the forms
``parallel`` (``inp = x``, residual ``h``: ``par_bn``), ``sum`` (``inp = h + x`` through an identity norm,
residual ``h``: ``seq_bn`` on pre-norm models) or ``self`` (``inp = h``: ``double_seq_bn``).
Everything else returns ``None`` and the plain path runs.

Selection as in :mod:`adapters_lora.fused` (the same ``ADAPTERS_FUSED`` variable and one mode for every
package's kernels: :func:`set_fused_mode` here sets LoRA's too), first-use check with a
:class:`FusedPathWarning` and torch ops after a failure, an ``autograd.Function`` eagerly and the custom ops
``adapters_bottleneck::bottleneck_fwd`` / ``_bwd`` under ``torch.compile``. Triton is imported on first use
only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from adapters.plugin import FusedPathWarning, device_programs, fused_mode, fused_selected, kernels_pass, set_fused_mode

__all__ = ["FusedPathWarning", "fused_mode", "set_fused_mode", "bottleneck", "forward_impl", "backward_impl",
           "LAUNCHES"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_BOTTLENECK = 128
_PLAIN = (torch.Tensor, nn.Parameter)
LAUNCHES = [0]  # Triton kernel launches since import (tests, benchmarks)
_KERNELS: Any = None
_INTERPRETED = False


#: whether mode ``"compiled"`` uses the bottleneck kernels inside ``torch.compile`` graphs: yes,
#: they measured faster there than inductor's code for the plain path (README, "Fused training kernels")
COMPILED_DEFAULT = True


def selected(t: torch.Tensor) -> bool:
    """Whether the mode selects the fused path for tensors like ``t`` (device, Triton, compiled or eager)."""
    return fused_selected(t, compiled_default=COMPILED_DEFAULT)


# ------------------------------------------------------------------------------------------ launchers
def _kernels() -> Any:
    global _KERNELS, _INTERPRETED
    if _KERNELS is None:
        from . import fused_kernels

        _INTERPRETED = type(fused_kernels.bottleneck_fwd).__name__ == "InterpretedFunction"
        _KERNELS = fused_kernels
    return _KERNELS


def _grid(m: int, h: int, device: torch.device) -> tuple[int, int, int]:
    """``(row blocks, column splits, column blocks per program)`` for ``m`` rows of ``h`` features."""
    grid_m, blocks = -(-m // 64), -(-h // 64)
    want = device_programs(device)
    split = min(blocks, max(1, -(-want // grid_m)))
    per_prog = -(-blocks // split)
    return grid_m, -(-blocks // per_prog), per_prog


def _meta(t: torch.Tensor, d: int, act: int) -> dict[str, Any]:
    return dict(BM=64, BK=64, BN=64, BD=max(16, 1 << max(0, d - 1).bit_length()), ACT=act, UPCAST=_INTERPRETED,
                IEEE=t.dtype == torch.float32)


def launch_fwd(in1: torch.Tensor, in2: torch.Tensor | None, res: torch.Tensor, wd: torch.Tensor, bd: torch.Tensor,
               wu: torch.Tensor, bu: torch.Tensor, scale: float, act: int, out: torch.Tensor, pre: torch.Tensor,
               zs: torch.Tensor, insum: torch.Tensor | None) -> None:
    """:func:`.fused_kernels.bottleneck_fwd`: ``in1``, ``in2``, ``res`` M × H (any strides), ``wd`` D × H,
    ``wu`` H × D; writes ``out`` (M × H, any strides), ``pre`` / ``zs`` (M × D) and ``insum`` (M × H)."""
    m, h = in1.shape
    d = wd.shape[0]
    kernels = _kernels()
    grid_m, split, per_prog = _grid(m, h, in1.device)
    b = in2 if in2 is not None else in1
    kernels.bottleneck_fwd[(grid_m, split)](
        in1, b, res, wd, bd, wu, bu, out, pre, zs, insum if insum is not None else pre,
        m, h, d, per_prog, float(scale), in1.stride(0), in1.stride(1), b.stride(0), b.stride(1),
        res.stride(0), res.stride(1), wd.stride(0), wd.stride(1), wu.stride(0), wu.stride(1),
        out.stride(0), out.stride(1), HAS_IN2=in2 is not None, **_meta(in1, d, act))
    LAUNCHES[0] += 1


def launch_bwd(g: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor, pre: torch.Tensor, scale: float, act: int,
               dpre: torch.Tensor, gin: torch.Tensor | None, gh: torch.Tensor | None) -> None:
    """:func:`.fused_kernels.bottleneck_bwd`: ``g`` M × H (any strides); writes ``dpre`` (M × D) and, where
    given, ``gin = dpre Wd`` and ``gh = g + dpre Wd`` (M × H, row-major)."""
    m, h = g.shape
    d = wd.shape[0]
    kernels = _kernels()
    grid_m, split, per_prog = _grid(m, h, g.device) if (gin is not None or gh is not None) else (-(-m // 64), 1, 0)
    kernels.bottleneck_bwd[(grid_m, split)](
        g, wu, wd, pre, dpre, gin if gin is not None else dpre, gh if gh is not None else dpre,
        m, h, d, per_prog, float(scale), g.stride(0), g.stride(1), wu.stride(0), wu.stride(1),
        wd.stride(0), wd.stride(1), WRITE_GIN=gin is not None, WRITE_GH=gh is not None, **_meta(g, d, act))
    LAUNCHES[0] += 1


# ------------------------------------------------------------------------------------------ torch reference
_TORCH_ACTS = (lambda t: t, F.relu, F.silu, F.gelu, lambda t: F.gelu(t, approximate="tanh"))


def _act_grad(pre: torch.Tensor, act: int) -> torch.Tensor:
    """The activation's derivative at ``pre`` (float32), in closed form: autograd cannot run here, since a custom
    op's implementation is called below autograd's dispatch inside compiled graphs (``torch.enable_grad()``
    records nothing there)."""
    p = pre.float()
    if act == 0:
        return torch.ones_like(p)
    if act == 1:
        return (p > 0).to(p.dtype)
    if act == 2:  # silu: s(p) (1 + p (1 - s(p)))
        s = torch.sigmoid(p)
        return s * (1 + p * (1 - s))
    if act == 3:  # exact gelu: Φ(p) + p φ(p)
        return 0.5 * (1 + torch.erf(p * 0.7071067811865476)) + p * torch.exp(-0.5 * p * p) * 0.3989422804014327
    # tanh gelu: 0.5 (1 + t) + 0.5 p (1 - t²) c (1 + 3·0.044715 p²), t = tanh(c (p + 0.044715 p³)), c = √(2/π)
    c = 0.7978845608028654
    t = torch.tanh(c * (p + 0.044715 * p ** 3))
    return 0.5 * (1 + t) + 0.5 * p * (1 - t * t) * c * (1 + 3 * 0.044715 * p * p)


def _kernels_ok(t: torch.Tensor) -> bool:
    """Whether the kernels passed their first-use check for ``t``'s device and dtype (checked once)."""
    return kernels_pass("bottleneck", t, _check_pairs)


def _check_pairs(device: torch.device, dtype: torch.dtype, rand: Any) -> list[tuple[Tensor, Tensor]]:
    """Both kernels on small tensors (gelu, a sum input, column splits) with torch's results."""
    h, x, wd, bd, wu, bu, g = (rand(*shape) * 0.5 for shape in ((80, 96), (80, 96), (24, 96), (24,), (96, 24), (96,),
                                                                (80, 96)))
    got_f = forward_impl(h, x, wd, bd, wu, bu, 2.0, 3, "sum", check=False)
    got_b = backward_impl(g, h, x, wd, wu, *got_f[1:], 2.0, 3, "sum", True, True, check=False)
    ref_f = _torch_forward(h, x, wd, bd, wu, bu, 2.0, 3, "sum")
    ref_b = _torch_backward(g, h, x, wd, wu, *ref_f[1:], 2.0, 3, "sum", True, True)
    return list(zip((*got_f, *got_b), (*ref_f, *ref_b)))


def _empty(t: torch.Tensor) -> torch.Tensor:
    """A 0-element stand-in for an output that is not needed (custom ops return tensors, never ``None``)."""
    return torch.empty(0, device=t.device, dtype=t.dtype)


def _inputs(h: torch.Tensor, x: torch.Tensor | None, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    return (x, None) if mode == "parallel" else (h, x if mode == "sum" else None)


def _torch_forward(h: Tensor, x: Tensor | None, wd: Tensor, bd: Tensor, wu: Tensor, bu: Tensor, scale: float,
                   act: int, mode: str) -> tuple[Tensor, ...]:
    """What :func:`forward_impl` computes, with torch ops (a failed check; the self-check's reference)."""
    in1, in2 = _inputs(h, x, mode)
    inp = in1 + in2 if in2 is not None else in1
    pre = torch.addmm(bd, inp, wd.t())
    z = _TORCH_ACTS[act](pre)
    out = torch.addmm(bu, z, wu.t()).mul_(scale).add_(h)
    return out, pre, z * scale, (inp if in2 is not None else _empty(h))


def _torch_backward(g: Tensor, h: Tensor, x: Tensor | None, wd: Tensor, wu: Tensor, pre: Tensor, zs: Tensor,
                    insum: Tensor, scale: float, act: int, mode: str, need_h: bool, need_x: bool) -> tuple[Tensor, ...]:
    """What :func:`backward_impl` computes, with torch ops."""
    dpre = (g.mm(wu) * scale * _act_grad(pre, act)).to(g.dtype)
    gin = dpre.mm(wd)
    inp = insum if mode == "sum" else _inputs(h, x, mode)[0]
    gh = g + gin if need_h and mode != "parallel" else _empty(h)  # parallel: the caller passes g on
    return (gh, gin if (need_x and mode != "self") else _empty(h),
            dpre.t().mm(inp), dpre.sum(0), g.t().mm(zs), g.sum(0) * scale)


def forward_impl(h: torch.Tensor, x: torch.Tensor | None, wd: torch.Tensor, bd: torch.Tensor, wu: torch.Tensor,
                 bu: torch.Tensor, scale: float, act: int, mode: str, check: bool = True) -> tuple[torch.Tensor, ...]:
    """``(out, pre, s·z, input sum or an empty tensor)`` for 2-D ``h`` / ``x`` (M × H) in ``mode``."""
    if check and not _kernels_ok(h):
        return _torch_forward(h, x, wd, bd, wu, bu, scale, act, mode)
    m, d = h.shape[0], wd.shape[0]
    in1, in2 = _inputs(h, x, mode)
    out = torch.empty_like(h, memory_format=torch.contiguous_format)
    pre = torch.empty(m, d, device=h.device, dtype=h.dtype)
    zs = torch.empty(m, d, device=h.device, dtype=h.dtype)
    insum = torch.empty(h.shape, device=h.device, dtype=h.dtype) if in2 is not None else _empty(h)
    launch_fwd(in1, in2, h, wd, bd, wu, bu, scale, act, out, pre, zs, insum if in2 is not None else None)
    return out, pre, zs, insum


def backward_impl(g: torch.Tensor, h: torch.Tensor, x: torch.Tensor | None, wd: torch.Tensor, wu: torch.Tensor,
                  pre: torch.Tensor, zs: torch.Tensor, insum: torch.Tensor, scale: float, act: int, mode: str,
                  need_h: bool, need_x: bool, check: bool = True) -> tuple[torch.Tensor, ...]:
    """``(∂h, ∂x, ∂Wd, ∂bd, ∂Wu, ∂bu)`` from the output gradient ``g``; ``∂h`` / ``∂x`` empty where not needed
    (and ``∂h`` always in ``parallel`` mode, where it is ``g`` itself: the caller passes ``g`` on)."""
    if check and not _kernels_ok(g):
        return _torch_backward(g, h, x, wd, wu, pre, zs, insum, scale, act, mode, need_h, need_x)
    m = g.shape[0]
    dpre = torch.empty(m, wd.shape[0], device=g.device, dtype=g.dtype)
    write_gin = need_x and mode != "self"
    write_gh = need_h and mode != "parallel"
    gin = torch.empty(g.shape, device=g.device, dtype=g.dtype) if write_gin else None
    gh = torch.empty(g.shape, device=g.device, dtype=g.dtype) if write_gh else None
    launch_bwd(g, wu, wd, pre, scale, act, dpre, gin, gh)
    inp = insum if mode == "sum" else _inputs(h, x, mode)[0]
    gbu = g.sum(0)
    if scale != 1.0:
        gbu = gbu.mul_(scale)
    return (gh if gh is not None else _empty(h), gin if gin is not None else _empty(h), dpre.t().mm(inp),
            dpre.sum(0), g.t().mm(zs), gbu)


# ------------------------------------------------------------------------------------------ autograd
def _grads(need: tuple[bool, ...], g: torch.Tensor, mode: str, out: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
    """``backward_impl``'s results as the gradients of ``(h, x, wd, bd, wu, bu)``, ``None`` where not needed."""
    gh = g if mode == "parallel" else out[0]
    grads = (gh, out[1], *out[2:])
    return tuple(t if n else None for t, n in zip(grads, need))


class _FusedBottleneck(torch.autograd.Function):
    """The eager path: launchers called directly, only ``out`` returned."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, x: torch.Tensor | None, wd: torch.Tensor, bd: torch.Tensor,
                wu: torch.Tensor, bu: torch.Tensor, scale: float, act: int, mode: str) -> torch.Tensor:
        out, pre, zs, insum = forward_impl(h, x, wd, bd, wu, bu, scale, act, mode)
        ctx.save_for_backward(h, x, wd, wu, pre, zs, insum)
        ctx.config = (scale, act, mode)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        h, x, wd, wu, pre, zs, insum = ctx.saved_tensors
        scale, act, mode = ctx.config
        need = ctx.needs_input_grad
        out = backward_impl(g, h, x, wd, wu, pre, zs, insum, scale, act, mode, need[0], need[1])
        return (*_grads(need[:6], g, mode, out), None, None, None)


@torch.library.custom_op("adapters_bottleneck::bottleneck_fwd", mutates_args=())
def _op_fwd(h: torch.Tensor, x: torch.Tensor | None, wd: torch.Tensor, bd: torch.Tensor, wu: torch.Tensor,
            bu: torch.Tensor, scale: float, act: int, mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                         torch.Tensor]:
    return forward_impl(h, x, wd, bd, wu, bu, scale, act, mode)


@_op_fwd.register_fake
def _(h: Tensor, x: Tensor | None, wd: Tensor, bd: Tensor, wu: Tensor, bu: Tensor, scale: float, act: int,
      mode: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    m, d = h.shape[0], wd.shape[0]
    return h.new_empty(h.shape), h.new_empty(m, d), h.new_empty(m, d), h.new_empty(h.shape if mode == "sum" else 0)


@torch.library.custom_op("adapters_bottleneck::bottleneck_bwd", mutates_args=())
def _op_bwd(g: torch.Tensor, h: torch.Tensor, x: torch.Tensor | None, wd: torch.Tensor, wu: torch.Tensor,
            pre: torch.Tensor, zs: torch.Tensor, insum: torch.Tensor, scale: float, act: int, mode: str,
            need_h: bool, need_x: bool) -> list[torch.Tensor]:
    return list(backward_impl(g, h, x, wd, wu, pre, zs, insum, scale, act, mode, need_h, need_x))


@_op_bwd.register_fake
def _(g: Tensor, h: Tensor, x: Tensor | None, wd: Tensor, wu: Tensor, pre: Tensor, zs: Tensor, insum: Tensor,
      scale: float, act: int, mode: str, need_h: bool, need_x: bool) -> list[Tensor]:
    full = need_h and mode != "parallel"
    return [g.new_empty(g.shape) if full else g.new_empty(0),
            g.new_empty(g.shape) if need_x and mode != "self" else g.new_empty(0),
            wd.new_empty(wd.shape), wd.new_empty(wd.shape[0]), wu.new_empty(wu.shape), wu.new_empty(wu.shape[0])]


def _op_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    h, x, wd, _bd, wu, _bu, scale, act, mode = inputs
    ctx.save_for_backward(h, x, wd, wu, *output[1:])
    ctx.config = (scale, act, mode)


def _op_backward(ctx: Any, g: torch.Tensor, *_unused: Any) -> tuple[Any, ...]:
    h, x, wd, wu, pre, zs, insum = ctx.saved_tensors
    scale, act, mode = ctx.config
    need = ctx.needs_input_grad
    out = _op_bwd(g, h, x, wd, wu, pre, zs, insum, scale, act, mode, need[0], need[1])
    return (*_grads(need[:6], g, mode, tuple(out)), None, None, None)


_op_fwd.register_autograd(_op_backward, setup_context=_op_setup)


# ------------------------------------------------------------------------------------------ entry point
_ACTS = {nn.Identity: 0, nn.ReLU: 1, nn.SiLU: 2}


def _activation_code(module: nn.Module) -> int | None:
    if type(module) is nn.GELU:
        return 3 if module.approximate == "none" else 4
    return _ACTS.get(type(module))


def _mode_of(adapter: nn.Module, norm_is_identity: bool) -> str | None:
    """The input / residual form of ``adapter`` (a :class:`~.units.Bottleneck`), ``None`` when not covered."""
    if adapter.is_parallel:
        return "parallel"
    if not adapter.original_ln_before:
        return "self" if adapter.residual_before_ln in (True, False) else None
    return "sum" if norm_is_identity and adapter.residual_before_ln is True else None


def bottleneck(adapter: nn.Module, h: torch.Tensor, x: torch.Tensor | None,
               norm_is_identity: bool) -> torch.Tensor | None:
    """``adapter(h, x, norm)`` on the fused path, or ``None`` where it does not apply (see the module docstring).

    :param adapter: a :class:`~.units.Bottleneck`. :param h: the sub-block output (..., H).
    :param x: the residual stream (``h``'s shape) or ``None``. :param norm_is_identity: the location has no norm.
    """
    if not selected(h) or not torch.is_grad_enabled() or torch.is_autocast_enabled(h.device.type):
        return None  # (under autocast the plain path's projections cast)
    if (adapter.ln_before is not None or adapter.ln_after is not None or adapter.gate is not None
            or adapter.learned_scaling or (adapter.training and (adapter.dropout is not None
                                                                 or adapter.stochastic_depth > 0))):
        return None
    down, up = adapter.down, adapter.up
    if type(down) is not nn.Linear or type(up) is not nn.Linear or down.bias is None or up.bias is None:
        return None
    act = _activation_code(adapter.act)
    mode = _mode_of(adapter, norm_is_identity)
    wd, bd, wu, bu = down.weight, down.bias, up.weight, up.bias
    dtype = h.dtype
    if (act is None or mode is None or dtype not in _DTYPES or wd.shape[0] > _MAX_BOTTLENECK or h.numel() >= 2**31
            or any(t.dtype != dtype for t in (wd, bd, wu, bu))):
        return None
    if mode != "self" and (x is None or x.shape != h.shape or x.dtype != dtype):
        return None
    if not (wd.requires_grad or bd.requires_grad or wu.requires_grad or bu.requires_grad):
        return None
    width = h.shape[-1]
    h2 = h.reshape(-1, width)
    x2 = x.reshape(-1, width) if x is not None and mode != "self" else None
    scale = adapter.scale_value
    if torch.compiler.is_compiling():
        out = torch.ops.adapters_bottleneck.bottleneck_fwd(h2, x2, wd, bd, wu, bu, scale, act, mode)[0]
    elif (torch._C._are_functorch_transforms_active() or not all(type(t) in _PLAIN for t in (h2, wd, wu))
          or (x2 is not None and type(x2) not in _PLAIN) or not _kernels_ok(h2)):
        return None  # functorch transforms and tensor subclasses keep the plain path
    else:
        out = _FusedBottleneck.apply(h2, x2, wd, bd, wu, bu, scale, act, mode)
    return out.view(h.shape)
