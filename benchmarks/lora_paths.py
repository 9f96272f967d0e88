"""Compare implementations of the LoRA training fast path on one model, interleaved with the base.

``flat``: the layer as shipped (autograd ops on 2-D views: base ``addmm``, rank-r ``mm``, fused
``addmm``); ``autograd``: the same math through 3-D ``F.linear`` calls (more view nodes). An earlier
variant, a custom ``autograd.Function`` with a hand-written backward, measured the same as ``flat``
on an H200 (``results_gpu/lora_paths.txt``, ``fn``) and was dropped: it needed its own double-backward
and ``torch.func`` support for no gain. ``scale_tensor`` / ``scale_float`` apply a scaling other than 1
as a multiplication of the rank-sized ``h`` instead of the ``addmm``'s alpha; within the noise of the
shipped path on an H200 (``results_gpu/lora_scale_paths.txt``), so not adopted. Usage::

    python benchmarks/lora_paths.py --device cuda --shapes 8x512 16x2048
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import adapter_copy, adapter_train_step, base_train_step, build_base, interleaved

from adapters_lora.layer import LoRALinear


def _lone(layer: LoRALinear):
    """The layer's one active LoRA adapter module (the variants below time a single adapter)."""
    return layer._modules["adapters"]._modules[layer.active_plan().name]


class _Autograd(LoRALinear):
    def forward(self, x):
        p = _lone(self)
        y = F.linear(x, self.weight, self.bias)
        h = F.linear(x, p.lora_A)
        y2, h2 = y.view(-1, y.shape[-1]), h.view(-1, h.shape[-1])
        return torch.addmm(y2, h2, p.lora_B.t(), alpha=p.scaling).view(y.shape)


class _ScaleOnH(LoRALinear):
    """A scaling other than 1 as a multiplication of the rank-sized ``h`` (no ``addmm`` alpha): by a
    cached 0-dim device tensor (``as_tensor``) or by the Python float."""

    as_tensor = True

    def forward(self, x):
        p = _lone(self)
        x2 = x.reshape(-1, x.shape[-1])
        y2 = x2.mm(self.weight.t())
        h2 = x2.mm(p.lora_A.t())
        if p.scaling != 1.0:
            s = p.scaling
            if self.as_tensor:
                s = p.__dict__.get("_s")
                if s is None or s.device != x.device or s.dtype != x.dtype:
                    s = p.__dict__["_s"] = torch.tensor(p.scaling, dtype=x.dtype, device=x.device)
            h2 = h2 * s
        return torch.addmm(y2, h2, p.lora_B.t()).view(*x.shape[:-1], y2.shape[-1])


class _ScaleFloat(_ScaleOnH):
    as_tensor = False


VARIANTS = {"flat": LoRALinear, "autograd": _Autograd, "scale_tensor": _ScaleOnH, "scale_float": _ScaleFloat}


def main() -> None:

    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", default=None)
    parser.add_argument("--shapes", nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--config", default="lora[r=8, alpha=16]")
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    dtype = torch.bfloat16 if gpu else torch.float32
    base = build_base(args.size or ("0.6b" if gpu else "tiny"), dtype, args.device)
    models = {}
    for key, cls in VARIANTS.items():
        m = adapter_copy(base, args.config, "p")
        for mod in m.modules():
            if isinstance(mod, LoRALinear):
                mod.__class__ = cls
        models[key] = m
    for shape in args.shapes or (["8x512", "16x2048"] if gpu else ["2x64"]):
        b, t = map(int, shape.split("x"))
        x = torch.randn(b, t, base.config.hidden_size, device=args.device, dtype=dtype)
        fns = {"base": base_train_step(base, x)} | {k: adapter_train_step(m, x) for k, m in models.items()}
        med = interleaved(fns, args.device, warmup=5, repeats=args.repeats)
        line = ", ".join(f"{k} {med[k] / med['base']:.3f}x" for k in fns if k != "base")
        print(f"{shape}: base {1e3 * med['base']:.1f} ms; {line}", flush=True)


if __name__ == "__main__":
    main()
