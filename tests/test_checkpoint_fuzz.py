"""Corrupted checkpoints (native, PEFT, AdapterHub): every variant loads correctly or raises CheckpointError,
never another exception type, and a failed load leaves the model exactly as it was (SPEC §6)."""

from __future__ import annotations

import json
import os
import random
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapters
from adapters.errors import CheckpointError
from adapters.testing import tiny_inputs, tiny_model

DATA = os.path.join(os.path.dirname(__file__), "data", "compat")


@pytest.fixture(scope="module")
def model():
    m = tiny_model("qwen3", "base")
    adapters.init(m)
    return m


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    m = tiny_model("qwen3", "base")
    adapters.init(m)
    m.add_adapter("native", adapters.LoRAConfig(r=2, attn_matrices=["q", "v"], output_lora=True,
                                                init_weights="bert", init_weights_seed=0))
    m.save_adapter(str(root / "native"), "native")
    m.add_adapter("ia3", adapters.IA3Config())
    m.save_adapter(str(root / "ia3"), "ia3")
    shutil.copytree(os.path.join(DATA, "peft_qwen3_dora"), root / "peft")
    (root / "peft" / "reference.safetensors").unlink()
    return root


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(mod).__name__) for n, mod in model.named_modules()])


def _try(model, directory, baseline, inputs, expected):
    """Load ``directory``; on success compare against ``expected`` outputs (if given) and remove it again."""
    try:
        name = model.load_adapter(str(directory), load_as="fuzz", set_active=True)
    except CheckpointError as exc:
        assert str(exc)  # a message; the state must be untouched
        state, modules = _snapshot(model)
        assert modules == baseline[1]
        assert state.keys() == baseline[0].keys() and all(torch.equal(state[k], baseline[0][k]) for k in state)
        assert not model._adapters_state.adapters
        return "error"
    assert name == "fuzz"
    if expected is not None:
        with torch.no_grad():
            out = model(**inputs).last_hidden_state
        ok = torch.allclose(out, expected, atol=1e-5)
    else:
        ok = True
    model.delete_adapter("fuzz")
    state, modules = _snapshot(model)
    assert modules == baseline[1]
    assert all(torch.equal(state[k], baseline[0][k]) for k in state)
    return "ok" if ok else "loaded-different"


def _weights(directory):
    for name in ("adapter.safetensors", "adapter_model.safetensors"):
        if os.path.exists(directory / name):
            return directory / name
    raise AssertionError(directory)


def _expected(model, directory, inputs):
    name = model.load_adapter(str(directory), load_as="fuzz", set_active=True)
    with torch.no_grad():
        out = model(**inputs).last_hidden_state
    model.delete_adapter(name)
    return out


def _variant(tmp_path, source, i):
    target = tmp_path / f"v{i}"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    return target


@pytest.mark.parametrize("kind", ["native", "ia3", "peft"])
def test_truncated_and_flipped_weights(model, sources, tmp_path, kind):
    inputs = tiny_inputs(model)
    baseline = _snapshot(model)
    expected = _expected(model, sources / kind, inputs)
    raw = _weights(sources / kind).read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    rng = random.Random(0)
    outcomes = []
    offsets = sorted({0, 1, 7, 8, 9, 8 + header_len - 1, 8 + header_len, len(raw) - 1}
                     | {rng.randrange(len(raw)) for _ in range(20)})
    for i, cut in enumerate(offsets):
        d = _variant(tmp_path, sources / kind, i)
        _weights(d).write_bytes(raw[:cut])
        outcomes.append(_try(model, d, baseline, inputs, expected))
    assert set(outcomes) == {"error"}  # every truncation is detected
    for i in range(40):  # flip bytes in the length prefix and the JSON header
        d = _variant(tmp_path, sources / kind, 100 + i)
        data = bytearray(raw)
        pos = rng.randrange(0, 8 + header_len)
        data[pos] ^= 1 << rng.randrange(8)
        _weights(d).write_bytes(bytes(data))
        outcomes.append(_try(model, d, baseline, inputs, expected))
    for i in range(10):  # flips in the tensor data load (no checksum) but must not break anything
        d = _variant(tmp_path, sources / kind, 200 + i)
        data = bytearray(raw)
        data[rng.randrange(8 + header_len, len(raw))] ^= 0xFF
        _weights(d).write_bytes(bytes(data))
        assert _try(model, d, baseline, inputs, None) in ("ok", "error")
    assert "error" in outcomes


