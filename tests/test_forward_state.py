"""One forward call, one state: every method x the composition blocks it supports x tiny architectures.

What a forward call reads beyond its hidden states (its setup's plans, the routing of its rows, the
positions of its tokens, the adapter weights themselves) must belong to that call and to the module
tree actually called, never to a module that other threads, replicas or calls share:

* threads: several threads run one model, each in its own ``AdapterSetup``: every output equals the
  single-threaded reference;
* replicas: ``torch.nn.parallel.replicate`` (what ``nn.DataParallel`` does every step, broadcast
  emulated on CPU) gives replicas that compute with their own weights, and gradients that flow
  back exactly as one model's;
* copies: ``copy.deepcopy`` and ``pickle`` give ordinary models with the same outputs and their own
  weights;
* ``generate()`` with a cache equals ``generate()`` without, token by token, padded and unpadded,
  batch 1 and 2; ``Parallel`` and ``MultiTask`` through ``generate()`` equal single-adapter
  generation row by row;
* gradient checkpointing (reentrant and not, transformers' and a plain ``torch.utils.checkpoint``
  of the layer call) gives the unchecked model's gradients for every block, with two forward calls
  of different routing before one backward;
* plans are values: two fusions of the same adapters with different names each run their own
  weights.
"""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch

import adapters
import adapters.composition as ac
from adapters.plugins import registry
from adapters.testing import ToyEncoder, replicate_on_cpu, tiny_inputs, tiny_model, toy_interface

METHODS = ["lora", "ia3", "dora", "mtl_lora", "seq_bn", "par_bn", "compacter[reduction_factor=4]", "loreft", "vera"]
ARCHS = ["qwen3", "gpt2", "bert"]


def _blocks(method: str) -> list[str]:
    return sorted(registry.method_for_config(adapters.AdapterConfig.load(method)).supported_blocks)


def _setups(method: str) -> list[tuple[object, list[int] | None]]:
    """``(setup, task_ids)`` for a batch of 2 rows: one per block the method supports."""
    blocks = set(_blocks(method))
    out: list[tuple[object, list[int] | None]] = [("a", None), (ac.Stack("a", "b"), None)]
    if "BatchSplit" in blocks:
        out.append((ac.BatchSplit("a", "b", batch_sizes=[1, 1]), None))
    if "Average" in blocks:
        out.append((ac.Average("a", "b", weights=[0.3, 0.7]), None))
    if "Split" in blocks:
        out.append((ac.Split("b", "a", splits=[3]), None))
    if "MultiTask" in blocks:
        out.append((ac.MultiTask("a", "b"), [1, 0]))
    if "Parallel" in blocks:
        out.append((ac.Parallel("a", "b"), None))
    if "Fuse" in blocks:
        out.append((ac.Fuse("a", "b"), None))
    return out


