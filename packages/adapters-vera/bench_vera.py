"""CPU benchmark (not a test): one training step of VeRA vs the frozen base model vs LoRA.

Run: ``/work/venv/bin/python packages/adapters-vera/bench_vera.py [--steps 10] [--threads 2]``

All three runs use the same small qwen3 model (built from a config, random weights) and the same
batch; the step is forward + backward + SGD step. "base" has every weight frozen and back-propagates
to the input embeddings only (the activation-gradient work any adapter method pays); VeRA and LoRA
adapt q and v of every layer (same placement). LoRA runs only if ``adapters_lora`` is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch

import adapters
from adapters.testing import tiny_config


def build(args: argparse.Namespace) -> torch.nn.Module:
    """A small qwen3 causal LM, seeded."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("qwen3", hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                         head_dim=args.hidden // 8, vocab_size=1000, max_position_embeddings=args.seq)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    adapters.init(model)
    return model


class Runner:
    """One model under test: a training step with its own optimizer."""

    def __init__(self, name: str, model: torch.nn.Module, embeds_grad: bool) -> None:
        self.name = name
        self.model = model
        self.embeds_grad = embeds_grad
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(self.params, lr=1e-3) if self.params else None
        self.times: list[float] = []

    def step(self, ids: torch.Tensor, record: bool) -> None:
        """Forward + backward + optimizer step; appends the wall time when ``record``."""
        start = time.perf_counter()
        embeds = self.model.get_input_embeddings()(ids).detach().requires_grad_(self.embeds_grad)
        loss = self.model(inputs_embeds=embeds, labels=ids).loss
        loss.backward()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        if record:
            self.times.append(time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--vera-r", type=int, default=256)
    parser.add_argument("--lora-r", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ids = torch.randint(4, 1000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

    runners: list[Runner] = []
    model = build(args)
    for p in model.parameters():
        p.requires_grad_(False)
    model.train()
    runners.append(Runner("base (frozen)", model, embeds_grad=True))

    from adapters_vera import VeraConfig

    model = build(args)
    model.add_adapter("vera", VeraConfig(r=args.vera_r, vera_b=0.01, attn_matrices=["q", "v"]))
    model.train_adapter("vera")
    model.lm_head.requires_grad_(False)
    runners.append(Runner(f"vera r={args.vera_r}", model, embeds_grad=False))

    if importlib.util.find_spec("adapters_lora") is not None:
        from adapters import LoRAConfig

        model = build(args)
        model.add_adapter("lora", LoRAConfig(r=args.lora_r, attn_matrices=["q", "v"]))
        model.train_adapter("lora")
        model.lm_head.requires_grad_(False)
        runners.append(Runner(f"lora r={args.lora_r}", model, embeds_grad=False))
    else:
        print("adapters_lora is not installed: LoRA skipped.")

    # interleaved rounds, so that load from other processes hits every variant alike
    for i in range(args.steps + 2):
        for runner in runners:
            runner.step(ids, record=i >= 2)
    results = {r.name: (statistics.median(r.times), sum(p.numel() for p in r.params)) for r in runners}

    base = results["base (frozen)"][0]
    print(f"qwen3 hidden={args.hidden} layers={args.layers} batch={args.batch} seq={args.seq} "
          f"threads={args.threads} steps={args.steps} (median, interleaved)")
    for name, (seconds, count) in results.items():
        print(f"{name:<16} {seconds * 1000:9.1f} ms/step   x{seconds / base:5.2f} vs base   trainable={count:,}")


if __name__ == "__main__":
    main()
