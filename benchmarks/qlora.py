"""QLoRA: training step time and peak memory on a 4-bit NF4 base, ours against peft + bitsandbytes (issue 20).

Both frameworks train the same model, loaded the way users load it: a Qwen3-shaped causal LM with
seeded random bf16 weights is saved once to a temporary directory and loaded for each run with
``AutoModelForCausalLM.from_pretrained(dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16),
dtype=torch.bfloat16)``. Each framework then follows its own QLoRA recipe with the same settings:

* ``ours``: ``adapters.prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc)``,
  ``adapters.init``, ``LoRAConfig(r=16, alpha=32, target_modules="all-linear")``, ``train_adapter``
  (adapter weights in the compute dtype, bf16);
* ``peft``: ``peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc)``,
  ``get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))``
  (peft's defaults: its prepare step casts every bf16 weight that is not 4-bit to float32, and LoRA
  weights are float32).

LoRA sits on every linear projection of the Transformer layers (q, k, v, o, gate, up, down). One step
is forward (``labels = input_ids``, ``use_cache=False``) + backward + ``AdamW`` step, batch × sequence
of seeded random tokens (8 × 512 on GPU). For each model size and each gradient-checkpointing setting,
the two frameworks' models are resident together and their steps interleaved (ours, peft, peft, ours,
...) after warm-up; the step time is the median. Peak memory (GPU) = the framework's resident memory
(its model as loaded and set up, plus its optimizer state) + the largest transient of its steps
(``max_memory_allocated`` above what was allocated when the step began); on CPU it is not measured.

``--casts`` measures instead what each float32 cast of a QLoRA prepare step costs (on ``ours``): none
(our default), the embeddings (= the tied LM head: the hidden states become float32), and everything
peft casts (embeddings, head, norms); step time, peak memory (GPU) or the bytes saved for backward (CPU),
and the loss after the steps (the same data and adapter initialisation for every variant), to see what
the precision buys.

Usage::

    python benchmarks/qlora.py --tiny                          # CPU smoke test: tiny shapes, seconds
    python benchmarks/qlora.py --device cuda                   # 0.6B and 4B shapes, checkpointing on and off
    python benchmarks/qlora.py --device cuda --models 4b --checkpointing on
    python benchmarks/qlora.py --device cuda --variants ours_fp32_adapters peft_bf16_adapters   # same adapter dtypes
    python benchmarks/qlora.py --casts --size small            # cast costs on CPU (--device cuda: on GPU)

Results go to ``benchmarks/results/qlora-<device>-<what>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import write_results  # benchmarks/ is not a package

SHAPES = {
    # hidden, layers, heads / KV heads, head dim, FFN, vocab; embeddings tied as in Qwen3-0.6B / -4B
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 intermediate_size=352, vocab_size=1024),
    "small": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                  intermediate_size=1536, vocab_size=8192),
    "0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 intermediate_size=3072, vocab_size=151936),
    "4b": dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               intermediate_size=9728, vocab_size=151936),
}
CASTS = ("none", "embeddings", "peft_all")
LR = 1e-4  # AdamW's learning rate (--lr)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _allocated(device: str) -> int:
    return torch.cuda.memory_allocated() if device.startswith("cuda") else 0


def save_random_model(shape: str, device: str, directory: str) -> None:
    """A seeded random bf16 Qwen3ForCausalLM of ``SHAPES[shape]`` (built on ``device``), saved to ``directory``."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    del model
    gc.collect()


