"""Composition blocks and AdapterFusion with bottleneck adapters, checked numerically."""

from __future__ import annotations

import pytest
import torch

import adapters.composition as ac
from adapters.testing import tiny_inputs

CFG = "seq_bn[reduction_factor=4]"


@pytest.fixture
def two(make, helpers):
    """A llama with two randomised seq_bn adapters ``a`` and ``b`` and a batch of 4."""
    model, _ = make("llama")
    inputs = tiny_inputs(model, batch=4, seq=6)
    for i, name in enumerate("ab"):
        model.add_adapter(name, CFG)
        helpers.randomize(model, name, seed=i + 1)
    return model, inputs


def _run(model, inputs, setup, **kw):
    model.set_active_adapters(setup)
    with torch.no_grad():
        return model(**inputs, **kw)[0]


def test_batch_split_rows_equal_single_adapters(two):
    model, inputs = two
    a, b = _run(model, inputs, "a"), _run(model, inputs, "b")
    got = _run(model, inputs, ac.BatchSplit("a", "b", batch_sizes=[1, 3]))
    torch.testing.assert_close(got[:1], a[:1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1:], b[1:], rtol=1e-5, atol=1e-6)


def test_parallel_replicates_the_batch(two):
    model, inputs = two
    a, b = _run(model, inputs, "a"), _run(model, inputs, "b")
    got = _run(model, inputs, ac.Parallel("a", "b"))
    assert got.shape[0] == 8
    torch.testing.assert_close(got[:4], a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[4:], b, rtol=1e-5, atol=1e-6)


def test_multitask_routes_rows_by_task_id(two):
    model, inputs = two
    a, b = _run(model, inputs, "a"), _run(model, inputs, "b")
    got = _run(model, inputs, ac.MultiTask("a", "b"), task_ids=[1, 0, 1, 0])
    torch.testing.assert_close(got[[1, 3]], a[[1, 3]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[[0, 2]], b[[0, 2]], rtol=1e-5, atol=1e-6)


def test_split_positions(two):
    model, inputs = two
    a = _run(model, inputs, "a")
    b = _run(model, inputs, "b")
    got = _run(model, inputs, ac.Split("a", "b", splits=[3]))
    # causal model: positions < 3 only ever saw adapter a
    torch.testing.assert_close(got[:, :3], a[:, :3], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got[:, 3:], a[:, 3:]) and not torch.allclose(got[:, 3:], b[:, 3:])


@pytest.fixture
def last_layer(make, helpers):
    """Adapters only in layer 1 of a llama; hooks capture h (raw), x and the adapted projection output."""
    model, _ = make("llama")
    inputs = tiny_inputs(model, batch=2, seq=6)
    layer = model.layers[1]
    store: dict = {}
    layer.mlp.down_proj.register_forward_hook(lambda m, a, o: store.__setitem__("h", o.detach().clone()))
    layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a: store.__setitem__("x", a[0].detach()))
    for i, name in enumerate("abc"):
        model.add_adapter(name, "seq_bn[reduction_factor=4, leave_out=[0]]")
        helpers.randomize(model, name, seed=10 + i)
    layer.mlp.down_proj.register_forward_hook(lambda m, a, o: store.__setitem__("out", o.detach().clone()))
    bn = layer.bottleneck_adapters_output

    def run(setup):
        _run(model, inputs, setup)
        return store["out"]

    return model, bn, store, run


def test_average_is_normalised_weighted_sum(last_layer):
    _, _, _, run = last_layer
    a, b = run("a"), run("b")
    got = run(ac.Average("a", "b", weights=[1, 3]))
    torch.testing.assert_close(got, 0.25 * a + 0.75 * b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run(ac.Average("a", "a")), a, rtol=1e-5, atol=1e-6)


