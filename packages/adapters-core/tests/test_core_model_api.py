"""The model API through the in-process test method: lifecycle, errors that change nothing, summary, training."""

from __future__ import annotations

import json

import pytest
import torch

import adapters
from adapters.errors import AdapterError, AdapterNotFoundError, CheckpointError, CompositionError
from adapters.testing import tiny_inputs, tiny_model


def _model(model_type: str = "qwen3", task: str = "causal_lm"):
    model = adapters.init(tiny_model(model_type, task))
    return model, tiny_inputs(model)


def _out(model, inputs, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


# ------------------------------------------------------------------------------------------ lifecycle
@pytest.mark.parametrize("model_type", ["qwen3", "gpt2", "bert", "t5"])
def test_add_activate_save_load_merge_delete(toy, tmp_path, model_type):
    task = "seq_cls" if model_type == "bert" else "causal_lm"
    model, inputs = _model(model_type, task)
    base = _out(model, inputs)
    keys = list(model.state_dict())
    types_before = [(n, type(m)) for n, m in model.named_modules()]
    model.add_adapter("s", config=toy.NAME)
    assert model.has_adapter("s") and model.active_adapters is None
    # base state-dict keys are unchanged (in order); the adapter adds its own
    assert [k for k in model.state_dict() if ".adapters.s." not in k] == keys
    toy.randomize(model, "s")
    assert torch.equal(_out(model, inputs), base)  # added but inactive: exactly the base model
    model.set_active_adapters("s")
    assert model.active_adapters == adapters.Stack("s")
    out = _out(model, inputs)
    assert not torch.equal(out, base)
    # get_adapter: one module per FFN output projection, keyed by portable location
    modules = model.get_adapter("s")
    n_layers = model._adapters_state.points.num_layers
    assert sorted(modules) == sorted(f"layers.{i}.output" for i in range(n_layers))
    # save -> load into a fresh model: bit-identical
    model.save_adapter(str(tmp_path), "s")
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {"config", "name", "model_type", "model_name", "model_class", "hidden_size", "version"} <= set(meta)
    assert meta["name"] == "s" and meta["model_type"] == model.config.model_type
    assert meta["config"]["method"] == toy.NAME
    fresh, _ = _model(model_type, task)
    assert fresh.load_adapter(str(tmp_path), set_active=True) == "s"
    assert torch.equal(_out(fresh, inputs), out)
    assert fresh.load_adapter(str(tmp_path), load_as="t") == "t"
    for key, tensor in fresh.get_adapter("s").items():
        assert torch.equal(tensor.scale, fresh.get_adapter("t")[key].scale)
    # merge: equal within float tolerance; reset restores the weights exactly
    weights = {k: v.clone() for k, v in model.state_dict().items() if ".adapters." not in k}
    model.merge_adapter("s")
    torch.testing.assert_close(_out(model, inputs), out, rtol=0, atol=1e-5)
    with pytest.raises(CompositionError, match="merged"):
        model.set_active_adapters(None)
    model.reset_adapter()
    for key, value in weights.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert torch.equal(_out(model, inputs), out)
    # deactivate -> base exactly; delete -> original modules and keys
    model.active_adapters = None
    assert torch.equal(_out(model, inputs), base)
    model.delete_adapter("s")
    assert list(model.state_dict()) == keys
    assert [(n, type(m)) for n, m in model.named_modules()] == types_before
    assert torch.equal(_out(model, inputs), base)


def test_overwrite_and_set_active(toy):
    model, inputs = _model()
    model.add_adapter("s", config=toy.Config(init_scale=2.0), set_active=True)
    doubled = _out(model, inputs)
    model.add_adapter("s", config=toy.Config(init_scale=3.0), overwrite_ok=True, set_active=True)
    assert model.adapters_config["s"].init_scale == 3.0
    assert not torch.equal(_out(model, inputs), doubled)
    model.add_adapter("s", config=toy.Config(init_scale=2.0), overwrite_ok=True, set_active=True)
    assert torch.equal(_out(model, inputs), doubled)


def test_adapter_math_matches_hand_computation(toy):
    model = adapters.init(tiny_model("qwen3"))
    inputs = tiny_inputs(model)
    model.add_adapter("s", config=toy.NAME, set_active=True)
    toy.randomize(model, "s", seed=3)
    captured = {}
    mlp = model.layers[1].mlp
    handle = mlp.register_forward_hook(lambda mod, args, out: captured.update(x=args[0], y=out))
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    down = mlp.down_proj
    scale = model.get_adapter("s")["layers.1.output"].scale
    h = mlp.act_fn(mlp.gate_proj(captured["x"])) * mlp.up_proj(captured["x"])
    expected = torch.nn.functional.linear(h, down.weight) * scale
    torch.testing.assert_close(captured["y"], expected, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------ failures change nothing
def _expect_unchanged(toy, model, exc, fn, match=None):
    before = toy.snapshot(model)
    with pytest.raises(exc, match=match):
        fn()
    toy.assert_unchanged(model, before)


@pytest.fixture
def loaded(toy):
    model, inputs = _model()
    model.add_adapter("s", config=toy.NAME, set_active=True)
    toy.randomize(model, "s")
    return model, inputs


def test_failed_operations_leave_the_model_unchanged(toy, loaded):
    model, inputs = loaded
    out = _out(model, inputs)
    _expect_unchanged(toy, model, AdapterError, lambda: model.add_adapter("s", config=toy.NAME), "already exists")
    _expect_unchanged(toy, model, AdapterError, lambda: model.add_adapter("x", config=f"{toy.NAME}[nonexistent=1]"))
    _expect_unchanged(toy, model, AdapterError, lambda: model.add_adapter("bad name", config=toy.NAME), "Invalid")
    _expect_unchanged(toy, model, AdapterError, lambda: model.add_adapter("x", config=42))
    _expect_unchanged(toy, model, KeyError, lambda: model.add_adapter("x", config="no_such_method_at_all"))
    _expect_unchanged(toy, model, AdapterNotFoundError, lambda: model.delete_adapter("nope"), "nope")
    _expect_unchanged(toy, model, AdapterNotFoundError, lambda: model.set_active_adapters("nope"), "nope")
    _expect_unchanged(toy, model, AdapterNotFoundError, lambda: model.set_active_adapters(["s", "nope"]))
    _expect_unchanged(toy, model, AdapterNotFoundError, lambda: model.train_adapter("nope"))
    _expect_unchanged(toy, model, AdapterNotFoundError, lambda: model.merge_adapter("nope"))
    _expect_unchanged(toy, model, CompositionError, lambda: model.set_active_adapters(adapters.Parallel("s", "s")))
    assert torch.equal(_out(model, inputs), out)


def test_failed_attach_midway_rolls_back(toy, loaded):
    model, inputs = loaded
    out = _out(model, inputs)
    # attaching "x" fails at layer 1, after it already wrapped/extended layer 0
    _expect_unchanged(toy, model, AdapterError, lambda: model.add_adapter("x", config=toy.Config(fail_at_layer=1)),
                      "fail at layer 1")
    assert torch.equal(_out(model, inputs), out)
    # on a model without adapters, the failure restores the original modules too
    fresh, _ = _model()
    _expect_unchanged(toy, fresh, AdapterError, lambda: fresh.add_adapter("x", config=toy.Config(fail_at_layer=1)))
    assert type(fresh.model.layers[0].mlp.down_proj) is torch.nn.Linear


def test_failed_overwrite_keeps_the_old_adapter(toy, loaded):
    model, inputs = loaded
    out = _out(model, inputs)
    before = toy.snapshot(model)
    with pytest.raises(AdapterError):
        model.add_adapter("s", config=f"{toy.NAME}[bogus=1]", overwrite_ok=True)
    toy.assert_unchanged(model, before)
    assert torch.equal(_out(model, inputs), out)


def test_load_errors_leave_the_model_unchanged(toy, loaded, tmp_path):
    model, inputs = loaded
    out = _out(model, inputs)
    good = tmp_path / "good"
    model.save_adapter(str(good), "s")

    def copy(name):
        import shutil

        target = tmp_path / name
        shutil.copytree(good, target)
        return target

    # missing folder / missing weights / missing config
    _expect_unchanged(toy, model, CheckpointError, lambda: model.load_adapter(str(tmp_path / "good" / "x.json")))
    no_weights = copy("no_weights")
    (no_weights / "adapter.safetensors").unlink()
    _expect_unchanged(toy, model, CheckpointError, lambda: model.load_adapter(str(no_weights), load_as="a"),
                      "no weights")
    no_config = copy("no_config")
    (no_config / "adapter_config.json").unlink()
    _expect_unchanged(toy, model, CheckpointError, lambda: model.load_adapter(str(no_config), load_as="a"),
                      "adapter_config.json")
    # corrupt safetensors / corrupt json
    corrupt = copy("corrupt")
    data = (corrupt / "adapter.safetensors").read_bytes()
    (corrupt / "adapter.safetensors").write_bytes(data[: len(data) // 2])
    _expect_unchanged(toy, model, CheckpointError, lambda: model.load_adapter(str(corrupt), load_as="a"), "corrupt")
    garbage = copy("garbage")
    (garbage / "adapter.safetensors").write_bytes(b"\x00\x01not a safetensors file at all")
    _expect_unchanged(toy, model, CheckpointError, lambda: model.load_adapter(str(garbage), load_as="a"))
    bad_json = copy("bad_json")
    (bad_json / "adapter_config.json").write_text("{")
    _expect_unchanged(toy, model, CheckpointError, lambda: model.load_adapter(str(bad_json), load_as="a"), "JSON")
    # mismatched shapes: weights of the right keys but the wrong width
    from safetensors.torch import load_file, save_file

    shapes = copy("shapes")
    tensors = load_file(str(shapes / "adapter.safetensors"))
    save_file({k: torch.ones(v.shape[0] + 1) for k, v in tensors.items()}, str(shapes / "adapter.safetensors"))
    _expect_unchanged(toy, model, CheckpointError, lambda: model.load_adapter(str(shapes), load_as="a"), "shape")
    # missing / unexpected keys
    keys = copy("keys")
    save_file({k.replace("layers.1", "layers.7"): v for k, v in tensors.items()}, str(keys / "adapter.safetensors"))
    _expect_unchanged(toy, model, CheckpointError, lambda: model.load_adapter(str(keys), load_as="a"), "Missing")
    # name clash
    _expect_unchanged(toy, model, CheckpointError, lambda: model.load_adapter(str(good)), "load_as")
    # wrong model type
    wrong = copy("wrong_type")
    meta = json.loads((wrong / "adapter_config.json").read_text())
    meta["model_type"] = "gpt2"
    (wrong / "adapter_config.json").write_text(json.dumps(meta))
    _expect_unchanged(toy, model, CheckpointError, lambda: model.load_adapter(str(wrong), load_as="a"), "gpt2")
    # a real adapter from another architecture (model type and hidden size checks)
    other, _ = _model("gpt2")
    other.add_adapter("g", config=toy.NAME)
    other.save_adapter(str(tmp_path / "gpt2"), "g")
    _expect_unchanged(toy, model, CheckpointError, lambda: model.load_adapter(str(tmp_path / "gpt2")), "gpt2")
    # wrong hidden size
    hidden = copy("hidden")
    meta = json.loads((hidden / "adapter_config.json").read_text())
    meta["hidden_size"] = 48
    (hidden / "adapter_config.json").write_text(json.dumps(meta))
    _expect_unchanged(toy, model, CheckpointError, lambda: model.load_adapter(str(hidden), load_as="a"), "48")
    # unknown config field
    field = copy("field")
    meta = json.loads((field / "adapter_config.json").read_text())
    meta["config"]["from_the_future"] = 1
    (field / "adapter_config.json").write_text(json.dumps(meta))
    _expect_unchanged(toy, model, CheckpointError, lambda: model.load_adapter(str(field), load_as="a"),
                      "from_the_future")
    assert torch.equal(_out(model, inputs), out)
    # and the good checkpoint still loads
    assert model.load_adapter(str(good), load_as="ok") == "ok"


def test_merge_rules(toy, loaded):
    model, _ = loaded
    model.add_adapter("t", config=toy.NAME)
    model.merge_adapter("s")
    _expect_unchanged(toy, model, AdapterError, lambda: model.merge_adapter("s"), "already merged")
    _expect_unchanged(toy, model, AdapterError, lambda: model.delete_adapter("s"), "reset_adapter")
    _expect_unchanged(toy, model, CompositionError, lambda: model.set_active_adapters(None), "merged")
    _expect_unchanged(toy, model, CompositionError, lambda: model.set_active_adapters("t"), "merged")
    model.set_active_adapters(["s", "t"])  # a stack that includes the merged adapter is allowed
    model.reset_adapter()
    model.set_active_adapters("t")


# ------------------------------------------------------------------------------------------ AdapterSetup
def test_adapter_setup_context_manager(toy):
    model, inputs = _model()
    base = _out(model, inputs)
    model.add_adapter("a", config=toy.NAME)
    model.add_adapter("b", config=toy.NAME)
    toy.randomize(model, "a", seed=1)
    toy.randomize(model, "b", seed=2)
    model.set_active_adapters("a")
    out_a = _out(model, inputs)
    model.set_active_adapters("b")
    out_b = _out(model, inputs)
    model.set_active_adapters(None)
    with adapters.AdapterSetup("a"):
        assert torch.equal(_out(model, inputs), out_a)
        with adapters.AdapterSetup("b"):
            assert torch.equal(_out(model, inputs), out_b)
        assert torch.equal(_out(model, inputs), out_a)
    assert model.active_adapters is None
    assert torch.equal(_out(model, inputs), base)
    # model= restricts the setup to one model
    other, _ = _model()
    other_base = _out(other, inputs)
    with adapters.AdapterSetup("a", model=model):
        assert torch.equal(_out(model, inputs), out_a)
        assert torch.equal(_out(other, inputs), other_base)
    # an active setup is restored after the block
    model.set_active_adapters("b")
    with adapters.AdapterSetup("a"):
        assert torch.equal(_out(model, inputs), out_a)
    assert model.active_adapters == adapters.Stack("b")
    assert torch.equal(_out(model, inputs), out_b)
    # an unknown adapter inside a setup is an error, and the model keeps its setup
    with pytest.raises(AdapterNotFoundError), adapters.AdapterSetup("nope"):
        _out(model, inputs)
    assert torch.equal(_out(model, inputs), out_b)


# ------------------------------------------------------------------------------------------ summary
def test_adapter_summary_rows_and_numbers(toy):
    model, _ = _model("qwen3", "base")  # no task head: the full-model row is all frozen after train_adapter
    base_count = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    model.add_adapter("a", config=toy.NAME)
    model.add_adapter("b", config=toy.Config(leave_out=[0]))
    model.train_adapter("a")
    rows = model.adapter_summary(as_dict=True)
    assert [r["name"] for r in rows] == ["a", "b", "Full model"]
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    a, b, full = rows
    assert a["#params"] == hidden * layers == sum(p.numel() for p in model._adapters_state.adapter_parameters("a"))
    assert b["#params"] == hidden * (layers - 1)
    assert a["method"] == b["method"] == toy.NAME
    assert full["#params"] == base_count
    assert a["%params"] == pytest.approx(100.0 * a["#params"] / base_count)
    assert (a["active"], a["train"], b["active"], b["train"]) == (True, True, False, False)
    assert (full["train"], full["%params"]) == (False, 100.0)
    model.merge_adapter("a")
    assert model.adapter_summary(as_dict=True)[0]["merged"]
    text = model.adapter_summary()
    assert "Full model" in text and "(merged)" in text and f"{base_count:,}" in text
    assert toy.NAME[:15] in text


def test_adapter_summary_shows_a_trainable_task_head_apart_from_the_frozen_base(toy):
    model, _ = _model("bert", "seq_cls")
    model.add_adapter("a", config=toy.NAME)
    model.train_adapter("a")
    rows = {r["name"]: r for r in model.adapter_summary(as_dict=True)}
    assert list(rows)[-2:] == ["Task head", "Full model"]
    head = sum(p.numel() for p in model.classifier.parameters())
    assert rows["Task head"]["#params"] == head and rows["Task head"]["train"] is True
    assert rows["Full model"]["train"] is False  # the base model's own weights are frozen
    model.classifier.requires_grad_(False)
    assert model.adapter_summary(as_dict=True)[-2]["train"] is False


# ------------------------------------------------------------------------------------------ training
def test_train_adapter_trains_exactly_the_adapter_and_the_task_head(toy):
    model, inputs = _model("qwen3", "seq_cls")
    model.add_adapter("a", config=toy.NAME)
    model.add_adapter("b", config=toy.NAME)
    head = model.score.weight
    head.requires_grad_(False)
    model.train_adapter("a")
    assert model.training
    assert model.active_adapters == adapters.Stack("a")
    state = model._adapters_state
    adapter_a = {id(p) for p in state.adapter_parameters("a")}
    adapter_b = {id(p) for p in state.adapter_parameters("b")}
    for name, p in model.model.named_parameters():
        assert p.requires_grad == (id(p) in adapter_a), name
    assert all(not p.requires_grad for p in state.adapter_parameters("b"))
    assert head.requires_grad  # a task head outside the base model trains with the adapter
    # a few SGD steps move exactly adapter "a" and the head
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    labels = torch.tensor([0, 1])
    for _ in range(3):
        opt.zero_grad()
        model(**inputs, labels=labels).loss.backward()
        opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {n for n, p in model.named_parameters() if id(p) in adapter_a} | {"score.weight"}
    assert not adapter_b & {id(p) for n, p in model.named_parameters() if n in moved}
    # train_embeddings unfreezes the embeddings too; freeze_model(False) unfreezes the base
    model.train_adapter("a", train_embeddings=True)
    assert model.model.embed_tokens.weight.requires_grad
    model.freeze_model(False)
    assert all(p.requires_grad for n, p in model.model.named_parameters() if ".adapters.b." not in n)
    with pytest.raises(AdapterError):
        model.train_adapter(None)


def test_adapter_to_and_dtype_follow_model(toy):
    model, inputs = _model()
    model.to(torch.bfloat16)
    model.add_adapter("a", config=toy.NAME, set_active=True)
    assert all(p.dtype == torch.bfloat16 for p in model._adapters_state.adapter_parameters("a"))
    model.adapter_to("a", dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in model._adapters_state.adapter_parameters("a"))
    model.to(torch.float64)
    assert _out(model, inputs).dtype == torch.float64
    assert [i for i, _ in model.iter_layers()] == [0, 1]
