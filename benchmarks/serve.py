"""Serving many adapters from one base model: mixed batches, generate(), merged adapters; peft beside us.

Every figure is a ratio against a reference measured in the same process, interleaved (base, ours, peft,
..., then the same in reverse order), medians after warm-up. Every model measured, the base reference
included, is a ``copy.deepcopy`` of one template model: on the H200 machine's host a copy whose q and v
projections run exactly the base computation measured 1.10x the template itself in ``generate()``
(``benchmarks/generate_profile.py``: ``floor_linear`` against ``base``), a difference of provenance that
has nothing to do with adapters.

* ``mixed``: one inference forward of a batch whose rows go to K different LoRA adapters (q, v, r 8,
  alpha 16; K in ``--ks``, rows assigned round-robin, so a batch has ``max(batch, K)`` rows): ours with
  ``model(..., adapter_names=[...])`` (the gathered path), peft with its ``adapter_names``. Against the
  base model and against one adapter active for the whole batch (``one``), on the same rows. Forward
  calls use ``logits_to_keep=1``: the LM head over every position would dominate the time otherwise.
* ``generate``: ``generate()`` tokens per second (greedy, a fixed number of new tokens) with the base
  model, one LoRA, per-row adapters (8 adapters and a ``"__base__"`` row) and one merged LoRA; peft with
  one adapter, ``adapter_names`` and its merged adapter.
* ``merged``: inference with one LoRA merged (``merge_adapter``) against the base model at a small and a
  large shape (more repeats: the ratios sit near 1.00); peft after its ``merge_adapter()``.

Usage::

    python benchmarks/serve.py                    # CPU: small Qwen3-shaped model, float32, one thread (minutes)
    python benchmarks/serve.py --quick            # CPU smoke run, under a minute
    python benchmarks/serve.py --device cuda      # ~0.6B Qwen3-shaped model in bf16: the README's GPU table

Results go to ``benchmarks/results/serve-<device>-<size>.json`` and ``.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import SIZES, _timeit, write_results

LORA = "lora[r=8, alpha=16]"  # q and v
PARTS = ("mixed", "generate", "merged")


def build_lm(size: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """A Qwen3-shaped causal LM with random weights (no download), frozen, in eval mode."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(**SIZES[size], max_position_embeddings=4096, bos_token_id=1, eos_token_id=None,
                         pad_token_id=0)
    model = Qwen3ForCausalLM(config).to(device=device, dtype=dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _randomise(params: list[torch.Tensor], seed: int) -> None:
    """Give (zero-initialised) adapter weights values, so every path does real work."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen).to(p) * 1e-2)


def ours(base: torch.nn.Module, k: int) -> torch.nn.Module:
    """The base model with LoRA adapters ``a0 .. a{k-1}``; ``a0`` active."""
    import adapters

    model = copy.deepcopy(base)
    adapters.init(model)
    for i in range(k):
        model.add_adapter(f"a{i}", config=LORA)
        _randomise(model._adapters_state.adapter_parameters(f"a{i}"), seed=i)
    model.set_active_adapters("a0")
    model.eval()
    return model


def theirs(base: torch.nn.Module, k: int) -> torch.nn.Module | None:
    """peft's model with LoRA adapters ``a0 .. a{k-1}`` (same placement and scaling); ``a0`` active."""
    try:
        import peft
    except ImportError:
        return None
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = peft.get_peft_model(copy.deepcopy(base), config, adapter_name="a0")
    for i in range(1, k):
        model.add_adapter(f"a{i}", config)
    for i in range(k):
        _randomise([p for n, p in model.named_parameters() if f".a{i}." in n and "lora_" in n], seed=i)
    model.set_adapter("a0")
    model.eval()
    return model


def interleaved(fns: dict[str, Callable[[], Any]], device: str, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds of each function, run round-robin, every other round in reverse order (a function's
    place in the round, e.g. right after another model flushed the caches, then cancels out)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for index in range(repeats):
        for key in (list(fns) if index % 2 == 0 else list(fns)[::-1]):
            samples[key].append(_timeit(fns[key], device))
    return {k: statistics.median(v) for k, v in samples.items()}


def forward(model: torch.nn.Module, ids: torch.Tensor, **kwargs: Any) -> Callable[[], None]:
    @torch.inference_mode()
    def run() -> None:
        model(input_ids=ids, logits_to_keep=1, **kwargs)

    return run


def generate(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, **kwargs: Any) -> Callable[[], None]:
    mask = torch.ones_like(ids)

    @torch.inference_mode()
    def run() -> None:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs)
        assert out.shape[1] == ids.shape[1] + new_tokens

    return run


def rows(k: int, batch: int) -> list[str]:
    return [f"a{i % k}" for i in range(max(batch, k))]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    device = args.device
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    template = build_lm(args.size, dtype, device)
    base = copy.deepcopy(template)  # the reference: a copy like every other model measured (module docstring)
    vocab = base.config.vocab_size
    gen = torch.Generator().manual_seed(0)

    def tokens(batch: int, length: int) -> torch.Tensor:
        return torch.randint(4, vocab, (batch, length), generator=gen).to(device)

    kmax = max(args.ks)
    start = time.perf_counter()
    model = ours(template, max(kmax, 8))
    setup_s = time.perf_counter() - start
    peft_model = theirs(template, max(kmax, 8)) if args.peft else None
    out: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__, "size": args.size, "dtype": args.dtype,
        "params": sum(p.numel() for p in base.parameters()), "command": "python " + " ".join(sys.argv),
        "init_add_s": setup_s, "peft": _peft_version(), "mixed": {}, "generate": {}, "merged": {},
    }
    print(f"{out['params'] / 1e6:.1f}M params, {kmax} adapters added in {setup_s:.1f} s")

    for k in args.ks if "mixed" in args.parts else ():  # -- mixed batches
        names = rows(k, args.batch)
        ids = tokens(len(names), args.seq)
        fns = {"base": forward(base, ids), "one": forward(model, ids),
               "mixed": forward(model, ids, adapter_names=names)}
        if peft_model is not None:
            fns["peft_one"] = forward(peft_model, ids)
            fns["peft_mixed"] = forward(peft_model, ids, adapter_names=names)
        t = interleaved(fns, device, args.warmup, args.repeats)
        row = {"batch": len(names), "base_ms": 1e3 * t["base"],
               **{key: t[key] / t["base"] for key in t if key != "base"}}
        row["mixed_vs_one"] = t["mixed"] / t["one"]
        if "peft_mixed" in t:
            row["peft_mixed_vs_one"] = t["peft_mixed"] / t["peft_one"]
        out["mixed"][k] = row
        print(f"  mixed K={k}: " + json.dumps({key: round(v, 3) for key, v in row.items()}))

    merged = ours(template, 1)  # -- generate and merged: one adapter, merged
    merged.merge_adapter("a0")
    peft_merged = theirs(template, 1) if args.peft else None
    if peft_merged is not None:
        peft_merged.merge_adapter()
    if "generate" in args.parts:
        generate_table(args, out, {"base": base, "one": model, "merged": merged, "peft_one": peft_model,
                                   "peft_merged": peft_merged}, tokens(args.gen_batch, args.prompt))

    for shape in (args.merged_small, args.merged_large) if "merged" in args.parts else ():
        ids = tokens(*shape)
        fns = {"base": forward(base, ids), "merged": forward(merged, ids), "one": forward(model, ids)}
        if peft_merged is not None:
            fns["peft_merged"] = forward(peft_merged, ids)
        t = interleaved(fns, device, args.warmup, args.merged_repeats)
        out["merged"][f"{shape[0]}x{shape[1]}"] = {"base_ms": 1e3 * t["base"],
                                                   **{key: t[key] / t["base"] for key in t if key != "base"}}
        print(f"  merged {shape[0]}x{shape[1]}: " + json.dumps({key: round(v, 3) for key, v in
                                                              out["merged"][f"{shape[0]}x{shape[1]}"].items()}))
    del model, peft_model, merged, peft_merged, template, base
    gc.collect()
    return out


