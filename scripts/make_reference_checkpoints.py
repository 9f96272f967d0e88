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
                          num_key_value_heads=1, intermediate_size=32, max_position_embeddings=16)
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


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode == "adapterhub":
        make_adapterhub()
    elif mode == "peft":
        make_peft()
    else:
        sys.exit(__doc__)
