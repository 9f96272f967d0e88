"""The Qwen3 walkthrough (examples/qwen3_walkthrough.py) runs end to end on the tiny model: the loss goes
down, the saved adapter reloads into a fresh model with identical logits and generations, and the
collator masks everything but the answer."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "qwen3_walkthrough.py")
HAS_BOTTLENECK = importlib.util.find_spec("adapters_bottleneck") is not None


@pytest.fixture(scope="module")
def walkthrough():
    spec = importlib.util.spec_from_file_location("qwen3_walkthrough", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dataset_is_gsm8k_format(walkthrough):
    rows = walkthrough.load_problems()
    assert len(rows) >= 40
    for row in rows:
        assert set(row) == {"question", "answer"}
        body, final = row["answer"].rsplit("\n#### ", 1)
        assert body and final.strip().lstrip("-").isdigit()


def test_collator_masks_prompt_and_padding(walkthrough):
    tok = walkthrough.CharTokenizer()
    assert tok.decode(tok.encode("Q: 3+4=7?")) == "Q: 3+4=7?"
    rows = [{"question": "1+1?", "answer": "1+1=2\n#### 2"}, {"question": "a longer one?", "answer": "#### 5"}]
    feats = [walkthrough.encode_example(r, tok, 256) for r in rows]
    batch = walkthrough.AnswerOnlyCollator(tok.pad_token_id)(feats)
    for i, row in enumerate(rows):
        n_prompt = len(tok.encode(walkthrough.prompt_of(row["question"]), add_special_tokens=True))
        n = len(feats[i]["input_ids"])
        labels = batch["labels"][i]
        assert (labels[:n_prompt] == -100).all()
        kept = labels[n_prompt:n]
        assert tok.decode(kept.tolist()) == row["answer"] and kept[-1] == tok.eos_token_id
        assert (labels[n:] == -100).all() and (batch["attention_mask"][i, n:] == 0).all()
        assert (batch["attention_mask"][i, :n] == 1).all()
        assert torch.equal(batch["input_ids"][i, n_prompt:n], kept)


def test_walkthrough_trains_saves_and_reloads(walkthrough, tmp_path):
    out = tmp_path / "run"
    results = walkthrough.main(["--max-steps", "8", "--batch-size", "4", "--learning-rate", "3e-2",
                                "--max-new-tokens", "12", "--output-dir", str(out)])
    assert results["method"] == ("SeqBnConfig" if HAS_BOTTLENECK else "LoRAConfig")
    assert results["steps"] == 8
    assert results["eval_loss_after"] < results["eval_loss_before"] - 0.02
    assert results["train_loss_last_logged"] < results["train_loss_first_logged"]
    assert results["reload_max_abs_logit_diff"] == 0.0
    assert results["generation_trained"] == results["generation_reloaded"]
    assert len(results["generation_trained"]) > 0
    assert json.loads((out / "results.json").read_text())["eval_loss_after"] == results["eval_loss_after"]
    saved = set(os.listdir(out / "gsm8k"))
    assert {"adapter_config.json", "adapter.safetensors"} <= saved
