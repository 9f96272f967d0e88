"""PEFT VeRA interoperability (issue #22): directories written by peft load with peft's outputs, and our
exports load in peft with ours. Outputs are compared with ``torch.equal`` on CPU float32: PEFT's forward
``y + λ_b ⊙ B(λ_d ⊙ A x)`` and ours run the same operations in the same order."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapters
from adapters.errors import AdapterError, CheckpointError
from adapters.testing import tiny_inputs, tiny_model
from adapters_vera.formats import peft_projections, read_peft_vera, save_peft_vera

HAVE_PEFT = importlib.util.find_spec("peft") is not None
needs_peft = pytest.mark.skipif(not HAVE_PEFT, reason="peft is not installed (the 'tests' nox session has it)")
if HAVE_PEFT:
    import peft  # noqa: F401  (imported once here, ~10 s with its dependencies, not inside the first test)


def _perturb(model: torch.nn.Module, needle: str, seed: int) -> None:
    """Seeded noise on every parameter whose name contains ``needle`` (so the adapter really acts)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if needle in name:
                p.copy_(torch.randn(p.shape, generator=gen))


def _out(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


def _peft_dir(tmp_path, base, **config):
    """A VeRA adapter made and saved by peft itself on a copy of ``base``: ``(directory, peft model)``."""
    from peft import VeraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # save_projection=False / fan_in_fan_out notices
        model = get_peft_model(copy.deepcopy(base), VeraConfig(r=4, **config))
    _perturb(model, "vera_lambda", seed=1)
    model.eval()
    directory = str(tmp_path / "peft_vera")
    model.save_pretrained(directory)
    return directory, model


def _peft_load(base, directory):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()


def _ours(base):
    model = copy.deepcopy(base)
    adapters.init(model)
    return model


# ------------------------------------------------------------------------------------------ peft -> ours
@needs_peft
@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_qwen3_loads_with_identical_outputs(tmp_path, save_projection):
    base = tiny_model("qwen3", "causal_lm")
    inputs = tiny_inputs(base)
    directory, peft_model = _peft_dir(tmp_path, base, target_modules=["q_proj", "v_proj", "down_proj"],
                                      layers_to_transform=[1], save_projection=save_projection,
                                      projection_prng_key=7, d_initial=0.2)
    assert ("base_model.vera_A" in load_file(os.path.join(directory, "adapter_model.safetensors"))) == save_projection
    ref = _out(peft_model, inputs)
    model = _ours(base)
    before = _out(model, inputs)
    name = model.load_adapter(directory, set_active=True)
    config = model._adapters_state.record(name).config
    assert (config.r, config.projection_prng_key, config.vera_d, config.alpha, config.save_projection) == (
        4, 7, 0.2, None, True)
    assert config.target_modules == ["layers.1.mlp.down_proj", "layers.1.self_attn.q_proj",
                                     "layers.1.self_attn.v_proj"]
    out = _out(model, inputs)
    assert not torch.allclose(out, before, atol=1e-3)
    assert torch.equal(out, ref)
    # the projections are PEFT's own, bit for bit (redrawn from the key when the file lacks them)
    ours = model._adapters_state.shared_modules(name)["projections"]
    assert torch.equal(ours.A, peft_model.base_model.vera_A["default"])
    assert torch.equal(ours.B, peft_model.base_model.vera_B["default"])
    model.set_active_adapters(None)
    assert torch.equal(_out(model, inputs), before)


@needs_peft
def test_peft_projections_match_peft_draw(tmp_path):
    """Our re-implementation of PEFT's draw gives its buffers exactly, for another key and shape."""
    base = tiny_model("qwen3", "causal_lm")
    _, peft_model = _peft_dir(tmp_path, base, target_modules=["k_proj", "up_proj"], projection_prng_key=123,
                              save_projection=False)
    a, b = peft_projections(123, 4, 32, 64)
    assert torch.equal(a, peft_model.base_model.vera_A["default"])
    assert torch.equal(b, peft_model.base_model.vera_B["default"])
    assert not torch.equal(peft_projections(124, 4, 32, 64)[0], a)


@needs_peft
def test_peft_causal_lm_adapter_loads_into_base_class(tmp_path):
    """Saved from Qwen3ForCausalLM (``model.layers...``), loaded into Qwen3Model (``layers...``)."""
    base = tiny_model("qwen3", "causal_lm")
    inputs = tiny_inputs(base)
    directory, peft_model = _peft_dir(tmp_path, base, target_modules=["q_proj", "o_proj", "gate_proj"])
    with torch.no_grad():
        ref = peft_model.base_model.model.model(**inputs).last_hidden_state
    bare = _ours(base.model)
    bare.load_adapter(directory, set_active=True)
    assert torch.equal(_out(bare, inputs), ref)


@needs_peft
@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_gpt2_fused_c_attn_loads_with_identical_outputs(tmp_path, save_projection):
    """GPT-2's fused Conv1D ``c_attn`` is adapted whole (λ_b over q|k|v, ``B[:3d]``), as peft does."""
    base = tiny_model("gpt2", "causal_lm")
    inputs = tiny_inputs(base)
    directory, peft_model = _peft_dir(tmp_path, base, target_modules=["c_attn", "c_proj"],
                                      save_projection=save_projection)
    model = _ours(base)
    name = model.load_adapter(directory, set_active=True)
    config = model._adapters_state.record(name).config
    assert config.target_modules == [f"h.{i}.{m}" for i in (0, 1) for m in ("attn.c_attn", "attn.c_proj",
                                                                            "mlp.c_proj")]
    assert model._adapters_state.shared_modules(name)["projections"].B.shape == (96, 4)
    assert torch.equal(_out(model, inputs), _out(peft_model, inputs))


@needs_peft
def test_peft_modules_to_save_head_loads(tmp_path):
    base = tiny_model("qwen3", "seq_cls")
    inputs = tiny_inputs(base)
    directory, peft_model = _peft_dir(tmp_path, base, target_modules=["q_proj"], modules_to_save=["score"])
    _perturb(peft_model, "modules_to_save", seed=2)
    peft_model.save_pretrained(directory)
    model = _ours(base)
    model.load_adapter(directory, set_active=True)
    assert torch.equal(model.score.weight, peft_model.base_model.model.score.modules_to_save["default"].weight)
    assert torch.equal(_out(model, inputs), _out(peft_model, inputs))


# ------------------------------------------------------------------------------------------ ours -> peft
def _our_vera(base, seed: int = 3, **config):
    model = _ours(base)
    model.add_adapter("v", adapters.VeraConfig(r=4, **config))
    _perturb(model, "lambda_", seed=seed)
    model.set_active_adapters("v")
    return model


@needs_peft
@pytest.mark.parametrize("save_projection", [True, False])
def test_export_qwen3_loads_in_peft_with_identical_outputs(tmp_path, save_projection):
    """Interface placement, a scaling alpha / r = 2 (folded into λ_b) and our own projection draw."""
    base = tiny_model("qwen3", "causal_lm")
    inputs = tiny_inputs(base)
    model = _our_vera(base, attn_matrices=["q", "v"], output_lora=True, alpha=8, projection_prng_key=5,
                      save_projection=save_projection, leave_out=[0])
    ref = _out(model, inputs)
    model.save_adapter(str(tmp_path), "v", format="peft")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["save_projection"], cfg["bias"]) == ("VERA", 4, True, "none")
    assert cfg["target_modules"] == ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj",
                                     "model.layers.1.self_attn.v_proj"]
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    lam = model.model.layers[1].self_attn.q_proj.adapters["v"].lambda_b
    assert torch.equal(tensors["base_model.model.model.layers.1.self_attn.q_proj.vera_lambda_b"], lam * 2.0)
    peft_model = _peft_load(base, str(tmp_path))
    assert torch.equal(_out(peft_model, inputs), ref)
    # and back: ours -> peft files -> ours is exact as well
    again = _ours(base)
    again.load_adapter(str(tmp_path), load_as="v", set_active=True)
    assert torch.equal(_out(again, inputs), ref)