def _perturb(model, name: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model._adapters_state.adapter_parameters(name):
            if p.is_floating_point():
                p.add_((0.2 * torch.randn(p.shape, generator=gen)).to(p.dtype))
        for fusion in model._adapters_state.fusions:
            for p in model._adapters_state.fusion_parameters(fusion):
                p.add_((0.2 * torch.randn(p.shape, generator=gen)).to(p.dtype))


def _model(method: str, arch: str, task: str = "base"):
    model = tiny_model(arch, task)
    adapters.init(model)
    model.add_adapter("a", config=method)
    model.add_adapter("b", config=method)
    if "Fuse" in _blocks(method):
        model.add_adapter_fusion(["a", "b"])
    _perturb(model, "a", 1)
    _perturb(model, "b", 2)
    model.eval()
    return model


def _out(model, inputs, setup=None, task_ids=None) -> torch.Tensor:
    with torch.no_grad():
        if setup is None:
            return model(**inputs)[0]
        with adapters.AdapterSetup(setup, task_ids=task_ids):
            return model(**inputs)[0]


CASES = [pytest.param(m, a, id=f"{m}-{a}") for m in METHODS for a in ARCHS]


# ---------------------------------------------------------------------------------------------- threads
@pytest.mark.parametrize("method, arch", CASES)
def test_threads_each_run_their_own_setup(method, arch) -> None:
    model = _model(method, arch)
    inputs = tiny_inputs(model, batch=2, seq=6)
    setups = _setups(method)
    model.set_active_adapters("b")  # the model's default: what a thread without a setup runs
    references = [_out(model, inputs, s, t) for s, t in setups] + [_out(model, inputs)]
    assert not torch.equal(references[0], references[-1])  # "a" and the default "b" differ
    barrier = threading.Barrier(len(setups) + 1)
    wrong: list[str] = []

    def work(index: int) -> None:
        barrier.wait()
        for _ in range(6):
            if index < len(setups):
                out = _out(model, inputs, *setups[index])
            else:
                out = _out(model, inputs)
            if not torch.equal(out, references[index]):
                wrong.append(repr(setups[index][0]) if index < len(setups) else "default")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(setups) + 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong, f"forwards that used another thread's setup: {wrong}"
    assert model.active_adapters == ac.Stack("b")


# ---------------------------------------------------------------------------------------------- replicas
@pytest.mark.parametrize("method, arch", CASES)
def test_replicas_compute_with_their_own_weights(method, arch) -> None:
    model = _model(method, arch)
    inputs = tiny_inputs(model, batch=2, seq=6)
    state = model._adapters_state
    adapter_ids = {id(p) for n in state.adapters for p in state.adapter_parameters(n)}
    adapter_ids |= {id(p) for f in state.fusions for p in state.fusion_parameters(f)}
    for setup, task_ids in _setups(method):
        model.set_active_adapters(setup)
        kwargs = {"task_ids": task_ids} if task_ids is not None else {}
        with torch.no_grad():
            expected = model(**inputs, **kwargs)[0]
            # replica 1 gets adapter weights scaled by 0.5: it must compute with those
            scaled = {p: p.detach().clone() for p in model.parameters() if id(p) in adapter_ids}
            for p in scaled:
                p.mul_(0.5)
            expected_scaled = model(**inputs, **kwargs)[0]
            for p, value in scaled.items():
                p.copy_(value)
            replicas = replicate_on_cpu(model, 2, transform=_scale_adapters(model, adapter_ids))
            out0 = replicas[0](**inputs, **kwargs)[0]
            out1 = replicas[1](**inputs, **kwargs)[0]
        # replicas hold clones: a GEMM may take another (alignment-dependent) path, hence 1e-6, not 0
        torch.testing.assert_close(out0, expected, rtol=1e-6, atol=1e-6, msg=f"replica 0, {setup!r}")
        torch.testing.assert_close(out1, expected_scaled, rtol=1e-6, atol=1e-6, msg=f"replica 1, {setup!r}")


def _scale_adapters(model, adapter_ids):
    """A ``replicate_on_cpu`` transform that halves replica 1's adapter weights."""

    def transform(index: int, original: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
        return tensor * 0.5 if index == 1 and id(original) in adapter_ids else tensor

    return transform


@pytest.mark.parametrize("method", METHODS)
def test_replica_gradients_equal_one_models(method) -> None:
    model = _model(method, "qwen3")
    model.train_adapter("a")
    model.eval()  # no dropout: both computations must be identical
    inputs = tiny_inputs(model, batch=4, seq=6)
    halves = [{k: v[:2] for k, v in inputs.items()}, {k: v[2:] for k, v in inputs.items()}]
    model(**inputs)[0].square().mean().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    replicas = replicate_on_cpu(model, 2)
    loss = sum(r(**h)[0].square().sum() for r, h in zip(replicas, halves)) / inputs["input_ids"].numel() / 32
    loss.backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert got.keys() == expected.keys() and any(g.abs().sum() > 0 for g in expected.values())
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------- copies
@pytest.mark.parametrize("method", METHODS)
def test_deepcopy_and_pickle_give_ordinary_independent_models(method) -> None:
    model = _model(method, "qwen3")
    inputs = tiny_inputs(model, batch=2, seq=6)
    for setup, task_ids in _setups(method):
        model.set_active_adapters(setup)
        kwargs = {"task_ids": task_ids} if task_ids is not None else {}
        with torch.no_grad():
            expected = model(**inputs, **kwargs)[0]
            for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
                assert type(clone) is type(model) and clone.active_adapters == model.active_adapters
                torch.testing.assert_close(clone(**inputs, **kwargs)[0], expected, rtol=0, atol=0)
    clone = copy.deepcopy(model)
    clone.set_active_adapters("a")
    model.set_active_adapters("a")
    with torch.no_grad():
        for p in clone._adapters_state.adapter_parameters("a"):
            p.zero_()
        assert not torch.equal(clone(**inputs)[0], model(**inputs)[0])  # the copy owns its weights
    clone.delete_adapter("a")
    assert model.has_adapter("a") and not clone.has_adapter("a")


# ---------------------------------------------------------------------------------------------- generate
GEN_METHODS = METHODS


def _prompts(model, batch: int, padded: bool) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[5, 9, 17, 33, 40, 41], [7, 8, 9, 10, 11, 12]])[:batch]
    mask = torch.ones_like(ids)
    if padded and batch > 1:
        mask[0, :2] = 0
        ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask}


