"""``adapters export-merged``: an adapter merged into its base model, written as a plain transformers checkpoint.

Bases are tiny random models written with ``save_pretrained`` (a Qwen3 causal LM; a bare BERT with a
tokenizer, as downloaded, under an adapter trained with a sequence-classification head). The CLI runs
in-process (``adapters.cli.main``). What an export must give: outputs equal to the adapter model's (float
tolerance) and bit-for-bit equal to ``merge_and_unload()`` on CPU, loaded by plain ``from_pretrained`` into
a transformers class; refusals (methods that cannot merge, a non-empty OUT, a head with random weights)
leave OUT as it was.
"""

from __future__ import annotations

import os

import pytest
import torch
import transformers
from safetensors.torch import load_file

import adapters
from adapters.cli import main
from adapters.export import model_class_for, task_of_class
from adapters.testing import tiny_inputs, tiny_model

DATA = os.path.join(os.path.dirname(__file__), "data", "compat")
AUTO = {"qwen3": transformers.AutoModelForCausalLM, "bert": transformers.AutoModelForSequenceClassification}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """``{"qwen3": dir, "bert": dir}``: a Qwen3ForCausalLM checkpoint, and a bare BertModel with tokenizer files."""
    root = tmp_path_factory.mktemp("bases")
    tiny_model("qwen3", "causal_lm").save_pretrained(root / "qwen3")
    tiny_model("bert").save_pretrained(root / "bert")
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]))
    transformers.BertTokenizer(vocab_file=str(root / "vocab.txt")).save_pretrained(root / "bert")
    return {"qwen3": str(root / "qwen3"), "bert": str(root / "bert")}