def load_4bit(directory: str, device: str) -> torch.nn.Module:
    """The saved model, quantized on load as QLoRA tutorials do (NF4, double quantization, bf16 compute)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(directory, quantization_config=quant, dtype=torch.bfloat16,
                                                device_map={"": device})


def apply_cast(model: torch.nn.Module, cast: str) -> None:
    """Cast to float32 what ``cast`` names (for ``--casts``): ``"embeddings"`` (and so the tied LM head; the
    hidden states then are float32 throughout), ``"peft_all"`` (every bf16 / fp16 weight that is not 4-bit,
    as peft's prepare step: embeddings, head, norms). Norms alone cannot be cast: a float32 norm makes
    the final hidden states float32, which a bf16 (tied) LM head refuses."""
    from adapters.quantized import is_quantized_tensor

    if cast == "embeddings":
        params = list(model.get_input_embeddings().parameters())
    elif cast == "peft_all":
        params = [p for p in model.parameters() if not is_quantized_tensor(p)]
    else:
        params = []
    for p in params:
        if p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()


def setup_ours(model: torch.nn.Module, checkpointing: bool, rank: int, cast: str = "none",
               adapter_dtype: str | None = None, reentrant: bool | None = None) -> torch.nn.Module:
    import adapters
    from adapters import LoRAConfig

    kwargs = None if reentrant is None else {"use_reentrant": reentrant}
    model = adapters.prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                     gradient_checkpointing_kwargs=kwargs)
    apply_cast(model, cast)
    adapters.init(model)
    model.add_adapter("qlora", config=LoRAConfig(r=rank, alpha=2 * rank, target_modules="all-linear",
                                                 init_weights_seed=0, dtype=adapter_dtype))
    model.train_adapter("qlora")
    return model


def setup_peft(model: torch.nn.Module, checkpointing: bool, rank: int, autocast_adapter_dtype: bool = True
               ) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"),
                               autocast_adapter_dtype=autocast_adapter_dtype)
    model.train()
    return model


def setup_base(model: torch.nn.Module, checkpointing: bool, rank: int, reentrant: bool | None = None
               ) -> torch.nn.Module:
    """The frozen 4-bit base, no adapter: forward + backward (to the input embeddings, as a QLoRA step's
    backward must reach the first adapted layer), the reference of the ratios."""
    import adapters

    kwargs = None if reentrant is None else {"use_reentrant": reentrant}
    model = adapters.prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                     gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()
    model.train()
    return model


#: the runs of the comparison: the frozen base, ours and peft as their recipes go, and (``--variants``) each
#: with the other's adapter dtype: ours with float32 LoRA weights, peft with bf16 ones
VARIANTS: dict[str, Callable[[torch.nn.Module, bool, int], torch.nn.Module]] = {
    "base": setup_base,
    "ours": setup_ours,
    "peft": setup_peft,
    "ours_fp32_adapters": lambda m, g, r: setup_ours(m, g, r, adapter_dtype="float32"),
    "peft_bf16_adapters": lambda m, g, r: setup_peft(m, g, r, autocast_adapter_dtype=False),
    "ours_reentrant": lambda m, g, r: setup_ours(m, g, r, reentrant=True),
    "ours_non_reentrant": lambda m, g, r: setup_ours(m, g, r, reentrant=False),
    "base_reentrant": lambda m, g, r: setup_base(m, g, r, reentrant=True),
}


class Run:
    """One framework's model, optimizer and step, with its measurements."""

    def __init__(self, name: str, model: torch.nn.Module, batch: torch.Tensor, device: str, resident: int) -> None:
        self.name, self.model, self.batch, self.device = name, model, batch, device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params or [torch.zeros(1, requires_grad=True)], lr=LR)
        self.resident = resident
        self.times: list[float] = []
        self.transients: list[int] = []
        self.losses: list[float] = []

    def step(self, record: bool) -> None:
        device = self.device
        _sync(device)
        before = _allocated(device)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        loss = self.model(input_ids=self.batch, labels=self.batch, use_cache=False).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        _sync(device)
        elapsed = time.perf_counter() - start
        self.losses.append(float(loss.detach()))
        if record:
            self.times.append(elapsed)
            if device.startswith("cuda"):
                self.transients.append(torch.cuda.max_memory_allocated() - before)

    def optimizer_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.optimizer.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor))

    def saved_bytes(self) -> int:
        """Bytes of the tensors autograd keeps for backward in one forward (the activations outside
        checkpointed regions), counted once per storage: the CPU stand-in for a memory peak."""
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = self.model(input_ids=self.batch, labels=self.batch, use_cache=False).loss
        loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        return sum(storages.values())

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step_ms": 1000 * statistics.median(self.times), "loss_last": self.losses[-1]}
        if self.transients:
            out["peak_mib"] = (self.resident + self.optimizer_bytes() + max(self.transients)) / 2**20
            out["resident_mib"] = self.resident / 2**20
        else:
            out["saved_for_backward_mib"] = self.saved_bytes() / 2**20
        from adapters.quantized import is_quantized_tensor

        out["float_weights_mib"] = sum(p.numel() * p.element_size() for p in self.model.parameters()
                                       if not is_quantized_tensor(p)) / 2**20
        out["trainable"] = sum(p.numel() for p in self.params)
        out["adapter_dtypes"] = sorted({str(p.dtype).removeprefix("torch.") for p in self.params})
        return out


