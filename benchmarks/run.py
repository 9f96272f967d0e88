"""Speed and memory of adapter methods against the frozen base model (and peft where installed).

Every figure is a ratio against the frozen base model measured in the same run, interleaved
(base, method, base, method, ...) and reduced to medians after warm-up:

* ``train``: one training step of the adapter (forward + backward + optimizer step) against the
  frozen base model's forward + backward with gradients flowing to the inputs;
* ``infer_b1`` / ``infer_b16``: inference latency at batch 1 x 128 and batch 16 x 512 (GPU) or
  smaller shapes on CPU, unmerged and, for mergeable methods, merged;
* ``setup``: ``adapters.init`` + ``add_adapter`` wall time (seconds, not a ratio);
* ``peak_mem``: peak GPU memory of the training step against the base step (GPU only).

Usage::

    python benchmarks/run.py --device cpu                    # small Qwen3-shaped model, minutes
    python benchmarks/run.py --device cuda --size 0.6b       # ~0.6B Qwen3-shaped model in bf16

Results go to ``benchmarks/results/<device>-<size>.json`` and ``.md``.
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
import time
from collections.abc import Callable
from typing import Any

import torch

SIZES = {
    # hidden, layers, heads, kv heads, head dim, intermediate, vocab
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 intermediate_size=352, vocab_size=1024),
    "small": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                  intermediate_size=704, vocab_size=4096),
    "0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 intermediate_size=3072, vocab_size=151936),
}

#: name -> (adapters config string, peft config factory name or None)
METHODS: dict[str, tuple[str, str | None]] = {
    "lora_qv_r8": ("lora[r=8, alpha=16]", "lora_qv_r8"),
    "lora_all_r16": ("lora[r=16, alpha=32, attn_matrices=['q','k','v','o'], intermediate_lora=True, "
                     "output_lora=True]", "lora_all_r16"),
    "ia3": ("ia3", "ia3"),
    "dora": ("dora[r=8, alpha=16]", "dora"),
    "vera": ("vera[r=256]", "vera"),
    "seq_bn": ("seq_bn", None),
    "par_bn": ("par_bn", None),
    "loreft": ("loreft", None),
    # 20 virtual tokens; prefix tuning trains the MLP (bottleneck 512) and is measured ejected for inference
    "prompt_tuning": ("prompt_tuning[prompt_length=20]", "prompt_tuning"),
    "prefix_tuning": ("prefix_tuning[prefix_length=20]", "prefix_tuning"),
}
MERGEABLE = {"lora_qv_r8", "lora_all_r16", "ia3", "dora", "vera"}
#: methods whose training form is ejected before the inference measurements (peft: its inference form)
EJECT = {"prefix_tuning"}


def build_base(size: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    # no key/value cache: training steps never read one (in eval mode the model would build one per call, and
    # per-layer cache state makes each compiled layer a new graph under regional torch.compile)
    config = Qwen3Config(**SIZES[size], max_position_embeddings=4096, use_cache=False)
    model = Qwen3Model(config).to(device=device, dtype=dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timeit(fn: Callable[[], Any], device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def interleaved(fns: dict[str, Callable[[], Any]], device: str, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds of each function, run round-robin so drifts hit all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            samples[key].append(_timeit(fn, device))
    return {k: statistics.median(v) for k, v in samples.items()}


def peak_memory(fn: Callable[[], Any], device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def base_train_step(model: torch.nn.Module, embeds: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        x = embeds.detach().requires_grad_(True)
        out = model(inputs_embeds=x).last_hidden_state
        out.float().pow(2).mean().backward()

    return step


def adapter_train_step(model: torch.nn.Module, embeds: torch.Tensor) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    # fused AdamW on GPU: what transformers' Trainer uses by default there (optim="adamw_torch_fused")
    opt = torch.optim.AdamW(params, lr=1e-4, fused=embeds.is_cuda)

    def step() -> None:
        x = embeds.detach().requires_grad_(True)
        out = model(inputs_embeds=x).last_hidden_state
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def infer(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    @torch.inference_mode()
    def run() -> None:
        model(input_ids=ids)

    return run


def _randomise_adapter(model: torch.nn.Module) -> None:
    """Give zero-initialised adapter weights values, so merged and unmerged paths do real work."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen).to(p) * 1e-3)