def _generate(model, prompts, use_cache: bool, **kwargs):
    out = model.generate(**prompts, max_new_tokens=4, do_sample=False, use_cache=use_cache, pad_token_id=0,
                         output_scores=True, return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.scores, dim=1)


@pytest.mark.parametrize("method", GEN_METHODS)
@pytest.mark.parametrize("arch", ["qwen3", "gpt2"])
def test_generate_with_cache_equals_without(method, arch) -> None:
    model = _model(method, arch, "causal_lm")
    model.set_active_adapters("a")
    with torch.no_grad():
        base = model.generate(**_prompts(model, 1, False), max_new_tokens=4, do_sample=False, pad_token_id=0)
    for batch, padded in ((1, False), (2, False), (2, True)):
        prompts = _prompts(model, batch, padded)
        with torch.no_grad():
            cached, cached_scores = _generate(model, prompts, True)
            plain, plain_scores = _generate(model, prompts, False)
        assert torch.equal(cached, plain), (batch, padded)
        torch.testing.assert_close(cached_scores, plain_scores, rtol=1e-4, atol=1e-4)
    with torch.no_grad(), adapters.AdapterSetup(None):
        off = model.generate(**_prompts(model, 1, False), max_new_tokens=4, do_sample=False, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        on = model.generate(**_prompts(model, 1, False), max_new_tokens=4, do_sample=False, pad_token_id=0,
                            output_scores=True, return_dict_in_generate=True)
    assert torch.equal(on.sequences, base)
    assert not torch.equal(torch.stack(on.scores), torch.stack(off.scores))  # the adapter acts in generate


@pytest.mark.parametrize("method", [m for m in GEN_METHODS])
def test_multitask_and_parallel_through_generate_equal_single_adapters(method) -> None:
    blocks = set(_blocks(method))
    if not blocks & {"MultiTask", "Parallel"}:
        pytest.skip(f"{method} supports neither MultiTask nor Parallel")  # pragma: no cover
    model = _model(method, "qwen3", "causal_lm")
    prompts = _prompts(model, 2, True)
    single = {}
    with torch.no_grad():
        for name in "ab":
            with adapters.AdapterSetup(name):
                single[name] = _generate(model, prompts, True)
    if "MultiTask" in blocks:
        model.set_active_adapters(ac.MultiTask("a", "b"))
        with torch.no_grad():
            seqs, scores = _generate(model, prompts, True, task_ids=[1, 0])
            no_cache, _ = _generate(model, prompts, False, task_ids=["b", "a"])
        for row, name in enumerate("ba"):
            assert torch.equal(seqs[row], single[name][0][row])
            torch.testing.assert_close(scores[row], single[name][1][row], rtol=1e-5, atol=1e-5)
        assert torch.equal(no_cache, seqs)
        with torch.no_grad():  # num_beams expands each row: it keeps its task
            beams = model.generate(**prompts, task_ids=[1, 0], max_new_tokens=3, num_beams=2, do_sample=False,
                                   pad_token_id=0)
        assert beams.shape[0] == 2
    if "Parallel" in blocks:
        model.set_active_adapters(ac.Parallel("a", "b"))
        with torch.no_grad():
            seqs, scores = _generate(model, prompts, True)
        assert seqs.shape[0] == 4
        for copy_index, name in enumerate("ab"):
            rows = slice(2 * copy_index, 2 * copy_index + 2)
            assert torch.equal(seqs[rows], single[name][0])
            torch.testing.assert_close(scores[rows], single[name][1], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- checkpointing
def _train_setups(method: str) -> list[tuple[object, list[int] | None]]:
    return [(s, t) for s, t in _setups(method) if not isinstance(s, ac.Parallel)]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_unchecked_gradients(method, reentrant) -> None:
    """transformers' checkpointing re-runs each layer's forward in the backward pass, where no forward
    call is running; two calls with different routing precede one backward."""

    def grads(checkpointing: bool, setup, task_ids) -> dict[str, torch.Tensor]:
        model = _model(method, "qwen3", "causal_lm")
        model.train_adapter(setup)
        model.eval()  # no dropout, so the recomputation is deterministic
        model.lm_head.weight.requires_grad_(False)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.train()
            for module in model.modules():  # train mode turns checkpointing on; dropout stays off
                if isinstance(module, torch.nn.Dropout):
                    module.eval()
            model.enable_input_require_grads()
        inputs = tiny_inputs(model, batch=2, seq=6)
        kwargs = {"task_ids": task_ids} if task_ids is not None else {}
        loss = model(**inputs, **kwargs).logits.square().mean()
        if task_ids is not None:  # a second call routed the other way, before one backward
            loss = loss + model(**inputs, task_ids=task_ids[::-1]).logits.square().mean()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    for setup, task_ids in _train_setups(method):
        plain, checkpointed = grads(False, setup, task_ids), grads(True, setup, task_ids)
        assert plain.keys() == checkpointed.keys() and plain, setup
        for name, grad in plain.items():
            torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6, msg=f"{setup!r}: {name}")


@pytest.mark.parametrize("method", ["lora", "seq_bn", "loreft", "vera"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_module_call_checkpointing_recomputes_each_calls_routing(method, reentrant) -> None:
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = adapters.init(ToyEncoder(), interface=toy_interface())
        model.add_adapter("a", config=method)
        model.add_adapter("b", config=method)
        _perturb(model, "a", 1)
        _perturb(model, "b", 2)
        model.train_adapter(ac.MultiTask("a", "b"))
        model.checkpointing = ("reentrant" if reentrant else "non-reentrant") if checkpointing else None
        ids = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 11, 12]])
        mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
        loss = model(ids, attention_mask=mask, task_ids=[0, 1]).square().mean()
        loss = loss + model(ids, attention_mask=mask.flip(1), task_ids=[1, 1]).square().mean()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and plain
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------- plan identity
def test_two_fusions_of_the_same_adapters_each_run_their_own_weights() -> None:
    model = _model("seq_bn", "bert")
    inputs = tiny_inputs(model, batch=2, seq=6)
    model.add_adapter_fusion(["a", "b"], name="x")
    model.add_adapter_fusion(["a", "b"], name="y")
    _perturb(model, "a", 5)  # also perturbs every fusion, each differently
    x, y = ac.Fuse("a", "b", name="x"), ac.Fuse("a", "b", name="y")
    assert x != y and hash(x) != hash(y) and "name='x'" in repr(x)
    outputs = {}
    for fusion in (x, y, x):
        model.set_active_adapters(fusion)
        outputs.setdefault(fusion.fusion_name, []).append(_out(model, inputs))
    assert not torch.equal(outputs["x"][0], outputs["y"][0])
    assert torch.equal(outputs["x"][0], outputs["x"][1])
    assert torch.equal(_out(model, inputs, y), outputs["y"][0])
    # deleting a fusion leaves an unrelated active setup alone, even one whose repr contains its name
    model.add_adapter("x", config="seq_bn")
    model.set_active_adapters(ac.Stack("x", "a"))
    model.delete_adapter_fusion("x")
    assert model.active_adapters == ac.Stack("x", "a")
    model.set_active_adapters(y)
    model.delete_adapter_fusion("y")
    assert model.active_adapters is None


def test_task_ids_must_name_one_task_per_row() -> None:
    model = _model("lora", "qwen3")
    inputs = tiny_inputs(model, batch=4, seq=6)
    model.set_active_adapters(ac.MultiTask("a", "b"))
    for bad, match in ((["a", "b"], "2 entries for a batch of 4"), (["b"], "1 entries"), ([0, 1, 0], "3 entries"),
                       ("abab", "one task per row")):
        with pytest.raises(ValueError, match=match), torch.no_grad():
            model(**inputs, task_ids=bad)