@needs_peft
def test_export_from_base_class_names_modules_as_task_class(tmp_path):
    """An adapter on Qwen3Model is written with ``model.`` paths, so it fits Qwen3ForCausalLM in peft."""
    base = tiny_model("qwen3", "causal_lm")
    inputs = tiny_inputs(base)
    bare = _our_vera(base.model, target_modules=["k_proj", "up_proj"])
    ref = _out(bare, inputs)
    bare.save_adapter(str(tmp_path), "v", format="peft")
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.k_proj.vera_lambda_d" in keys
    peft_model = _peft_load(base, str(tmp_path))
    with torch.no_grad():
        got = peft_model.base_model.model.model(**inputs).last_hidden_state
    assert torch.equal(got, ref)


@needs_peft
def test_export_gpt2_whole_c_attn_and_mlp_loads_in_peft(tmp_path):
    base = tiny_model("gpt2", "causal_lm")
    inputs = tiny_inputs(base)
    model = _our_vera(base, target_modules=["c_attn", "c_fc"], layers_to_transform=[1], dropout=0.1)
    model.eval()
    ref = _out(model, inputs)
    model.save_adapter(str(tmp_path), "v", format="peft")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["vera_dropout"] == 0.1
    assert cfg["target_modules"] == ["transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_fc"]
    assert torch.equal(_out(_peft_load(base, str(tmp_path)), inputs), ref)