@pytest.mark.parametrize("kind", ["native", "ia3", "peft"])
def test_dropped_renamed_and_reshaped_tensors(model, sources, tmp_path, kind):
    inputs = tiny_inputs(model)
    baseline = _snapshot(model)
    tensors = load_file(str(_weights(sources / kind)))
    keys = sorted(tensors)
    variants = []
    for k in keys[:: max(1, len(keys) // 6)]:
        variants.append({kk: v for kk, v in tensors.items() if kk != k})  # dropped
        variants.append({**tensors, k + "_extra": tensors[k].clone()})  # unknown key
        variants.append({**tensors, k: torch.cat([tensors[k], tensors[k]])})  # shape mismatch
        variants.append({**tensors, k: tensors[k].reshape(-1)[:1].clone()})  # wrong rank
    variants.append({})
    for i, variant in enumerate(variants):
        d = _variant(tmp_path, sources / kind, i)
        save_file(variant, str(_weights(d)))
        assert _try(model, d, baseline, inputs, None) == "error", i


MUTATIONS = [None, True, -1, 0, 3, 2.5, "x", "", [], ["q", "zz"], {}, {"a": 1}, 10_000]


def _mangle(meta, rng):
    """A mutated copy of a JSON object: change, drop or add one (possibly nested) field."""
    meta = json.loads(json.dumps(meta))
    target = meta["config"] if "config" in meta and isinstance(meta["config"], dict) and rng.random() < 0.7 else meta
    op = rng.choice(["change", "drop", "add"])
    keys = sorted(target)
    if op == "change" and keys:
        target[rng.choice(keys)] = rng.choice(MUTATIONS)
    elif op == "drop" and keys:
        target.pop(rng.choice(keys))
    else:
        target[f"new_field_{rng.randrange(100)}"] = rng.choice(MUTATIONS[1:])
    return meta


@pytest.mark.parametrize("kind", ["native", "ia3", "peft"])
def test_mangled_configs(model, sources, tmp_path, kind):
    inputs = tiny_inputs(model)
    baseline = _snapshot(model)
    expected = _expected(model, sources / kind, inputs)
    text = (sources / kind / "adapter_config.json").read_text()
    meta = json.loads(text)
    rng = random.Random(1)
    texts = [text[:n] for n in (0, 1, len(text) // 2, len(text) - 1)] + ["[]", "null", "\xff\xfe", '{"config": 3}']
    texts += [json.dumps(_mangle(meta, rng)) for _ in range(30)]
    outcomes = []
    for i, t in enumerate(texts):
        d = _variant(tmp_path, sources / kind, i)
        (d / "adapter_config.json").write_text(t, encoding="utf-8", errors="surrogateescape")
        outcomes.append(_try(model, d, baseline, inputs, expected))
    assert outcomes.count("error") >= 8


@pytest.mark.parametrize("which", ["ah_bert_lora", "ah_llama_ia3"])
def test_adapterhub_bin_and_safetensors_corruption(tmp_path, which):
    """AdapterHub files on a model they do not fit, truncated .bin pickles, non-tensor pickles: CheckpointError."""
    m = tiny_model("bert", "base")
    adapters.init(m)
    baseline = _snapshot(m)
    src = os.path.join(DATA, which)
    files = [f for f in os.listdir(src) if f.endswith((".bin", ".safetensors")) and f != "reference.safetensors"]
    raw = open(os.path.join(src, files[0]), "rb").read()
    variants = [raw[:n] for n in (0, 10, len(raw) // 3, len(raw) - 5)] + [raw]
    for i, data in enumerate(variants):
        d = tmp_path / f"v{i}"
        shutil.copytree(src, d)
        (d / files[0]).write_bytes(data)
        assert _try(m, d, baseline, tiny_inputs(m), None) == "error"
    d = tmp_path / "pickle"
    shutil.copytree(src, d)
    for f in files:
        os.remove(d / f)
    torch.save({"x": [1, 2, 3]}, d / "pytorch_adapter.bin")  # not a dict of tensors
    assert _try(m, d, baseline, tiny_inputs(m), None) == "error"


def _rewrite_config(directory, fn):
    path = directory / "adapter_config.json"
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("case", ["model_type", "other_method", "newer_field", "shape", "unknown_key", "missing_key",
                                  "no_weights"])
def test_named_bad_native_checkpoints(model, sources, tmp_path, case):
    """Each classic mistake gives a CheckpointError that names the file and the problem; nothing changes."""
    baseline = _snapshot(model)
    d = _variant(tmp_path, sources / "native", 0)
    weights = d / "adapter.safetensors"
    tensors = load_file(str(weights))
    if case == "model_type":
        _rewrite_config(d, lambda m: m.update(model_type="llama"))
        needle = "'llama' model"
    elif case == "other_method":  # an IA3 config next to LoRA weights
        _rewrite_config(d, lambda m: m["config"].update(composition_mode="scale", init_weights="ia3"))
        needle = "unexpected"
    elif case == "newer_field":
        _rewrite_config(d, lambda m: m["config"].update(future_field=1))
        needle = "future_field"
    elif case == "shape":
        key = sorted(tensors)[0]
        save_file({**tensors, key: torch.zeros(5, *tensors[key].shape[1:])}, str(weights))
        needle = "shape"
    elif case == "unknown_key":
        save_file({**tensors, "layers.0.self_attn.q.lora_C": torch.zeros(2)}, str(weights))
        needle = "lora_C"
    elif case == "missing_key":
        save_file({k: v for k, v in tensors.items() if not k.startswith("layers.1.")}, str(weights))
        needle = "Missing"
    else:
        weights.unlink()
        needle = "no weights file"
    with pytest.raises(CheckpointError, match=needle) as info:
        model.load_adapter(str(d))
    assert str(d) in str(info.value)  # names the checkpoint (its directory or the file itself)
    assert _try(model, d, baseline, tiny_inputs(model), None) == "error"