def _load(name: str, setup: Callable[[torch.nn.Module], torch.nn.Module], directory: str, device: str,
          batch: torch.Tensor) -> Run:
    gc.collect()
    start = _allocated(device)
    model = setup(load_4bit(directory, device))
    return Run(name, model, batch, device, _allocated(device) - start)


def interleave(runs: list[Run], warmup: int, steps: int) -> None:
    """Warm-up steps, then ``steps`` rounds, the order reversed every round (ABBA) so drifts hit all alike."""
    for _ in range(warmup):
        for run in runs:
            run.step(record=False)
    for i in range(steps):
        for run in (runs if i % 2 == 0 else runs[::-1]):
            run.step(record=True)


def compare(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """Ours against peft for every model shape and checkpointing setting."""
    results: dict[str, Any] = {}
    lines = ["| model | checkpointing | frozen base ms | ours step ms | peft step ms | ours / base | peft / base "
             "| ours / peft | ours peak MiB | peft peak MiB | ours / peft |", "|---" * 11 + "|"]
    extra = ["", "| model | checkpointing | run | step ms | step / peft | peak / peft |", "|---|---|---|---|---|---|"]
    for shape in args.models:
        directory = tempfile.mkdtemp(prefix=f"qlora-{shape}-")
        try:
            save_random_model(shape, args.device, directory)
            gen = torch.Generator().manual_seed(0)
            batch = torch.randint(4, SHAPES[shape]["vocab_size"], (args.batch, args.seq), generator=gen)
            batch = batch.to(args.device)
            for gc_on in args.checkpointing:
                runs = [_load(name, lambda m, g=gc_on, f=VARIANTS[name]: f(m, g, args.rank), directory, args.device,
                              batch) for name in args.variants]
                interleave(runs, args.warmup, args.steps)
                row = {run.name: run.summary() for run in runs}
                for name, summary in row.items():  # every run against peft's recipe
                    summary["step_vs_peft"] = summary["step_ms"] / row["peft"]["step_ms"]
                    if "peak_mib" in summary:
                        summary["peak_vs_peft"] = summary["peak_mib"] / row["peft"]["peak_mib"]
                    if name not in ("ours", "peft", "base"):
                        peak = summary.get("peak_vs_peft", float("nan"))
                        extra.append(f"| {shape} | {'on' if gc_on else 'off'} | {name} | {summary['step_ms']:.1f} | "
                                     f"{summary['step_vs_peft']:.2f} | {peak:.2f} |")
                results[f"{shape}/checkpointing={'on' if gc_on else 'off'}"] = row
                ours, peft, base = row["ours"], row["peft"], row["base"]["step_ms"]
                mem = "| – | – | – |"
                if "peak_mib" in ours:
                    a, b = ours["peak_mib"], peft["peak_mib"]
                    mem = f"| {a:.0f} | {b:.0f} | {a / b:.2f} |"
                lines.append(f"| {shape} | {'on' if gc_on else 'off'} | {base:.1f} | {ours['step_ms']:.1f} | "
                             f"{peft['step_ms']:.1f} | {ours['step_ms'] / base:.2f} | {peft['step_ms'] / base:.2f} "
                             f"| {ours['step_ms'] / peft['step_ms']:.2f} {mem}")
                print(lines[-1], flush=True)
                del runs
                gc.collect()
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    return results, "\n".join(lines + (extra if len(extra) > 3 else [])) + "\n"


def casts(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """What each float32 cast costs on our QLoRA setup (see the module docstring)."""
    shape = args.size
    directory = tempfile.mkdtemp(prefix=f"qlora-casts-{shape}-")
    gpu = args.device.startswith("cuda")
    memory = "peak MiB" if gpu else "saved for backward MiB"
    lines = [f"| cast to float32 | step ms | {memory} | float weights MiB | loss after {args.warmup + args.steps} "
             "steps |", "|---|---|---|---|---|"]
    results: dict[str, Any] = {}
    try:
        save_random_model(shape, args.device, directory)
        gen = torch.Generator().manual_seed(0)
        batch = torch.randint(4, SHAPES[shape]["vocab_size"], (args.batch, args.seq), generator=gen).to(args.device)
        gc_on = args.checkpointing[0]
        runs = [_load(cast, lambda m, c=cast: setup_ours(m, gc_on, args.rank, c), directory, args.device, batch)
                for cast in CASTS]
        interleave(runs, args.warmup, args.steps)
        for run in runs:
            row = results[run.name] = run.summary()
            mem = row["peak_mib"] if gpu else row["saved_for_backward_mib"]
            lines.append(f"| {run.name} | {row['step_ms']:.1f} | {mem:.1f} | {row['float_weights_mib']:.1f} "
                         f"| {row['loss_last']:.4f} |")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return results, "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and few steps (a CPU smoke test)")
    parser.add_argument("--models", nargs="+", choices=list(SHAPES), default=None)
    parser.add_argument("--checkpointing", choices=["on", "off", "both"], default="both")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["ours", "peft"],
                        help="runs of the comparison (ours and peft always run)")
    parser.add_argument("--casts", action="store_true", help="measure the float32 casts of the prepare step")
    parser.add_argument("--size", choices=list(SHAPES), default=None, help="the model shape of --casts")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    globals()["LR"] = args.lr
    gpu = args.device.startswith("cuda")
    small = args.tiny or not gpu
    args.models = args.models or (["tiny"] if small else ["0.6b", "4b"])
    args.size = args.size or ("tiny" if args.tiny else "small" if not gpu else "0.6b")
    args.batch = args.batch or (2 if args.tiny else 4 if not gpu else 8)
    args.seq = args.seq or (32 if args.tiny else 128 if not gpu else 512)
    args.warmup = args.warmup if args.warmup is not None else (1 if small else 3)
    args.steps = args.steps or (2 if args.tiny else 10)
    args.checkpointing = {"on": [True], "off": [False], "both": [False, True]}[args.checkpointing]
    args.variants = ["base", "ours", "peft", *[v for v in args.variants if v not in ("base", "ours", "peft")]]
    if args.casts and len(args.checkpointing) > 1:
        args.checkpointing = [False]
    import transformers

    meta = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name() if gpu else
            platform.processor() or platform.machine(), "torch": torch.__version__,
            "transformers": transformers.__version__, "batch": args.batch, "seq": args.seq, "rank": args.rank,
            "lr": args.lr, "warmup": args.warmup, "steps": args.steps}
    for lib in ("bitsandbytes", "peft"):
        try:
            meta[lib] = __import__(lib).__version__
        except ImportError:
            meta[lib] = None
    results, table = casts(args) if args.casts else compare(args)
    os.makedirs(args.out, exist_ok=True)
    what = f"casts-{args.size}" if args.casts else "-".join(args.models)
    header = (f"QLoRA ({'cast costs' if args.casts else 'ours vs peft + bitsandbytes'}), {meta['device']}, "
              f"batch {args.batch} x {args.seq}, r={args.rank}, torch {meta['torch']}, bitsandbytes "
              f"{meta['bitsandbytes']}, peft {meta['peft']}, {meta['date']}\n\n")
    write_results(os.path.join(args.out, f"qlora-{'gpu' if gpu else 'cpu'}-{what}"), {"meta": meta, **results},
                  header + table)


if __name__ == "__main__":
    main()
