"""The switch of the optional fused kernels that method packages ship (``adapters_lora.fused``,
``adapters_bottleneck.fused``): one mode for all of them, read from ``ADAPTERS_FUSED`` at import.

Modes: ``"0"`` (default; ``off``, ``false``, ``no``): never; ``"auto"`` (``1``, ``on``, ``true``, ``yes``):
for CUDA tensors when Triton is installed; ``"force"``: for any device (CPU tensors need Triton's
interpreter, ``TRITON_INTERPRET=1``: the tests). Off by default because on an H200 the fused training
step was slower than the plain one (README, "Fused training kernels"). Nothing here imports Triton.
"""

from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["FusedPathWarning", "fused_mode", "set_fused_mode", "fused_selected", "device_programs"]


class FusedPathWarning(UserWarning):
    """A fused kernel failed its first-use check on a device and dtype; torch ops compute there instead."""


_MODE = "0"
_HAS_TRITON: bool | None = None
_PROGRAMS: dict[int | None, int] = {}


def fused_mode() -> str:
    """The current mode: ``"auto"``, ``"0"`` or ``"force"``."""
    return _MODE


def set_fused_mode(mode: str) -> str:
    """Set the mode of every package's fused kernels; returns the previous one.

    :raises ValueError: an unknown mode."""
    global _MODE
    mode = str(mode).strip().lower()
    if mode in ("0", "off", "false", "no", ""):
        mode = "0"
    elif mode in ("1", "on", "true", "yes"):
        mode = "auto"
    elif mode not in ("auto", "force"):
        raise ValueError(f"ADAPTERS_FUSED mode must be auto, 0 or force, not {mode!r}.")
    previous, _MODE = _MODE, mode
    return previous


set_fused_mode(os.environ.get("ADAPTERS_FUSED", "0"))


def fused_selected(t: torch.Tensor) -> bool:
    """Whether the mode selects fused kernels for tensors like ``t`` (device, and Triton installed)."""
    global _HAS_TRITON
    if _MODE == "0" or not (t.is_cuda or _MODE == "force"):
        return False
    if _HAS_TRITON is None:
        _HAS_TRITON = importlib.util.find_spec("triton") is not None
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