def _trained(base: str, arch: str, config: str, seed: int = 0):
    """An adapter model on ``base`` whose adapter (and, for BERT, classification head) holds random values."""
    torch.manual_seed(seed)
    model = adapters.init(AUTO[arch].from_pretrained(base))
    model.add_adapter("ft", config=config)
    model.train_adapter("ft")
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):  # adapter and task head
            p.add_(0.5 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _export(*argv) -> int:
    return main(["export-merged", *map(str, argv), "--no-progress"])


@pytest.mark.parametrize("arch", ["qwen3", "bert"])
@pytest.mark.parametrize("config", ["lora", "dora", "ia3", "vera"])
def test_export_loads_in_plain_transformers_with_the_merged_outputs(bases, tmp_path, capsys, arch, config):
    model = _trained(bases[arch], arch, config)
    model.save_adapter(tmp_path / "adapter", "ft")  # with its head (BERT: the trained classifier)
    inputs = tiny_inputs(model)
    unmerged = _logits(model, inputs)
    with adapters.AdapterSetup(None):
        base_logits = _logits(model, inputs)
    assert (unmerged - base_logits).abs().max() > 1e-4  # the adapter changes the outputs (100 x the tolerance)
    # the Qwen3 adapter records its base model (from_pretrained's path); BERT names it with --model
    argv = [tmp_path / "adapter", tmp_path / "out"] + (["--model", bases[arch]] if arch == "bert" else [])
    assert _export(*argv) == 0
    out = capsys.readouterr().out
    expected_class = "Qwen3ForCausalLM" if arch == "qwen3" else "BertForSequenceClassification"
    assert f"merged into {expected_class} (float32)" in out

    exported = AUTO[arch].from_pretrained(tmp_path / "out").eval()
    assert type(exported).__name__ == expected_class and type(exported).__module__.startswith("transformers.")
    assert not hasattr(exported, "_adapters_state")
    files = set(os.listdir(tmp_path / "out"))
    assert {"model.safetensors", "config.json"} <= files
    assert ("generation_config.json" in files) == (arch == "qwen3")
    torch.testing.assert_close(_logits(exported, inputs), unmerged, atol=1e-6, rtol=1e-5)

    plain = model.merge_and_unload()  # the same merge in Python: bit for bit on CPU
    assert torch.equal(_logits(exported, inputs), _logits(plain, inputs))
    ours, theirs = plain.state_dict(), exported.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    if arch == "bert":  # the base directory's tokenizer files travel along, byte for byte
        for name in ("tokenizer.json", "tokenizer_config.json"):
            with open(os.path.join(bases["bert"], name), "rb") as a, open(tmp_path / "out" / name, "rb") as b:
                assert a.read() == b.read()
        tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
        assert tokenizer("hello world")["input_ids"] == \
            transformers.AutoTokenizer.from_pretrained(bases["bert"])("hello world")["input_ids"]
    else:
        assert not files & {"tokenizer.json", "tokenizer_config.json", "vocab.txt"}


def test_dtype_casts_the_merged_weights(bases, tmp_path, capsys):
    model = _trained(bases["qwen3"], "qwen3", "lora", seed=3)
    model.save_adapter(tmp_path / "adapter", "ft")
    assert _export(tmp_path / "adapter", tmp_path / "out", "--dtype", "bfloat16") == 0
    assert "(bfloat16)" in capsys.readouterr().out
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert exported.dtype == torch.bfloat16 and exported.config.dtype == torch.bfloat16
    merged = model.merge_and_unload().state_dict()  # merged in float32, cast once
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert all(torch.equal(saved[k], merged[k].to(torch.bfloat16)) for k in saved)


def test_peft_directory_exports_like_the_native_one(bases, tmp_path, capsys):
    model = _trained(bases["qwen3"], "qwen3", "dora", seed=5)
    model.save_adapter(tmp_path / "peft", "ft", format="peft")  # records base_model_name_or_path
    inputs = tiny_inputs(model)
    assert _export(tmp_path / "peft", tmp_path / "out") == 0
    assert "merged into Qwen3ForCausalLM" in capsys.readouterr().out
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(_logits(exported, inputs), _logits(model.merge_and_unload(), inputs))


def test_adapterhub_directory_gives_the_outputs_adapterhub_recorded(tmp_path, capsys):
    ref = load_file(os.path.join(DATA, "ah_bert_lora", "reference.safetensors"))  # written by adapters 1.3
    assert _export(os.path.join(DATA, "ah_bert_lora"), tmp_path / "out", "--model",
                   os.path.join(DATA, "ah_bert_base")) == 0
    captured = capsys.readouterr()
    assert "merged into BertModel" in captured.out
    # that base checkpoint has no pooler: said, not hidden (plain from_pretrained of the base does the same)
    assert "warning:" in captured.err and "pooler.dense.weight" in captured.err
    exported = transformers.AutoModel.from_pretrained(tmp_path / "out", attn_implementation="eager")
    with torch.no_grad():
        out = exported(input_ids=ref["input_ids"]).last_hidden_state
    torch.testing.assert_close(out, ref["output"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("config, method",
                         [("seq_bn", "bottleneck"), ("loreft", "reft"), ("lora|seq_bn", "bottleneck")])
def test_methods_that_cannot_merge_are_refused_and_out_is_untouched(bases, tmp_path, capsys, config, method):
    model = adapters.init(tiny_model("qwen3", "causal_lm"))
    model.add_adapter("bn", config=config)
    model.save_adapter(tmp_path / "adapter", "bn")
    assert _export(tmp_path / "adapter", tmp_path / "out", "--model", bases["qwen3"]) == 2
    err = capsys.readouterr().err
    assert f"method '{method}'" in err and "cannot be merged into the base weights" in err
    assert "adapters.load_model" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".export-merged-")]  # no temporary left over


def test_adapterhub_bottleneck_is_refused_after_reading_it(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert _export(os.path.join(DATA, "ah_bert_seq_bn"), tmp_path / "out", "--model",
                   os.path.join(DATA, "ah_bert_base")) == 2
    assert "method 'bottleneck'" in capsys.readouterr().err
    assert os.listdir(tmp_path / "out") == []


def test_non_empty_out_needs_overwrite_which_replaces_stale_weights_only(bases, tmp_path, capsys):
    model = _trained(bases["qwen3"], "qwen3", "lora", seed=7)
    model.save_adapter(tmp_path / "adapter", "ft")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale shard")
    (out / "model.safetensors.index.json").write_text("{}")
    before = sorted(os.listdir(out))
    assert _export(tmp_path / "adapter", out) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == before and (out / "notes.txt").read_text() == "mine"

    assert _export(tmp_path / "adapter", out, "--overwrite") == 0
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors", "notes.txt"]
    inputs = tiny_inputs(model)
    exported = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(_logits(exported, inputs), _logits(model.merge_and_unload(), inputs))
    # the input directories are never written over
    assert _export(tmp_path / "adapter", tmp_path / "adapter", "--overwrite") == 2
    assert "is the input directory" in capsys.readouterr().err


def test_a_head_the_adapter_does_not_carry_is_refused_not_exported_random(bases, tmp_path, capsys):
    model = _trained(bases["bert"], "bert", "lora", seed=9)
    model.save_adapter(tmp_path / "adapter", "ft", with_head=False)  # the trained classifier is not saved
    assert _export(tmp_path / "adapter", tmp_path / "out", "--model", bases["bert"]) == 2
    err = capsys.readouterr().err
    assert "randomly initialised task-head weights ['classifier.bias', 'classifier.weight']" in err
    assert "--task base" in err and not (tmp_path / "out").exists()
    # exported without the head: a BertModel with the adapter merged
    assert _export(tmp_path / "adapter", tmp_path / "out", "--model", bases["bert"], "--task", "base") == 0
    exported = transformers.AutoModel.from_pretrained(tmp_path / "out")
    inputs = tiny_inputs(model)
    with torch.no_grad():
        want = model.bert(**inputs).last_hidden_state
        got = exported(**inputs).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bad_inputs_exit_2_with_what_to_do(bases, tmp_path, capsys):
    model = adapters.init(tiny_model("qwen3", "causal_lm"))  # built from a config: no base model recorded
    model.add_adapter("a", config="lora")
    model.save_adapter(tmp_path / "adapter", "a")
    assert _export(tmp_path / "adapter", tmp_path / "out") == 2
    assert "does not record its base model; pass it with --model" in capsys.readouterr().err
    assert _export(tmp_path / "adapter", tmp_path / "out", "--model", bases["bert"]) == 2
    err = capsys.readouterr().err
    assert "saved from a 'qwen3' model" in err and "is a 'bert' model" in err and "--model" in err
    assert _export(tmp_path / "missing", tmp_path / "out") == 2
    assert "is not a directory holding a saved adapter" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_progress_bars_show_unless_no_progress_and_settings_are_restored(bases, tmp_path, capsys):
    model = _trained(bases["qwen3"], "qwen3", "ia3", seed=11)
    model.save_adapter(tmp_path / "adapter", "ft")
    assert main(["export-merged", str(tmp_path / "adapter"), str(tmp_path / "a")]) == 0
    shown = capsys.readouterr()
    assert "Loading weights" in shown.err and "reading the adapter" in shown.out
    assert _export(tmp_path / "adapter", tmp_path / "b") == 0
    hidden = capsys.readouterr()
    assert "Loading weights" not in hidden.err and "Writing" not in hidden.err
    assert "reading the adapter" in hidden.out and "merging adapter 'ft' (IA3Config)" in hidden.out
    assert transformers.utils.logging.is_progress_bar_enabled()


def test_help_names_every_option(capsys):
    assert main(["export-merged", "--help"]) == 0
    text = capsys.readouterr().out
    for option in ("ADAPTER_DIR", "OUT", "--model", "--task", "--dtype", "--overwrite", "--no-progress"):
        assert option in text
    assert main(["--help"]) == 0 and "export-merged" in capsys.readouterr().out


def test_model_class_choice_follows_the_documented_order():
    config = transformers.AutoConfig.for_model("bert", architectures=["BertForMaskedLM"])
    head = {"model_class": "BertForSequenceClassification"}
    assert model_class_for(head, True, config, "base")[0] is transformers.AutoModel  # --task wins
    assert model_class_for(head, True, config)[0] is transformers.BertForSequenceClassification
    # a recorded class transformers does not have (AdapterHub's flexible-head class): the head's task
    custom = {"model_class": "BertAdapterModelForSequenceClassification"}
    assert model_class_for(custom, True, config)[0] is transformers.AutoModelForSequenceClassification
    assert model_class_for(custom, False, config)[0] is transformers.BertForMaskedLM  # the base's own class
    peft = {"peft_config": {"task_type": "SEQ_CLS"}}
    assert model_class_for(peft, False, config)[0] is transformers.AutoModelForSequenceClassification
    other_type = {"model_class": "Qwen3ForCausalLM"}  # a class of another model type is not used
    assert model_class_for(other_type, False, config)[0] is transformers.BertForMaskedLM
    assert model_class_for({}, False, transformers.AutoConfig.for_model("bert"))[0] is transformers.AutoModel
    assert task_of_class("T5ForSequenceClassification") == "seq_cls" and task_of_class("BertModel") is None