def generate_table(args: argparse.Namespace, out: dict[str, Any], models: dict[str, Any], prompt: torch.Tensor) -> None:
    """``out["generate"]``: generate() with each model (``None``: not installed) and per-row adapters."""
    per_row = [f"a{i % 8}" for i in range(args.gen_batch - 1)] + ["__base__"]
    fns = {key: generate(m, prompt, args.new_tokens) for key, m in models.items() if m is not None}
    fns["per_row"] = generate(models["one"], prompt, args.new_tokens, adapter_names=per_row)
    if models.get("peft_one") is not None:
        fns["peft_per_row"] = generate(models["peft_one"], prompt, args.new_tokens, adapter_names=per_row)
    t = interleaved(fns, args.device, max(1, args.warmup // 2), args.gen_repeats)
    new = args.gen_batch * args.new_tokens
    out["generate"] = {key: {"tokens_per_s": new / v, "time_vs_base": v / t["base"]} for key, v in t.items()}
    out["generate_shape"] = [args.gen_batch, args.prompt, args.new_tokens]
    print("  generate: " + json.dumps({key: round(v["time_vs_base"], 3) for key, v in out["generate"].items()}))


def _peft_version() -> str | None:
    try:
        import peft
    except ImportError:
        return None
    return peft.__version__


def _x(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}×"


def markdown(r: dict[str, Any]) -> str:
    peft = f"peft {r['peft']}" if r["peft"] else "peft not installed"
    lines = [
        f"Qwen3-shaped random causal LM, {r['size']} ({r['params'] / 1e6:.1f}M params), {r['dtype']}, {r['device']}, "
        f"torch {r['torch']}, {r['date']}; LoRA q, v, r 8; {peft} in brackets. Command: `{r['command']}`.",
    ]
    if r["mixed"]:
        lines += ["", "Mixed batch, one forward (`adapter_names`, rows round-robin over K adapters), against the base "
                  "model and against one adapter for the whole batch:", "",
                  "| K adapters | rows × tokens | one adapter vs base | mixed vs base | mixed vs one adapter |",
                  "|---:|---:|---:|---:|---:|"]
    for k, row in r["mixed"].items():
        lines.append(f"| {k} | {row['batch']} × {r['seq']} | {_x(row['one'])} ({_x(row.get('peft_one'))}) | "
                     f"{_x(row['mixed'])} ({_x(row.get('peft_mixed'))}) | {_x(row['mixed_vs_one'])} "
                     f"({_x(row.get('peft_mixed_vs_one'))}) |")
    if r["generate"]:
        b, p, n = r["generate_shape"]
        lines += ["", f"`generate()`, {b} prompts × {p} tokens, {n} new tokens each (greedy): tokens/s and time "
                  "against the base model:", "",
                  "| variant | tokens/s | time vs base | peft tokens/s | peft time vs base |",
                  "|---|---:|---:|---:|---:|"]
    g = r["generate"]
    for key, label in (("base", "base model"), ("one", "one LoRA"), ("per_row", "per-row adapters (8 + a base row)"),
                       ("merged", "one LoRA, merged")) if g else ():
        peft_row = g.get("peft_" + key) if key != "base" else None
        lines.append(f"| {label} | {g[key]['tokens_per_s']:,.0f} | {_x(g[key]['time_vs_base'])} | "
                     f"{'–' if peft_row is None else format(peft_row['tokens_per_s'], ',.0f')} | "
                     f"{_x(None if peft_row is None else peft_row['time_vs_base'])} |")
    if r["merged"]:
        lines += ["", "Merged LoRA (and unmerged, for reference) against the base model:", "",
                  "| shape | merged | peft merged | unmerged |", "|---|---:|---:|---:|"]
    for shape, row in r["merged"].items():
        lines.append(f"| {shape} | {_x(row['merged'])} | {_x(row.get('peft_merged'))} | {_x(row['one'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default=None)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--ks", type=int, nargs="+", default=None, help="adapters per mixed batch (1 2 8 32)")
    parser.add_argument("--batch", type=int, default=None, help="rows of a mixed batch (at least K)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per row of a mixed batch")
    parser.add_argument("--gen-batch", type=int, default=None)
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens for generate()")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--gen-repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: steadier on shared machines)")
    parser.add_argument("--no-peft", dest="peft", action="store_false")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="tables to measure")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny model, K 1 and 8, few repeats")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    quick = args.quick and not gpu

    def pick(value: Any, gpu_value: Any, cpu_value: Any, quick_value: Any) -> Any:
        return value if value is not None else gpu_value if gpu else quick_value if quick else cpu_value

    args.size = pick(args.size, "0.6b", "small", "tiny")
    args.dtype = pick(args.dtype, "bfloat16", "float32", "float32")
    args.ks = pick(args.ks, [1, 2, 8, 32], [1, 2, 8, 32], [1, 8])
    args.batch = pick(args.batch, 16, 8, 8)
    args.seq = pick(args.seq, 512, 32, 16)
    args.gen_batch = pick(args.gen_batch, 16, 4, 4)
    args.prompt = pick(args.prompt, 128, 16, 8)
    args.new_tokens = pick(args.new_tokens, 64, 16, 8)
    args.repeats = pick(args.repeats, 30, 21, 3)
    args.gen_repeats = pick(args.gen_repeats, 15, 5, 2)
    args.warmup = pick(args.warmup, 5, 3, 1)
    args.merged_repeats = args.repeats * (2 if gpu else 5)  # ratios near 1.00: more samples for the median
    args.merged_small = (1, 128) if gpu else (1, 16)
    args.merged_large = (16, 512) if gpu else (8, 32)
    if not gpu:
        torch.set_num_threads(args.threads)
    results = measure(args)
    results["seq"] = args.seq
    table = markdown(results)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"serve-{'gpu' if gpu else 'cpu'}-{args.size}")
    write_results(stem, results, table)


if __name__ == "__main__":
    main()
