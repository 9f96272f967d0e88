"""The fused training path (issue #23): train-step ratios against the frozen base with it on and off, peft beside.

For each method one adapter model is built and measured twice in the same interleaved loop (``ADAPTERS_FUSED``
switched per call with ``set_fused_mode``: ``on`` = ``auto``, ``off`` = ``0``), with the frozen base's
forward + backward and peft's step in the same rounds (as ``run.py``: fused AdamW, medians after warm-up).
``--compile`` repeats the table with base, ours (both modes: dynamo guards on the mode, so each has its
own graph) and peft under ``torch.compile`` (``--compile-mode reduce-overhead``: CUDA graphs), each a copy
whose decoder layers are compiled one by one (identical layers share a graph: the 0.6B model compiles in
about one layer's time; ``--compile-scope model`` compiles the whole model instead).

Before timing, each method's step is checked: the loss and every adapter gradient with the path on against
off (``max rel err``: the largest difference relative to the largest value, per tensor, and which tensor;
``plain vs plain``: the same between two runs of the plain path, the device's own nondeterminism; ``vs float32``:
each path's largest difference from a float32 copy of the model on the plain path, which tells rounding (both
about equally far) from a fault (on much farther)), and the Triton
launches one step makes (``kernels/step``: 0 where the path covers nothing: LoReFT, and par_bn's 512-wide
bottleneck at 0.6B).

Usage::

    python benchmarks/fused.py --device cuda                      # 0.6B Qwen3 shape, bf16, 8 x 512
    python benchmarks/fused.py --device cuda --compile            # + the same under torch.compile
    python benchmarks/fused.py --device cpu --tiny                # smoke run: Triton's interpreter, seconds

The CPU smoke run forces the path (``force``) under ``TRITON_INTERPRET=1``; its times say nothing about a
GPU. Results: ``benchmarks/results/fused-<device>-<size>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import sys
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import (
    METHODS,
    _randomise_adapter,
    adapter_copy,
    adapter_train_step,
    base_train_step,
    build_base,
    interleaved,
    peft_model,
    write_results,
)

#: methods measured by default, with the issue's goal (train-step ratio to the frozen base, GPU 8 x 512)
GOALS = {"lora_qv_r8": 1.05, "lora_all_r16": 1.20, "dora": 1.25, "seq_bn": 1.08, "par_bn": 1.08, "loreft": 1.15}


def _set_mode(mode: str) -> None:
    from adapters_bottleneck import fused as bn_fused
    from adapters_lora import fused

    fused.set_fused_mode(mode)
    bn_fused.set_fused_mode(mode)


def _launches() -> int:
    from adapters_bottleneck import fused as bn_fused
    from adapters_lora import fused

    return fused.LAUNCHES[0] + bn_fused.LAUNCHES[0]


def _in_mode(mode: str, fn: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        _set_mode(mode)
        fn()

    return run


def _step_values(model: torch.nn.Module, embeds: torch.Tensor, probe: torch.Tensor) -> dict[str, torch.Tensor]:
    """The loss and every adapter gradient of one step (no optimizer), by name."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    x = embeds.detach().requires_grad_(True)
    loss = (model(inputs_embeds=x).last_hidden_state.float() * probe).mean()
    grads = torch.autograd.grad(loss, [p for _, p in named])
    return {"loss": loss.detach(), **{n: g for (n, _), g in zip(named, grads)}}


