"""Training-step overhead of bottleneck adapters against the frozen base model (GPU).

Interleaved in one process: for each round, time ``steps`` forward+backward passes (gradients
flow to ``inputs_embeds``) of the base model and of each adapter setup. Runs from a source
checkout without installing (plugins registered in-process)::

    python packages/adapters-bottleneck/bench/bench_bn_train.py [--batch 16 --seq 512]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
sys.path[:0] = [os.path.join(ROOT, "packages", "adapters-core", "src"),
                os.path.join(ROOT, "packages", "adapters-bottleneck", "src")]

import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    from transformers import Qwen3Config, Qwen3Model

    import adapters
    import adapters_bottleneck.plugin
    from adapters.interfaces.builtin import BUILTIN_INTERFACES

    adapters.register_plugin(adapters_bottleneck.plugin, distribution="adapters-bottleneck")
    config = Qwen3Config(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                         num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = Qwen3Model(config).to("cuda", torch.bfloat16)
    adapters.init(model, interface=BUILTIN_INTERFACES["qwen3"])
    setups = {"seq_bn": "seq_bn", "double_seq_bn": "double_seq_bn", "par_bn": "par_bn"}
    for name, cfg in setups.items():
        model.add_adapter(name, cfg)
    model.freeze_model(True)
    model.train()
    embeds = torch.randn(args.batch, args.seq, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step() -> None:
        out = model(inputs_embeds=embeds).last_hidden_state
        out.float().pow(2).mean().backward()

    def timed(setup: str | None) -> float:
        model.set_active_adapters(setup)
        if setup is not None:
            for p in model._adapters_state.adapter_parameters(setup):
                p.requires_grad_(True)
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.steps):
            step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / args.steps

    results: dict[str, list[float]] = {"base": [], **{n: [] for n in setups}}
    for _ in range(args.rounds):
        results["base"].append(timed(None))
        for name in setups:
            results[name].append(timed(name))
    base = statistics.median(results["base"])
    print(f"{torch.cuda.get_device_name()} bf16 Qwen3-0.6B-shaped, batch {args.batch} x {args.seq}, fwd+bwd")
    for name, times in results.items():
        med = statistics.median(times)
        print(f"{name:>14}: {med:8.2f} ms/step  {med / base:5.3f}x")


if __name__ == "__main__":
    main()
