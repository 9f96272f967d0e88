"""Walkthrough: adapters on Qwen3 through a hand-written plugin interface, trained on math word problems.

Steps (each is a section below):

1. Describe Qwen3 to the library with an ``AdapterModelInterface`` written by hand (the built-in
   ``qwen3`` interface is the same; writing it yourself is how you add a new architecture).
2. Build a Qwen3 causal LM: a tiny random one by default (with a character-level tokenizer defined
   here, so nothing is downloaded), or a real checkpoint with ``--model PATH``.
3. Add a bottleneck adapter ``SeqBnConfig(reduction_factor=32)`` (``--method lora`` for LoRA; if the
   ``adapters-bottleneck`` plugin is not installed we say so and use LoRA).
4. Train it with ``AdapterTrainer`` on ``examples/data/gsm8k_mini.jsonl`` (GSM8K format: ``question``,
   ``answer`` ending in ``#### <number>``), with the loss on the answer tokens only.
5. Evaluate, ``save_adapter``, reload the adapter into a fresh model, check both give the same
   logits, and generate an answer.

Run::

    python examples/qwen3_walkthrough.py --max-steps 60 --output-dir /tmp/qwen3-walkthrough
    python examples/qwen3_walkthrough.py --model /path/to/Qwen3-0.6B --method lora --max-steps 200

The script prints a summary and writes ``results.json`` into ``--output-dir`` (losses before and after
training, the reload check, the generations).
"""

from __future__ import annotations

import argparse
import json
import os
import string
import sys
from collections.abc import Sequence
from typing import Any

import torch

import adapters
from adapters import AdapterModelInterface

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data", "gsm8k_mini.jsonl")
ADAPTER = "gsm8k"
IGNORE = -100


# ---------------------------------------------------------------------------------------------- 1. interface
def qwen3_interface() -> AdapterModelInterface:
    """Qwen3's hook points: pre-norm layers ``x + attn(input_layernorm(x))``, ``x + mlp(post_attention_layernorm(x))``.

    Pre-norm models have no norm after the residual add, so ``layer_ln_1`` / ``layer_ln_2`` are ``None``;
    the bottleneck adapter reads the residual stream from the inputs of the two pre-norms.
    """
    return AdapterModelInterface(
        adapter_methods=["bottleneck", "lora", "reft"],
        model_embeddings="embed_tokens",
        model_layers="layers",
        layer_self_attn="self_attn",
        attn_q_proj="q_proj",
        attn_k_proj="k_proj",
        attn_v_proj="v_proj",
        attn_o_proj="o_proj",
        layer_intermediate_proj="mlp.up_proj",
        layer_output_proj="mlp.down_proj",
        layer_pre_self_attn="input_layernorm",
        layer_pre_ffn="post_attention_layernorm",
        layer_ln_1=None,
        layer_ln_2=None,
    )


# ---------------------------------------------------------------------------------------------- 2. model
class CharTokenizer:
    """A character-level tokenizer for the tiny model: 4 special tokens, then printable ASCII."""

    pad_token_id, bos_token_id, eos_token_id, unk_token_id = 0, 1, 2, 3

    def __init__(self) -> None:
        chars = string.digits + string.ascii_letters + string.punctuation + " \n"
        self.vocab = ["<pad>", "<s>", "</s>", "<unk>", *chars]
        self.index = {c: i for i, c in enumerate(self.vocab)}

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text`` (with a leading ``<s>`` when ``add_special_tokens``)."""
        ids = [self.index.get(c, self.unk_token_id) for c in text]
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens are dropped when ``skip_special_tokens``."""
        return "".join(self.vocab[i] for i in ids if not (skip_special_tokens and i < 4))


class HFTokenizer:
    """The same small interface over a ``transformers`` tokenizer (for ``--model PATH``)."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.eos_token_id = tok.eos_token_id
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.bos_token_id = tok.bos_token_id

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False)
        return [self.bos_token_id, *ids] if add_special_tokens and self.bos_token_id is not None else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


def tiny_qwen3(vocab_size: int, seed: int) -> torch.nn.Module:
    """A 2-layer Qwen3 with hidden size 64 and random weights (tied embeddings, so the LM head stays frozen)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).eval()


def build(model_path: str | None, seed: int) -> tuple[torch.nn.Module, Any]:
    """The base model (fresh, deterministic for the tiny one) and its tokenizer."""
    if model_path is None:
        tokenizer = CharTokenizer()
        return tiny_qwen3(len(tokenizer), seed), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto").eval()
    return model, HFTokenizer(AutoTokenizer.from_pretrained(model_path))


# ---------------------------------------------------------------------------------------------- 3. adapter
def adapter_config(method: str) -> Any:
    """``SeqBnConfig(reduction_factor=32)`` for ``bottleneck`` (LoRA if that plugin is missing), else LoRA."""
    if method == "bottleneck":
        try:
            from adapters import SeqBnConfig
        except ImportError as err:  # MissingPluginError is an ImportError
            print(f"[walkthrough] The bottleneck plugin is not installed ({err}); using LoRA instead. "
                  "Install it with: pip install adapters-bottleneck", file=sys.stderr)
        else:
            return SeqBnConfig(reduction_factor=32)
    from adapters import LoRAConfig

    return LoRAConfig(r=8, alpha=16, attn_matrices=["q", "v"], output_lora=True)