# ------------------------------------------------------------------------------------------ refusals
def test_export_refuses_parts_of_a_fused_projection(tmp_path):
    """Interface-placed VeRA on GPT-2's c_attn uses B[:d] for each of q, k, v; peft's whole-module VeRA
    would use B[d:2d] for k, so there is no exact PEFT form."""
    model = _our_vera(tiny_model("gpt2", "causal_lm"), attn_matrices=["q", "v"])
    with pytest.raises(AdapterError, match=r"fused projection .*target_modules"):
        model.save_adapter(str(tmp_path / "x"), "v", format="peft")
    assert not (tmp_path / "x").exists()
    model.add_adapter("lora", adapters.LoRAConfig(r=2, output_lora=True, selfattn_lora=False))
    with pytest.raises(AdapterError, match="not a VeRA adapter"):
        save_peft_vera(model, str(tmp_path / "y"), "lora")


@pytest.fixture
def exported(tmp_path):
    """A valid PEFT VeRA directory (written by our exporter) and the model it came from."""
    base = tiny_model("qwen3", "causal_lm")
    model = _our_vera(base, attn_matrices=["q", "v"])
    directory = tmp_path / "exported"
    model.save_adapter(str(directory), "v", format="peft")
    return directory, base


def _edit(directory, cfg_changes=None, drop=(), change=None):
    path = directory / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(cfg_changes or {})
    path.write_text(json.dumps(cfg))
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    for key in drop:
        del tensors[key]
    tensors.update(change or {})
    save_file(tensors, str(directory / "adapter_model.safetensors"))


@pytest.mark.parametrize("changes, needle", [
    ({"bias": "vera_only"}, "bias='vera_only'"),
    ({"bias": "all"}, "bias='all'"),
    ({"use_fancy_thing": True}, "use_fancy_thing=True .*newer PEFT"),
    ({"r": "4"}, "r='4'"),
    ({"vera_dropout": 1.5}, "vera_dropout=1.5"),
    ({"projection_prng_key": 0.5}, "projection_prng_key=0.5"),
])
def test_options_we_do_not_reproduce_are_refused(exported, changes, needle):
    directory, base = exported
    _edit(directory, changes)
    model = _ours(base)
    with pytest.raises(CheckpointError, match=needle):
        model.load_adapter(str(directory))
    assert model._adapters_state.adapters == {}


def test_malformed_tensors_are_refused(exported):
    directory, base = exported
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    cases = [
        ({"drop": ["base_model.vera_A"]}, "save_projection is true but the file lacks \\['base_model.vera_A'\\]"),
        ({"drop": [f"{q}.vera_lambda_d"]}, "expected both vera_lambda_b and vera_lambda_d"),
        ({"change": {f"{q}.vera_lambda_d": torch.ones(5)}}, "expected \\[4\\] \\(r\\)"),
        ({"change": {f"{q}.vera_lambda_b": torch.ones(33)}}, "has 33 entries; the module has 32 output features"),
        ({"change": {"base_model.vera_A": torch.ones(4, 8)}}, "do not fit r=4"),
        ({"change": {"base_model.model.model.layers.0.nope.vera_lambda_b": torch.ones(4),
                     "base_model.model.model.layers.0.nope.vera_lambda_d": torch.ones(4)}}, "does not have"),
        ({"change": {"base_model.model.model.norm.weight": torch.ones(32)}}, "neither a VeRA weight"),
    ]
    pristine = {f: (directory / f).read_bytes() for f in os.listdir(directory)}
    for edit, needle in cases:
        for f, data in pristine.items():
            (directory / f).write_bytes(data)
        _edit(directory, **edit)
        model = _ours(base)
        with pytest.raises(CheckpointError, match=needle):
            model.load_adapter(str(directory))
        assert model._adapters_state.adapters == {}, needle


def test_larger_saved_projections_are_sliced_and_other_types_are_not_ours(exported):
    """Columns of A / rows of B beyond the widest module are never read (PEFT slices per module)."""
    directory, base = exported
    inputs = tiny_inputs(base)
    model = _ours(base)
    model.load_adapter(str(directory), load_as="v", set_active=True)
    ref = _out(model, inputs)
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    a, b = tensors["base_model.vera_A"], tensors["base_model.vera_B"]
    _edit(directory, change={"base_model.vera_A": torch.cat([a, torch.ones(4, 5)], dim=1),
                             "base_model.vera_B": torch.cat([b, torch.ones(7, 4)], dim=0)})
    other = _ours(base)
    other.load_adapter(str(directory), load_as="v", set_active=True)
    assert torch.equal(_out(other, inputs), ref)
    _edit(directory, {"peft_type": "LORA"})
    assert read_peft_vera(str(directory)) is None  # left to the LoRA reader