def test_stack_feeds_b_with_a_output(last_layer):
    model, bn, store, run = last_layer
    bn_owner = model.layers[1]
    got = run(ac.Stack("a", "b"))
    h, x = store["h"], store["x"]
    with torch.no_grad():
        out_a = bn.adapters["a"](h, x, bn.norm_of(bn_owner))
        expected = bn.adapters["b"](out_a, x, bn.norm_of(bn_owner))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_fuse_by_hand(last_layer, helpers):
    model, bn, store, run = last_layer
    bn_owner = model.layers[1]
    name = model.add_adapter_fusion(ac.Fuse("a", "b", "c"), config="static")
    assert name == "a,b,c"
    fusion = bn.fusions[name]
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in fusion.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    got = run(ac.Fuse("a", "b", "c"))
    h, x = store["h"], store["x"]
    with torch.no_grad():
        branches = [bn.adapters[n](h, x, bn.norm_of(bn_owner)) - h for n in "abc"]
        u = h + x  # seq_bn adapter input LN(h + x), LN = identity for pre-norm llama
        q = u @ fusion.query.weight.T + fusion.query.bias
        scores = torch.stack([((o @ fusion.key.weight.T + fusion.key.bias) * q).sum(-1) for o in branches], -1)
        p = torch.softmax(scores, -1)
        values = [o @ fusion.value.weight.T + fusion.value.bias for o in branches]
        expected = h + sum(p[..., j : j + 1] * v for j, v in enumerate(values))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Stack(a, Fuse(b, c)) nests
    model.add_adapter_fusion(["b", "c"], config="static")
    out = run(ac.Stack("a", ac.Fuse("b", "c")))
    assert torch.isfinite(out).all()


def test_fusion_train_save_load_delete(make, helpers, tmp_path):
    model, inputs = make("bert")
    keys = list(model.state_dict())
    for i, name in enumerate("ab"):
        model.add_adapter(name, "double_seq_bn[reduction_factor=4]")
        helpers.randomize(model, name, seed=i)
        model.save_adapter(str(tmp_path / name), name)
    fuse = ac.Fuse("a", "b")
    model.add_adapter_fusion(fuse)  # dynamic by default
    model.train_adapter_fusion(fuse)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".fusions." in n for n in trainable)
    row = {r["name"]: r for r in model.adapter_summary(as_dict=True)}["Fuse[a,b]"]
    assert (row["active"], row["train"], row["method"]) == (True, True, "bottleneck-fusion")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(**inputs)[0].pow(2).mean().backward()
        opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= trainable
    temps = [m.temperature for m in model._adapters_state.fusions["a,b"].method.fusion_modules(
        model._adapters_state, "a,b").values()]
    assert all(float(t) < 50.0 for t in temps)  # annealed during training
    model.eval()
    fused = helpers.output(model, inputs)
    model.set_active_adapters("a")
    assert not torch.allclose(helpers.output(model, inputs), fused)
    assert {r["name"]: r for r in model.adapter_summary(as_dict=True)}["Fuse[a,b]"]["active"] is False
    model.save_adapter_fusion(str(tmp_path / "fusion"), fuse)

    fresh, _ = make("bert")
    for name in "ab":
        fresh.load_adapter(str(tmp_path / name))
    fresh.load_adapter_fusion(str(tmp_path / "fusion"), set_active=True)
    fresh.eval()
    assert torch.equal(helpers.output(fresh, inputs), fused)

    model.delete_adapter_fusion(fuse)
    assert not any(".fusions." in k for k in model.state_dict())
    model.delete_adapter("a")
    model.delete_adapter("b")
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_batch_split_mixing_original_ln_after(make, helpers, model_type):
    """Rows of an adapter that replaces the add-and-norm next to rows of one that does not."""
    model, _ = make(model_type)
    inputs = tiny_inputs(model, batch=3, seq=6)
    model.add_adapter("plus", "adapterplus[reduction_factor=8, mh_adapter=True]")
    model.add_adapter("seq", CFG)
    helpers.randomize(model, "plus", seed=1)
    helpers.randomize(model, "seq", seed=2)
    plus, seq = _run(model, inputs, "plus"), _run(model, inputs, "seq")
    base = _run(model, inputs, None)
    got = _run(model, inputs, ac.BatchSplit("plus", "seq", batch_sizes=[2, 1]))
    torch.testing.assert_close(got[:2], plus[:2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2:], seq[2:], rtol=1e-5, atol=1e-5)
    # at the attention location "seq" is absent: its rows take the identity path in the final-output convention
    if model_type == "llama":
        assert set(model.layers[0].bottleneck_adapters_attn.adapters) == {"plus"}
    torch.testing.assert_close(_run(model, inputs, ac.BatchSplit("seq", "plus", batch_sizes=[1, 2]))[:1], seq[:1],
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(seq, base)