def _worst(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The largest difference relative to the largest value of a tensor, over the tensors, and which."""
    errs = {k: float((got[k].float() - v.float()).abs().max() / v.float().abs().max().clamp_min(1e-30))
            for k, v in want.items()}
    name = max(errs, key=errs.get)
    return errs[name], name


def check(model: torch.nn.Module, embeds: torch.Tensor, on: str) -> dict[str, Any]:
    """The step's values with the path on against off (``max_rel_err``, ``worst``: which tensor), the plain
    path against itself run again (``noise``: the GPU's own nondeterminism, e.g. atomics in attention's
    backward pass), and the Triton launches one step makes with the path on."""
    probe = torch.randn(embeds.shape, generator=torch.Generator().manual_seed(1)).to(embeds.device)
    _set_mode("0")
    want = _step_values(model, embeds, probe)
    noise, _ = _worst(_step_values(model, embeds, probe), want)
    _set_mode(on)
    _step_values(model, embeds, probe)  # first-use checks and compilation happen here
    before = _launches()
    got = _step_values(model, embeds, probe)
    launches = _launches() - before
    err, worst = _worst(got, want)
    ref = _float32_values(model, embeds, probe)
    return {"max_rel_err": err, "worst": worst, "noise": noise, "kernels_per_step": launches,
            "err_vs_fp32": {"on": _worst(got, ref)[0], "off": _worst(want, ref)[0]}}


def _float32_values(model: torch.nn.Module, embeds: torch.Tensor, probe: torch.Tensor) -> dict[str, torch.Tensor]:
    """The step's values from a float32 copy of ``model`` on the plain path: the reference both bf16 paths are
    measured against (on and off about equally far from it = rounding; on much farther = a fault)."""
    _set_mode("0")
    if embeds.dtype == torch.float32:
        return _step_values(model, embeds, probe)
    wide = copy.deepcopy(model).float()
    values = _step_values(wide, embeds.float(), probe)
    del wide
    return values


def compiled_copy(model: torch.nn.Module, mode: str | None, scope: str) -> torch.nn.Module:
    """A copy of ``model`` under ``torch.compile``: each decoder layer compiled (``scope="layers"``, regional
    compilation: identical layers share one compiled graph, so a 28-layer model compiles in about the time of
    one) or the whole model (``"model"``)."""
    model = copy.deepcopy(model)
    if scope == "model":
        return torch.compile(model, mode=mode)
    layers = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len)
    for layer in layers:
        layer.compile(mode=mode)
    return model


def run(args: argparse.Namespace) -> dict[str, Any]:
    import adapters

    device = args.device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    base = build_base(args.size, dtype, device)
    tb, tl = args.train_shape
    embeds = torch.randn(tb, tl, base.config.hidden_size, generator=torch.Generator().manual_seed(0))
    embeds = embeds.to(device=device, dtype=dtype)
    on = "force" if args.force else "auto"
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__, "size": args.size, "dtype": str(dtype).replace("torch.", ""),
        "train_shape": [tb, tl], "fused": args.fused, "compile": args.compile, "methods": {},
    }
    try:
        import triton

        results["triton"] = triton.__version__
    except ImportError:
        results["triton"] = None
    modes = {"both": {"on": on, "off": "0"}, "on": {"on": on}, "off": {"off": "0"}}[args.fused]
    compiled = [False, True] if args.compile else [False]
    for name in args.methods:
        config, peft_key = METHODS[name]
        if not adapters.registry.has_config_string(config.split("[")[0]):
            print(f"- {name}: plugin not installed, skipped")
            continue
        print(f"- {name}", flush=True)
        model = adapter_copy(base, config, randomise=True)
        row: dict[str, Any] = {"goal": GOALS.get(name)}
        if "on" in modes:
            row.update(check(model, embeds, on))
        theirs = peft_model(base, peft_key) if (peft_key and args.peft) else None
        if theirs is not None:
            theirs.eval()
            _randomise_adapter(theirs)
        for comp in compiled:
            wrap = (lambda m: compiled_copy(m, args.compile_mode, args.compile_scope)) if comp else (lambda m: m)
            fns = {"base": base_train_step(wrap(base), embeds)}
            ours = adapter_train_step(wrap(model), embeds)
            for label, mode in modes.items():
                fns[label] = _in_mode(mode, ours)
            if theirs is not None:
                fns["peft"] = adapter_train_step(wrap(theirs), embeds)
            t = interleaved(fns, device, args.warmup, args.repeats)
            key = "compiled" if comp else "eager"
            row[key] = {k: t[k] / t["base"] for k in t if k != "base"}
            row[f"{key}_base_ms"] = 1e3 * t["base"]
            print("  " + key + ": " + ", ".join(f"{k} {v:.3f}x" for k, v in row[key].items()), flush=True)
            if comp:
                torch._dynamo.reset()
        results["methods"][name] = row
        del model, theirs
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    _set_mode("auto")
    return results


def _vs_fp32(row: dict[str, Any]) -> str:
    ref = row.get("err_vs_fp32")
    return "–" if ref is None else f"{ref['on']:.1e} / {ref['off']:.1e}"


def markdown(results: dict[str, Any]) -> str:
    b, t = results["train_shape"]
    base_ms = [r["eager_base_ms"] for r in results["methods"].values() if "eager_base_ms" in r]
    lines = [f"Qwen3-shaped random model, {results['size']}, {results['dtype']}, {results['device']}, torch "
             f"{results['torch']}, triton {results['triton']}, {results['date']}. Train-step ratio to the frozen "
             f"base (forward + backward with input gradients, {b} x {t}"
             + (f"; base {sorted(base_ms)[len(base_ms) // 2]:.1f} ms eager" if base_ms else "")
             + "); interleaved medians.", ""]
    cols = [c for c in ("on", "off", "peft") if any(c in r.get("eager", {}) for r in results["methods"].values())]
    header = "| method | goal | " + " | ".join(f"{c}" for c in cols)
    if results["compile"]:
        header += " | " + " | ".join(f"compiled {c}" for c in cols)
    header += " | kernels/step | max rel err (on vs off) | plain vs plain | vs float32: on / off |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]

    def cell(value: float | None) -> str:
        return "–" if value is None else f"{value:.3f}×"

    for name, row in results["methods"].items():
        goal = f"≤ {row['goal']:.2f}×" if row.get("goal") else "–"
        cells = [cell(row["eager"].get(c)) for c in cols]
        if results["compile"]:
            cells += [cell(row.get("compiled", {}).get(c)) for c in cols]
        err, noise = row.get("max_rel_err"), row.get("noise")
        lines.append(f"| {name} | {goal} | " + " | ".join(cells)
                     + f" | {row.get('kernels_per_step', '–')} | {'–' if err is None else f'{err:.1e}'}"
                     + (f" ({row['worst']})" if err else "") + f" | {'–' if noise is None else f'{noise:.1e}'}"
                     + f" | {_vs_fp32(row)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default=None, help="run.py's SIZES key (default 0.6b on GPU, tiny on CPU)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, 2 x 16, 2 repeats")
    parser.add_argument("--methods", nargs="+", default=list(GOALS), choices=list(METHODS))
    parser.add_argument("--fused", choices=["on", "off", "both"], default="both")
    parser.add_argument("--compile", action="store_true", help="also measure under torch.compile")
    parser.add_argument("--compile-mode", default=None, choices=[None, "reduce-overhead", "max-autotune"])
    parser.add_argument("--compile-scope", default="layers", choices=["layers", "model"],
                        help="compile each decoder layer (default: one compiled graph for all) or the whole model")
    parser.add_argument("--no-peft", dest="peft", action="store_false")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--train-shape", type=int, nargs=2, default=None, metavar=("BATCH", "SEQ"))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.force = not gpu  # CPU tensors take the path only when forced (Triton's interpreter)
    if not gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    args.size = args.size or ("0.6b" if gpu else "tiny")
    args.repeats = args.repeats or (30 if gpu else 2)
    args.warmup = args.warmup or (5 if gpu else 1)
    args.train_shape = tuple(args.train_shape) if args.train_shape else ((8, 512) if gpu else (2, 16))
    results = run(args)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"fused-{'gpu' if gpu else 'cpu'}-{args.size}")
    write_results(stem, results, markdown(results))


if __name__ == "__main__":
    main()
