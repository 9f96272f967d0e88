"""Write the small reference checkpoints in ``tests/data/compat/`` (run by hand; the outputs are committed).

Two environments, two modes:

* ``/work/ah-venv/bin/python scripts/make_reference_checkpoints.py adapterhub`` -- needs the real
  AdapterHub ``adapters`` 1.x package (which pins transformers 4.x, hence its own virtualenv). Builds tiny
  random BERT and Llama models, saves their base weights (``base/model.safetensors`` + ``config.json``,
  rounded to float16 so the files stay small), adds LoRA / IA3 adapters with random non-zero weights,
  saves them with AdapterHub's ``save_adapter`` and records the outputs on fixed inputs
  (``reference.safetensors``: ``input_ids``, ``output``).
* ``/work/venv/bin/python scripts/make_reference_checkpoints.py peft`` -- needs ``peft``; saves a PEFT
  LoRA (and DoRA) made on ``adapters.testing.tiny_model("qwen3", "base")`` and the outputs.
* ``.nox/tests/bin/python scripts/make_reference_checkpoints.py peft-prompt`` -- needs ``peft``; PEFT prompt
  tuning (Qwen3 causal LM, BERT feature extraction) and prefix tuning (Qwen3 causal LM, grouped-query
  attention; GPT-2) on ``adapters.testing`` tiny models, with padded inputs and the outputs at the real tokens'
  positions (PEFT's prompt-tuning outputs hold the virtual positions too: they are cut off here).
* ``/work/ah-venv/bin/python scripts/make_reference_checkpoints.py adapterhub-prefix`` -- AdapterHub prefix tuning
  (MLP-reparameterised and flat, with gating) on the tiny BERT and on a tiny Llama with as many key/value heads
  as query heads (AdapterHub 1.3 sizes prefixes by ``num_attention_heads``, so it cannot run grouped-query
  attention); writes ``ah_<model>_prefix*`` beside a base ``ah_llama_mha_prefix_base``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "compat")
INPUT_IDS = torch.tensor([[3, 9, 4, 17, 25, 11, 30, 2], [5, 1, 28, 14, 7, 22, 9, 19]])


def _fresh(path: str) -> str:
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def _randomise(params, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_((torch.rand(p.shape, generator=gen) * 0.4 + 0.8) if p.dim() == 1 or p.shape[-1] == 1
                    else torch.randn(p.shape, generator=gen) * 0.3)


def _tiny_base(model_type: str):
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

    torch.manual_seed(0)
    if model_type == "bert":
        cfg = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=16, type_vocab_size=1)
        model = BertModel(cfg, add_pooling_layer=False)
    else:
        cfg = LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=2 if model_type == "llama_mha" else 1, intermediate_size=32,
                          max_position_embeddings=16)
        if model_type == "llama_mha":
            # AdapterHub 1.3 concatenates its float prefix mask to sdpa's boolean (or absent) causal mask, which
            # drops the causal masking; its prefix tuning computes what the paper means under eager attention only
            cfg._attn_implementation = "eager"
        model = LlamaModel(cfg)
    with torch.no_grad():  # float16-representable weights: the saved float16 file reproduces them exactly
        for p in model.parameters():
            p.copy_(p.half().float())
    return model.eval()


def make_adapterhub() -> None:
    import adapters
    from adapters import DoubleSeqBnConfig, IA3Config, LoRAConfig, LoReftConfig, ParBnConfig, SeqBnConfig

    for model_type in ("bert", "llama"):
        base_dir = _fresh(os.path.join(ROOT, f"ah_{model_type}_base"))
        model = _tiny_base(model_type)
        save_file({k: v.half().contiguous() for k, v in model.state_dict().items()},
                  os.path.join(base_dir, "model.safetensors"))
        with open(os.path.join(base_dir, "config.json"), "w") as fh:
            json.dump(model.config.to_dict(), fh, indent=1, sort_keys=True, default=str)
        specs = {
            "lora": LoRAConfig(r=2, alpha=4, attn_matrices=["q", "v"], intermediate_lora=True, output_lora=True,
                               leave_out=[0] if model_type == "llama" else []),
            "ia3": IA3Config(alpha=2),
            "seq_bn": SeqBnConfig(reduction_factor=4),
            "double_seq_bn": DoubleSeqBnConfig(reduction_factor=4),
            "par_bn": ParBnConfig(reduction_factor=4),
            "loreft": LoReftConfig(r=2),
        }
        for i, (method, config) in enumerate(specs.items()):
            model = _tiny_base(model_type)
            adapters.init(model)
            model.add_adapter(method, config=config)
            # torch's orthogonal parametrization reads the sign of `original`'s diagonal: keep ReFT's R as
            # initialised (a random orthonormal matrix) and randomise everything else
            _randomise([p for n, p in model.named_parameters() if f".{method}." in n and "parametrizations" not in n],
                       seed=10 + i)
            model.set_active_adapters(method)
            model.eval()  # adapter modules are created in training mode (ReFT has dropout)
            with torch.no_grad():
                out = model(input_ids=INPUT_IDS).last_hidden_state
            target = _fresh(os.path.join(ROOT, f"ah_{model_type}_{method}"))
            model.save_adapter(target, method, use_safetensors=(method != "lora"))
            save_file({"input_ids": INPUT_IDS, "output": out.contiguous()},
                      os.path.join(target, "reference.safetensors"))
            print("wrote", target, sorted(os.listdir(target)))


def make_peft() -> None:
    from peft import LoraConfig, get_peft_model

    from adapters.testing import tiny_inputs, tiny_model

    for method, dora in (("lora", False), ("dora", True)):
        model = tiny_model("qwen3", "base")
        inputs = tiny_inputs(model)
        config = LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=dora,
                            init_lora_weights=False)
        peft_model = get_peft_model(model, config)
        _randomise([p for n, p in peft_model.named_parameters() if "lora_B" in n], seed=3)
        with torch.no_grad():
            out = peft_model(**inputs).last_hidden_state
        target = _fresh(os.path.join(ROOT, f"peft_qwen3_{method}"))
        peft_model.save_pretrained(target)
        os.remove(os.path.join(target, "README.md"))
        save_file({"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
                   "output": out.contiguous()}, os.path.join(target, "reference.safetensors"))
        print("wrote", target, sorted(os.listdir(target)))


PADDED_IDS = torch.tensor([[0, 0, 9, 4, 17, 25, 11, 30], [5, 12, 28, 14, 7, 22, 9, 19]])
PADDED_MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])


def make_peft_prompt() -> None:
    """PEFT prompt tuning and prefix tuning references (outputs at the real tokens only)."""
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    from adapters.testing import tiny_model

    cases = {
        "peft_qwen3_prompt": ("qwen3", "causal_lm", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)),
        "peft_bert_prompt": ("bert", "base", PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=3)),
        "peft_qwen3_prefix": ("qwen3", "causal_lm", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
        "peft_gpt2_prefix": ("gpt2", "causal_lm", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2,
                                                                     prefix_projection=True,
                                                                     encoder_hidden_size=8)),
    }
    for target_name, (arch, task, config) in cases.items():
        model = tiny_model(arch, task)
        peft_model = get_peft_model(model, config).eval()
        _randomise(list(peft_model.prompt_encoder.parameters()), seed=5)
        with torch.no_grad():
            out = peft_model(input_ids=PADDED_IDS, attention_mask=PADDED_MASK)
        out = out.logits if task == "causal_lm" else out.last_hidden_state
        if config.peft_type.value == "PROMPT_TUNING":
            out = out[:, config.num_virtual_tokens:]  # PEFT keeps the virtual positions in its outputs
        target = _fresh(os.path.join(ROOT, target_name))
        peft_model.save_pretrained(target)
        os.remove(os.path.join(target, "README.md"))
        save_file({"input_ids": PADDED_IDS, "attention_mask": PADDED_MASK, "output": out.contiguous()},
                  os.path.join(target, "reference.safetensors"))
        print("wrote", target, sorted(os.listdir(target)))


def make_adapterhub_prefix() -> None:
    """AdapterHub prefix tuning references: BERT and an MHA Llama; MLP, flat, gated."""
    import adapters
    from adapters import PrefixTuningConfig

    base_dir = _fresh(os.path.join(ROOT, "ah_llama_mha_prefix_base"))
    model = _tiny_base("llama_mha")
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()},
              os.path.join(base_dir, "model.safetensors"))
    with open(os.path.join(base_dir, "config.json"), "w") as fh:
        json.dump(model.config.to_dict(), fh, indent=1, sort_keys=True, default=str)
    specs = {
        "bert": {"prefix": PrefixTuningConfig(prefix_length=3, bottleneck_size=8),
                 "prefix_flat_gated": PrefixTuningConfig(prefix_length=2, flat=True, use_gating=True,
                                                         shared_gating=False, leave_out=[0])},
        "llama_mha": {"prefix": PrefixTuningConfig(prefix_length=3, bottleneck_size=8)},
    }
    for model_type, configs in specs.items():
        for i, (method, config) in enumerate(configs.items()):
            model = _tiny_base(model_type)
            adapters.init(model)
            model.add_adapter(method, config=config)
            _randomise([p for n, p in model.named_parameters() if f".{method}." in n], seed=20 + i)
            model.set_active_adapters(method)
            model.eval()
            with torch.no_grad():
                out = model(input_ids=PADDED_IDS % 32, attention_mask=PADDED_MASK).last_hidden_state
            target = _fresh(os.path.join(ROOT, f"ah_{model_type}_{method}"))
            model.save_adapter(target, method, use_safetensors=False)  # its safetensors writer refuses the shared pool
            save_file({"input_ids": PADDED_IDS % 32, "attention_mask": PADDED_MASK, "output": out.contiguous()},
                      os.path.join(target, "reference.safetensors"))
            print("wrote", target, sorted(os.listdir(target)))


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode == "adapterhub":
        make_adapterhub()
    elif mode == "peft":
        make_peft()
    elif mode == "peft-prompt":
        make_peft_prompt()
    elif mode == "adapterhub-prefix":
        make_adapterhub_prefix()
    else:
        sys.exit(__doc__)
