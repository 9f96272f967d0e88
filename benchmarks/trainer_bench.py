"""Training throughput and peak memory of ``AdapterTrainer`` on a Qwen3-shaped causal LM (issue 8).

Runs, each on a fresh copy of the same randomly initialised model, with the same seeded random
token data, batch size, sequence length and number of steps:

* ``lora_qv_r8``: ``adapters.AdapterTrainer`` with ``lora[r=8, alpha=16]`` (query and value);
* ``seq_bn``: ``adapters.AdapterTrainer`` with a sequential bottleneck adapter;
* ``peft_lora_qv_r8``: ``transformers.Trainer`` on a ``peft`` LoRA model (r=8, alpha=16, q/v), when
  ``peft`` is importable;
* ``frozen_base``: the reference, a plain loop of forward + backward of the frozen model (loss from
  the LM head, labels = input ids) with gradients flowing to the input embeddings, no optimizer.

Every run takes ``warmup + steps`` steps; the first ``warmup`` are left out of the timing. All runs
are repeated ``rounds`` times round-robin (each time on a fresh model copy) and the timed steps of
the rounds pooled. The step time is the median wall time of one optimisation step (from
``on_step_begin`` to ``on_step_end`` of a ``TrainerCallback``, with CUDA synchronisation on GPU),
tokens/s = batch * seq / step time. Peak memory is ``torch.cuda.max_memory_allocated`` over the
whole run, model weights included (GPU only; ``None`` on CPU).

The model is built directly in the benchmark dtype (bfloat16 on GPU, float32 on CPU); the Trainer's
``bf16``/``fp16`` autocast flags stay off, so every run computes in the same dtype.

Usage::

    python benchmarks/trainer_bench.py --device cpu                    # tiny model, about a minute
    python benchmarks/trainer_bench.py --device cuda                   # ~0.6B Qwen3-shaped, bf16

Results go to ``benchmarks/results/trainer-<device>-<size>-<batch>x<seq>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import SIZES, write_results  # benchmarks/ is not a package

ADAPTER_METHODS: dict[str, str] = {
    "lora_qv_r8": "lora[r=8, alpha=16]",
    "seq_bn": "seq_bn",
}


def build_causal_lm(size: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """A seeded, randomly initialised Qwen3ForCausalLM of ``SIZES[size]`` with tied embeddings, frozen.

    The benchmark keeps this template on the CPU and moves a fresh copy to the device for every run, so
    peak GPU memory counts only the model of the run being measured.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(**SIZES[size], max_position_embeddings=4096, tie_word_embeddings=True)
    model = Qwen3ForCausalLM(config).to(device=device, dtype=dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class TokenDataset(torch.utils.data.Dataset):
    """Fixed random token sequences; each item is ``{"input_ids": ids, "labels": ids}``."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_mib(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def _step_timer(device: str) -> tuple[Any, list[float]]:
    """A TrainerCallback that records the wall time of every optimisation step."""
    from transformers import TrainerCallback

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.start = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            _sync(device)
            self.start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            _sync(device)
            times.append(time.perf_counter() - self.start)

    return StepTimer(), times


def _training_args(args: argparse.Namespace, output_dir: str) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        eval_strategy="no",
        per_device_train_batch_size=args.batch,
        max_steps=args.warmup + args.steps,
        learning_rate=1e-4,
        bf16=False,
        fp16=False,
        use_cpu=not args.device.startswith("cuda"),
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )


def _train_with(trainer_cls: type, model: torch.nn.Module, dataset: TokenDataset,
                args: argparse.Namespace) -> dict[str, Any]:
    """Train ``model`` with ``trainer_cls``; return the timed steps' wall times (s) and peak memory (MiB)."""
    from transformers.trainer_callback import PrinterCallback

    timer, times = _step_timer(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trainer_cls(model=model, args=_training_args(args, tmp), train_dataset=dataset,
                              callbacks=[timer])
        trainer.remove_callback(PrinterCallback)  # no end-of-training metrics dump in the output
        _reset_memory(args.device)
        trainer.train()
        peak = _peak_mib(args.device)
        del trainer
    if len(times) != args.warmup + args.steps:
        raise RuntimeError(f"expected {args.warmup + args.steps} timed steps, got {len(times)}")
    return {"times": times[args.warmup:], "peak_mib": peak}


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_adapters(template: torch.nn.Module, config: str, dataset: TokenDataset,
                 args: argparse.Namespace) -> dict[str, Any]:
    """AdapterTrainer on a fresh copy of ``template`` with one adapter of ``config``."""
    import adapters

    model = copy.deepcopy(template).to(args.device)
    adapters.init(model)
    model.add_adapter("bench", config=config)
    model.train_adapter("bench")
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        head.weight.requires_grad_(False)  # untied LM head: keep it frozen like the rest of the base
    row = {"trainable": _trainable(model)}
    row.update(_train_with(adapters.AdapterTrainer, model, dataset, args))
    del model
    return row


def run_peft(template: torch.nn.Module, dataset: TokenDataset, args: argparse.Namespace) -> dict[str, Any] | None:
    """transformers.Trainer on a peft LoRA (r=8, alpha=16, q/v) copy of ``template``; None without peft."""
    try:
        import peft
    except ImportError:
        return None
    from transformers import Trainer

    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    model = peft.get_peft_model(copy.deepcopy(template).to(args.device), config)
    row = {"trainable": _trainable(model)}
    row.update(_train_with(Trainer, model, dataset, args))
    del model
    return row


def run_frozen_base(template: torch.nn.Module, dataset: TokenDataset, args: argparse.Namespace) -> dict[str, Any]:
    """Forward + backward of the frozen model with input-embedding gradients; a plain loop, no optimizer."""
    device = args.device
    model = copy.deepcopy(template).to(device)
    model.train()  # same mode as under the Trainer
    embed = model.get_input_embeddings()
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=False, drop_last=False)
    batches = [b["input_ids"] for b in loader]
    times: list[float] = []
    _reset_memory(device)
    for i in range(args.warmup + args.steps):
        ids_cpu = batches[i % len(batches)]
        _sync(device)
        start = time.perf_counter()
        ids = ids_cpu.to(device)
        x = embed(ids).detach().requires_grad_(True)
        loss = model(inputs_embeds=x, labels=ids).loss
        loss.backward()
        del x, loss
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = _peak_mib(device)
    del model
    return {"trainable": 0, "times": times[args.warmup:], "peak_mib": peak}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every benchmark and return the results dictionary."""
    import adapters

    device = args.device
    gpu = device.startswith("cuda")
    dtype = torch.bfloat16 if gpu else torch.float32
    template = build_causal_lm(args.size, dtype, "cpu")
    vocab = template.config.vocab_size
    n_rows = args.batch * (args.warmup + args.steps)
    gen = torch.Generator().manual_seed(0)
    dataset = TokenDataset(torch.randint(0, vocab, (n_rows, args.seq), generator=gen))
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if gpu else platform.processor() or "cpu",
        "torch": torch.__version__,
        "size": args.size,
        "dtype": str(dtype).removeprefix("torch."),
        "params": sum(p.numel() for p in template.parameters()),
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "methods": {},
    }
    runs: dict[str, Callable[[], dict[str, Any] | None]] = {"frozen_base": lambda: run_frozen_base(
        template, dataset, args)}
    for name, config in ADAPTER_METHODS.items():
        if not adapters.registry.has_config_string(config.split("[")[0]):
            print(f"- {name}: plugin not installed, skipped")
            continue
        runs[name] = lambda config=config: run_adapters(template, config, dataset, args)
    if args.peft:
        runs["peft_lora_qv_r8"] = lambda: run_peft(template, dataset, args)
    tokens = args.batch * args.seq
    pooled: dict[str, dict[str, Any]] = {}
    for r in range(args.rounds):  # round-robin, so drifts of a shared machine hit every run alike
        for name, fn in runs.items():
            print(f"- round {r + 1}/{args.rounds}: {name}", flush=True)
            row = fn()
            gc.collect()
            if gpu:
                torch.cuda.empty_cache()
            if row is None:
                print("  peft not installed, skipped")
                continue
            peak = "" if row["peak_mib"] is None else f", peak {row['peak_mib']:.0f} MiB"
            print(f"  median step {1e3 * statistics.median(row['times']):.1f} ms{peak}", flush=True)
            acc = pooled.setdefault(name, {"trainable": row["trainable"], "times": [], "peak_mib": row["peak_mib"]})
            acc["times"].extend(row["times"])
            if row["peak_mib"] is not None:
                acc["peak_mib"] = max(acc["peak_mib"], row["peak_mib"])
    for name, acc in pooled.items():
        step_ms = 1e3 * statistics.median(acc["times"])
        results["methods"][name] = {"trainable": acc["trainable"], "step_ms": step_ms,
                                    "tokens_per_s": tokens / (step_ms / 1e3), "peak_mib": acc["peak_mib"]}
    base = results["methods"]["frozen_base"]
    for row in results["methods"].values():
        row["step_ratio"] = row["step_ms"] / base["step_ms"]
        row["mem_ratio"] = row["peak_mib"] / base["peak_mib"] if row["peak_mib"] and base["peak_mib"] else None
    return results


def markdown(results: dict[str, Any]) -> str:
    """The results as a markdown table with a one-paragraph header."""
    lines = [
        f"Training throughput, Qwen3-shaped random causal LM, {results['size']} ({results['params'] / 1e6:.1f}M "
        f"params, tied embeddings), {results['dtype']}, {results['device']}, torch {results['torch']}, "
        f"{results['date']}. Batch {results['batch']} x {results['seq']} tokens, median step time over "
        f"{results['rounds']} x {results['steps']} steps (round-robin rounds, each run after {results['warmup']} "
        "warm-up steps). Adapter runs use "
        "`adapters.AdapterTrainer`, peft runs `transformers.Trainer` (default AdamW); the frozen base is a "
        "plain forward + backward loop with input-embedding gradients and no optimizer. Ratios are against "
        "the frozen base. Peak memory is `torch.cuda.max_memory_allocated` over the whole run, model "
        "weights included.",
        "",
        "| method | trainable | step ms | tokens/s | step vs base | peak MiB | mem vs base |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in results["methods"].items():
        peak = f"{row['peak_mib']:.0f}" if row["peak_mib"] is not None else "–"
        mem = f"{row['mem_ratio']:.3f}×" if row["mem_ratio"] is not None else "–"
        lines.append(
            f"| {name} | {row['trainable']:,} | {row['step_ms']:.1f} | {row['tokens_per_s']:,.0f} | "
            f"{row['step_ratio']:.3f}× | {peak} | {mem} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="default tiny on CPU, 0.6b on GPU")
    parser.add_argument("--batch", type=int, default=None, help="default 8 on GPU, 4 on CPU")
    parser.add_argument("--seq", type=int, default=None, help="default 512 on GPU, 128 on CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 30 on GPU, 20 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps (default 5 on GPU, 3 on CPU)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="round-robin repetitions of all runs, step times pooled (default 1 on GPU, 3 on CPU)")
    parser.add_argument("--no-peft", dest="peft", action="store_false", help="skip the peft run")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.size = args.size or ("0.6b" if gpu else "tiny")
    args.batch = args.batch or (8 if gpu else 4)
    args.seq = args.seq or (512 if gpu else 128)
    args.steps = args.steps or (30 if gpu else 20)
    args.rounds = args.rounds or (1 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 3)
    if not gpu:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    for category in (UserWarning, FutureWarning):  # library chatter, not results
        warnings.filterwarnings("ignore", category=category)
    results = run(args)
    os.makedirs(args.out, exist_ok=True)
    write_results(os.path.join(args.out, f"trainer-{'gpu' if gpu else 'cpu'}-{args.size}-{args.batch}x{args.seq}"),
                  results, markdown(results))


if __name__ == "__main__":
    main()