def adapter_copy(base: torch.nn.Module, config: str, name: str = "bench", randomise: bool = False) -> torch.nn.Module:
    """A copy of ``base`` with adapter ``name`` (``config``) added and set to train, in eval mode (no dropout);
    ``randomise``: its zero-initialised weights given values (:func:`_randomise_adapter`)."""
    import adapters

    model = copy.deepcopy(base)
    adapters.init(model)
    model.add_adapter(name, config=config)
    model.train_adapter(name)
    model.eval()
    if randomise:
        _randomise_adapter(model)
    return model


def peft_model(base: torch.nn.Module, key: str) -> torch.nn.Module | None:
    try:
        import peft
    except ImportError:
        return None
    configs = {
        "lora_qv_r8": lambda: peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        "lora_all_r16": lambda: peft.LoraConfig(r=16, lora_alpha=32, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]),
        "ia3": lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "up_proj"],
                                      feedforward_modules=["up_proj"]),
        "dora": lambda: peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_dora=True),
        "vera": lambda: peft.VeraConfig(r=256, target_modules=["q_proj", "v_proj"]),
        "prompt_tuning": lambda: peft.PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=20),
        "prefix_tuning": lambda: peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=20,
                                                         prefix_projection=True, encoder_hidden_size=512),
        # what a saved peft prefix loads as: the prefixes themselves (no MLP)
        "prefix_tuning_infer": lambda: peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=20,
                                                               inference_mode=True),
    }
    if key not in configs:
        return None
    try:
        return peft.get_peft_model(copy.deepcopy(base), configs[key]())
    except Exception as exc:  # noqa: BLE001 - report and go on
        print(f"  peft {key}: could not build ({exc})")
        return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    import adapters

    device = args.device
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    base = build_base(args.size, dtype, device)
    hidden = base.config.hidden_size
    vocab = base.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    tb, tl = args.train_shape
    embeds = torch.randn(tb, tl, hidden, generator=gen).to(device=device, dtype=dtype)
    shapes = {"infer_small": args.infer_small, "infer_large": args.infer_large}
    ids = {k: torch.randint(0, vocab, tuple(v), generator=gen).to(device) for k, v in shapes.items()}
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "size": args.size,
        "dtype": args.dtype,
        "params": sum(p.numel() for p in base.parameters()),
        "train_shape": [tb, tl],
        "infer_shapes": shapes,
        "methods": {},
    }
    for name in args.methods:
        config, peft_key = METHODS[name]
        if not adapters.registry.has_config_string(config.split("[")[0]):
            print(f"- {name}: plugin not installed, skipped")
            continue
        print(f"- {name}")
        model = copy.deepcopy(base)
        start = time.perf_counter()
        adapters.init(model)
        model.add_adapter("bench", config=config)
        setup_s = time.perf_counter() - start
        model.train_adapter("bench")
        model.eval()  # no dropout noise in timing; gradients still flow
        _randomise_adapter(model)
        row: dict[str, Any] = {"setup_s": setup_s,
                               "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
        fns = {"base": base_train_step(base, embeds), "ours": adapter_train_step(model, embeds)}
        theirs = peft_model(base, peft_key) if (peft_key and args.peft) else None
        if theirs is not None:
            theirs.eval()
            _randomise_adapter(theirs)
            fns["peft"] = adapter_train_step(theirs, embeds)
        t = interleaved(fns, device, args.warmup, args.repeats)
        row["train"] = {k: t[k] / t["base"] for k in t if k != "base"}
        row["train_base_ms"] = 1e3 * t["base"]
        mem_base = peak_memory(fns["base"], device)
        if mem_base:
            row["peak_mem"] = {k: peak_memory(fns[k], device) / mem_base for k in fns if k != "base"}
        if name in EJECT and not args.train_only:
            from adapters_prompt import eject_prefix

            eject_prefix(model, "bench")
            if theirs is not None:
                theirs = peft_model(base, f"{peft_key}_infer") or theirs
                theirs.eval()
                _randomise_adapter(theirs)
        for key, tensor in ({} if args.train_only else ids).items():
            fns_i = {"base": infer(base, tensor), "ours": infer(model, tensor)}
            if theirs is not None:
                fns_i["peft"] = infer(theirs, tensor)
            t = interleaved(fns_i, device, args.warmup, args.repeats)
            row[key] = {k: t[k] / t["base"] for k in t if k != "base"}
            row[f"{key}_base_ms"] = 1e3 * t["base"]
        if name in MERGEABLE and not args.train_only:
            model.merge_adapter("bench")
            if theirs is not None:
                theirs.merge_adapter()
            for key, tensor in ids.items():
                fns_m = {"base": infer(base, tensor), "ours": infer(model, tensor)}
                if theirs is not None:
                    fns_m["peft"] = infer(theirs, tensor)
                t = interleaved(fns_m, device, args.warmup, args.repeats)
                row[f"{key}_merged"] = {k: t[k] / t["base"] for k in t if k != "base"}
            model.reset_adapter()
        results["methods"][name] = row
        print("  " + json.dumps({k: v for k, v in row.items() if not k.endswith("_ms")}, default=_fmt))
        del model, theirs, fns
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return results


def _fmt(value: Any) -> Any:
    return round(value, 3) if isinstance(value, float) else value


def _base_times(results: dict[str, Any]) -> dict[str, float]:
    rows = list(results["methods"].values())
    if not rows:
        return {}
    keys = {"train": "train_base_ms", "infer small": "infer_small_base_ms", "infer large": "infer_large_base_ms"}
    return {k: statistics.median(r[v] for r in rows) for k, v in keys.items() if v in rows[0]}


def markdown(results: dict[str, Any]) -> str:
    s, l_ = results["infer_shapes"]["infer_small"], results["infer_shapes"]["infer_large"]
    small, large = f"{s[0]}x{s[1]}", f"{l_[0]}x{l_[1]}"
    lines = [
        f"Qwen3-shaped random model, {results['size']} ({results['params'] / 1e6:.1f}M params), {results['dtype']}, "
        f"{results['device']}, torch {results['torch']}, {results['date']}. Ratios against the frozen base model "
        f"(train: fwd+bwd with input gradients, batch {results['train_shape'][0]}x{results['train_shape'][1]}); "
        "medians of interleaved runs. `peft` in brackets where measured. Base model: "
        + ", ".join(f"{k} {v:.1f} ms" for k, v in _base_times(results).items()) + ".",
        "",
        f"| method | trainable | init + add | train step | peak mem | infer {small} | infer {large} "
        f"| merged {small} | merged {large} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(row: dict[str, Any], key: str) -> str:
        value = row.get(key)
        if not value:
            return "–"
        text = f"{value['ours']:.3f}×"
        if "peft" in value:
            text += f" ({value['peft']:.3f}×)"
        return text

    for name, row in results["methods"].items():
        lines.append(
            f"| {name} | {row['trainable']:,} | {1e3 * row['setup_s']:.0f} ms | {cell(row, 'train')} | "
            f"{cell(row, 'peak_mem')} | "
            f"{cell(row, 'infer_small')} | {cell(row, 'infer_large')} | {cell(row, 'infer_small_merged')} | "
            f"{cell(row, 'infer_large_merged')} |"
        )
    return "\n".join(lines) + "\n"


def write_results(stem: str, results: dict[str, Any], table: str) -> None:
    """Write ``<stem>.json`` and ``<stem>.md`` and print the table."""
    with open(stem + ".json", "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=2, default=_fmt)
    with open(stem + ".md", "w", encoding="utf-8") as fh:
        fh.write(table)
    print()
    print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default=None)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--no-peft", dest="peft", action="store_false")
    parser.add_argument("--train-shape", type=int, nargs=2, default=None, metavar=("BATCH", "SEQ"),
                        help="training batch shape (default 8 512 on GPU, 4 128 on CPU)")
    parser.add_argument("--train-only", action="store_true", help="skip the inference measurements")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.size = args.size or ("0.6b" if gpu else "small")
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.repeats = args.repeats or (30 if gpu else 7)
    args.warmup = args.warmup or (5 if gpu else 2)
    args.train_shape = tuple(args.train_shape) if args.train_shape else ((8, 512) if gpu else (4, 128))
    args.infer_small = (1, 128) if gpu else (1, 64)
    args.infer_large = (16, 512) if gpu else (8, 128)
    if not gpu:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    results = run(args)
    os.makedirs(args.out, exist_ok=True)
    batch, seq = args.train_shape
    write_results(os.path.join(args.out, f"{'gpu' if gpu else 'cpu'}-{args.size}-train{batch}x{seq}"),
                  results, markdown(results))


if __name__ == "__main__":
    main()