# ---------------------------------------------------------------------------------------------- 4. data
def load_problems(path: str = DATA) -> list[dict[str, str]]:
    """GSM8K-format rows: ``{"question": ..., "answer": "... #### 42"}``."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def prompt_of(question: str) -> str:
    return f"Question: {question}\nAnswer: "


def encode_example(row: dict[str, str], tokenizer: Any, max_length: int) -> dict[str, list[int]]:
    """Prompt + answer + EOS; labels are ``-100`` on the prompt so the loss covers the answer only."""
    prompt = tokenizer.encode(prompt_of(row["question"]), add_special_tokens=True)
    answer = [*tokenizer.encode(row["answer"]), tokenizer.eos_token_id]
    ids = (prompt + answer)[:max_length]
    labels = ([IGNORE] * len(prompt) + answer)[:max_length]
    return {"input_ids": ids, "labels": labels}


class AnswerOnlyCollator:
    """Right-pads a batch; padding gets ``attention_mask`` 0 and label ``-100``.

    (The model shifts labels by one itself, so ``labels[t]`` is the target for position ``t``'s token.)
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.tensor(f["input_ids"])
            mask[row, :n] = 1
            labels[row, :n] = torch.tensor(f["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------------------------------------- 5. generate
@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: Any, question: str, max_new_tokens: int) -> str:
    """Greedy answer to ``question``."""
    model.eval()
    ids = torch.tensor([tokenizer.encode(prompt_of(question), add_special_tokens=True)],
                       device=next(model.parameters()).device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:].tolist())


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the walkthrough; returns (and writes to ``results.json``) what it measured."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="path of a Qwen3 checkpoint (default: tiny random model)")
    parser.add_argument("--method", choices=["bottleneck", "lora"], default="bottleneck")
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--output-dir", default="qwen3_walkthrough_out")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=None, help="default: 1e-2 tiny model, 2e-4 real")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--eval-size", type=int, default=8, help="problems held out for evaluation")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from transformers import TrainingArguments

    from adapters import AdapterTrainer

    # 1 + 2: the model, prepared with our hand-written interface
    interface = qwen3_interface()
    model, tokenizer = build(args.model, args.seed)
    adapters.init(model, interface=interface)

    # 3: the adapter
    config = adapter_config(args.method)
    model.add_adapter(ADAPTER, config=config)
    model.train_adapter(ADAPTER)  # freezes the base model, activates and trains only "gsm8k"
    print(model.adapter_summary())

    # 4: data and training
    rows = load_problems()
    encoded = [encode_example(r, tokenizer, args.max_length) for r in rows]
    train_set, eval_set = encoded[:-args.eval_size], encoded[-args.eval_size:]
    lr = args.learning_rate if args.learning_rate is not None else (1e-2 if args.model is None else 2e-4)
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, learning_rate=lr, lr_scheduler_type="constant",
        logging_steps=max(1, args.max_steps // 5), save_strategy="no", report_to=[], seed=args.seed,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True, remove_unused_columns=False,
        bf16=args.model is not None and torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
    )
    trainer = AdapterTrainer(model=model, args=training_args, train_dataset=train_set, eval_dataset=eval_set,
                             data_collator=AnswerOnlyCollator(tokenizer.pad_token_id))
    before = trainer.evaluate()["eval_loss"]
    train_out = trainer.train()
    after = trainer.evaluate()["eval_loss"]
    train_first = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    train_last = [h["loss"] for h in trainer.state.log_history if "loss" in h][-1]

    # 5: save, reload into a fresh model, compare, generate
    adapter_dir = os.path.join(args.output_dir, ADAPTER)
    model.save_adapter(adapter_dir, ADAPTER)
    fresh, _ = build(args.model, args.seed)
    adapters.init(fresh, interface=interface)
    fresh.load_adapter(adapter_dir, set_active=True)
    model.eval()
    batch = AnswerOnlyCollator(tokenizer.pad_token_id)(eval_set[:2])
    batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
    fresh.to(next(model.parameters()).device)
    with torch.no_grad():
        trained_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        reloaded_logits = fresh(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    max_diff = (trained_logits.float() - reloaded_logits.float()).abs().max().item()
    question = rows[-1]["question"]
    gen_trained = generate(model, tokenizer, question, args.max_new_tokens)
    gen_reloaded = generate(fresh, tokenizer, question, args.max_new_tokens)

    results = {
        "method": type(config).__name__,
        "eval_loss_before": before,
        "eval_loss_after": after,
        "train_loss_first_logged": train_first,
        "train_loss_last_logged": train_last,
        "train_loss_mean": train_out.training_loss,
        "steps": trainer.state.global_step,
        "reload_max_abs_logit_diff": max_diff,
        "question": question,
        "generation_trained": gen_trained,
        "generation_reloaded": gen_reloaded,
        "adapter_dir": adapter_dir,
    }
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=2)
    print(f"method: {results['method']}  eval loss {before:.4f} -> {after:.4f}  "
          f"(train loss {train_first:.4f} -> {train_last:.4f}, {results['steps']} steps)")
    print(f"reloaded adapter: max |logit diff| = {max_diff:.3g}; same generation: {gen_trained == gen_reloaded}")
    print(f"Q: {question}\nA (trained model): {gen_trained!r}")
    return results


if __name__ == "__main__":
    main()
