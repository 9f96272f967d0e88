"""Benchmark (not a test): ReFT training step vs the frozen base model on a small Qwen3, CPU.

Both sides run forward + backward with gradients flowing to the input embeddings (so the frozen
base does its full backward too), interleaved in one process; the ratio of medians is reported.

    python packages/adapters-reft/bench_reft.py [--hidden 256 --layers 4 --batch 4 --seq 128 --iters 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import adapters
from adapters import LoReftConfig
from adapters.testing import tiny_model


def main() -> None:
    """Run the benchmark and print medians and their ratio."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--r", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = tiny_model("qwen3", "causal_lm", hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                       num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32, num_key_value_heads=2,
                       head_dim=32, max_position_embeddings=max(64, args.seq))
    adapters.init(model)
    model.add_adapter("r", config=LoReftConfig(prefix_positions=3, suffix_positions=3, r=args.r))
    model.train_adapter("r")
    for p in model.parameters():
        if not any(p is q for q in model._adapters_state.adapter_parameters("r")):
            p.requires_grad_(False)
    ids = torch.randint(4, 128, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, : args.seq // 4] = 0  # one left-padded row
    embed = model.get_input_embeddings()

    def step(active: bool) -> float:
        model.set_active_adapters("r" if active else None)
        emb = embed(ids).detach().requires_grad_(True)
        start = time.perf_counter()
        out = model(inputs_embeds=emb, attention_mask=mask).logits
        out.float().pow(2).mean().backward()
        return time.perf_counter() - start

    for _ in range(3):
        step(True), step(False)
    base, reft = [], []
    for _ in range(args.iters):
        base.append(step(False))
        reft.append(step(True))
    mb, mr = statistics.median(base), statistics.median(reft)
    print(f"qwen3 hidden={args.hidden} layers={args.layers} batch={args.batch} seq={args.seq} r={args.r} "
          f"threads={torch.get_num_threads()}")
    print(f"frozen base fwd+bwd: {mb * 1e3:.2f} ms   LoReFT (all layers, 3+3 positions): {mr * 1e3:.2f} ms   "
          f"ratio {mr / mb:.3f}x")


if __name__ == "__main__":
    main()
