"""The switch of the optional fused kernels that method packages ship (``adapters_lora.fused``,
``adapters_bottleneck.fused``): one mode for all of them, read from ``ADAPTERS_FUSED`` at import.

Modes:

* ``"compiled"`` (the default): inside ``torch.compile`` graphs only, for CUDA tensors when Triton is
  installed, and only the kernels their package marks ``COMPILED_DEFAULT``, meaning measured faster there
  than inductor's code for the plain path (``fused_selected(t, compiled_default=True)``: bottleneck training,
  LoRA decode). Eagerly nothing: an eager decode or training step is bound by the host enqueueing kernels,
  and a Triton launch from Python costs more host time than the ATen launches it replaces (README, "Fused
  training kernels"). On CPU, or without Triton, nothing changes.
* ``"0"`` (``off``, ``false``, ``no``): never.
* ``"auto"`` (``1``, ``on``, ``true``, ``yes``): every kernel, eager and compiled, for CUDA tensors when Triton
  is installed.
* ``"force"``: every kernel for any device (CPU tensors need Triton's interpreter, ``TRITON_INTERPRET=1``:
  the tests).

Each kernel is checked against torch on its first use per device and dtype (:func:`kernels_pass`; inside a
compiled graph, where the kernel is a custom op, on the op's first run), and torch's operations compute its
result where the check fails. An unknown ``ADAPTERS_FUSED`` value warns at import and means off;
:func:`set_fused_mode` refuses one. Nothing here imports Triton.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Callable, Iterable

import torch

__all__ = ["FusedPathWarning", "fused_mode", "set_fused_mode", "fused_selected", "device_programs", "kernels_pass"]

#: ``pairs(device, dtype, rand)``: kernel launches on small tensors, returned with torch's results as
#: ``(got, want)`` pairs; ``rand(*shape)`` gives seeded standard-normal values on that device and dtype
CheckPairs = Callable[[torch.device, torch.dtype, Callable[..., torch.Tensor]], Iterable[tuple[torch.Tensor,
                                                                                             torch.Tensor]]]


class FusedPathWarning(UserWarning):
    """A fused kernel failed its first-use check on a device and dtype (torch ops compute there instead), or
    ``ADAPTERS_FUSED`` holds an unknown value (the kernels stay off)."""


#: whether Triton is installed, looked up once at import (without importing it): the selection below is traced by
#: ``torch.compile``, and an import-machinery call there breaks the graph (seen with torch 2.11 on an H200)
_HAS_TRITON: bool = importlib.util.find_spec("triton") is not None
_PROGRAMS: dict[int | None, int] = {}
#: first-use check results by (kernels, device type, device index, dtype)
_CHECKS: dict[tuple[str, str, int | None, torch.dtype], bool] = {}


def fused_mode() -> str:
    """The current mode: ``"compiled"``, ``"auto"``, ``"0"`` or ``"force"``."""
    return _MODE


_OFF = ("0", "off", "false", "no", "")
_ON = ("1", "on", "true", "yes", "auto")
_ACCEPTED = ("compiled (the default: inside torch.compile, the kernels that pay there), 0 / off / false / no "
             "(never), 1 / on / true / yes / auto (CUDA with Triton) or force (any device)")


def _parse(mode: str) -> str | None:
    mode = str(mode).strip().lower()
    if mode in ("compiled", "force"):
        return mode
    return "0" if mode in _OFF else "auto" if mode in _ON else None


def set_fused_mode(mode: str) -> str:
    """Set the mode of every package's fused kernels (one mode for all of them); returns the previous one.

    :raises ValueError: an unknown mode (the mode is left as it was)."""
    global _MODE
    parsed = _parse(mode)
    if parsed is None:
        raise ValueError(f"Unknown fused-kernel mode {mode!r}; use {_ACCEPTED}.")
    previous, _MODE = _MODE, parsed
    return previous


def _mode_from_environment() -> str:
    """``ADAPTERS_FUSED`` at import: an unknown value warns and means off (an environment variable must never
    stop ``import adapters`` or a plugin from loading)."""
    value = os.environ.get("ADAPTERS_FUSED", "compiled")
    parsed = _parse(value)
    if parsed is None:
        warnings.warn(f"ADAPTERS_FUSED={value!r} is not a fused-kernel mode ({_ACCEPTED}); the fused kernels stay "
                      "off.", FusedPathWarning, stacklevel=2)
        return "0"
    return parsed


_MODE = _mode_from_environment()


def fused_selected(t: torch.Tensor, compiled_default: bool = False) -> bool:
    """Whether the mode selects a fused kernel for tensors like ``t`` (device, and Triton installed).

    ``compiled_default``: the kernel measured faster inside ``torch.compile`` graphs than inductor's code for
    the plain path, so mode ``"compiled"`` selects it there."""
    if _MODE == "0" or not (t.is_cuda or _MODE == "force"):
        return False
    if _MODE == "compiled" and not (compiled_default and torch.compiler.is_compiling()):
        return False
    return _HAS_TRITON


def device_programs(device: torch.device) -> int:
    """How many programs a launch should have to fill ``device``: twice its streaming multiprocessors on
    CUDA; 4 elsewhere (small, so the interpreter tests exercise split launches)."""
    if device.type != "cuda":
        return 4
    count = _PROGRAMS.get(device.index)
    if count is None:
        count = _PROGRAMS[device.index] = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return count


def kernels_pass(what: str, t: torch.Tensor, pairs: CheckPairs) -> bool:
    """Whether the fused kernels ``what`` passed their first-use check on ``t``'s device and dtype: the first
    call runs ``pairs`` (:data:`CheckPairs`) without gradients and remembers the answer; ``False`` and a
    :class:`FusedPathWarning` when a launch raises or a pair disagrees (relative to the largest wanted
    value: 1e-4 in float32, 5e-2 in half precision)."""
    key = (what, t.device.type, t.device.index, t.dtype)
    ok = _CHECKS.get(key)
    if ok is None:
        ok = _CHECKS[key] = _check(what, t.device, t.dtype, pairs)
    return ok


def _check(what: str, device: torch.device, dtype: torch.dtype, pairs: CheckPairs) -> bool:
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    tol = 1e-4 if dtype == torch.float32 else 5e-2
    try:
        with torch.no_grad():
            for got, want in pairs(device, dtype, rand):
                want = want.float()
                if not torch.allclose(got.float(), want, rtol=tol, atol=tol * float(want.abs().max())):
                    raise RuntimeError(f"mismatch: max error {float((got.float() - want).abs().max()):.3g}")
    except Exception as exc:  # noqa: BLE001 - any failure means: do not use the kernels here
        hint = ("; CPU tensors run Triton kernels only under its interpreter: set TRITON_INTERPRET=1 before "
                "importing triton" if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1" else "")
        warnings.warn(f"the fused {what} kernels failed their check on {device} / {dtype} ({exc}{hint}); torch "
                      "ops compute the fused path there (ADAPTERS_FUSED=0: the plain path).", FusedPathWarning,
                      stacklevel=4)
        return False
    return True
