"""Serving many adapters from one base model (issue #17).

* per-row ``adapter_names=[...]`` (peft's argument, ``"__base__"`` for the bare base model) on forward and
  ``generate()``: every row computes what that adapter alone computes, the prompt and every decode step
  routed alike, on every method that supports ``MultiTask``;
* LoRA's gathered path: several plain LoRA adapters per row (``adapter_names``, ``MultiTask``,
  ``BatchSplit``, ``Parallel``) equal the row-by-row result for every K, with a fixed number of operations
  per adapted projection (counted), and its cache of stacked weights never serves stale weights (in-place
  edits, replaced parameters, replicas, copies);
* ``hotswap_adapter``: new weights into an existing adapter in place, no recompilation of a compiled model,
  outputs equal to a fresh load, refusals that change nothing;
* merged adapters cost nothing: a fully merged projection runs the base module's computation alone.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import adapters
import adapters.composition as ac
from adapters.errors import AdapterError, AdapterNotFoundError, CompositionError
from adapters.linear import AdapterLinear
from adapters.testing import count_kernel_ops, replicate_on_cpu, tiny_inputs, tiny_model
from adapters_lora.gathered import CACHE
from adapters_lora.layer import LoRALinear, MergedLoRALinear

RANKS = [4, 8, 2, 6, 8, 3, 5, 1]


def _lora_model(k: int, arch: str = "qwen3", task: str = "base", config: str = "lora[r={r}, alpha={a}]"):
    """A tiny model with ``k`` LoRA adapters ``a0..`` of different ranks and scalings, random weights."""
    model = tiny_model(arch, task)
    adapters.init(model)
    for i in range(k):
        r = RANKS[i % len(RANKS)]
        model.add_adapter(f"a{i}", config.format(r=r, a=r + 1 + i))
        _perturb(model, f"a{i}", seed=10 + i)
    model.eval()
    return model


def _perturb(model, name: str, seed: int, std: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model._adapters_state.adapter_parameters(name):
            if p.is_floating_point():
                p.add_((std * torch.randn(p.shape, generator=gen)).to(p.dtype))


def _main(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


def _row_by_row(model, inputs: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """Each row alone, run by its adapter alone (the base model for ``"__base__"``)."""
    rows = []
    with torch.no_grad():
        for i, name in enumerate(names):
            row = {k: v[i:i + 1] for k, v in inputs.items()}
            with adapters.AdapterSetup(None if name == "__base__" else name):
                rows.append(_main(model(**row)))
    return torch.cat(rows)


def _gathered_layers(model) -> list[LoRALinear]:
    """The LoRA layers whose gathered path built a stack (so a test knows the path really ran)."""
    return [layer for layer in model._adapters_state.layers()
            if any(e.weights is not None for e in layer.__dict__.get(CACHE, {}).values())]


# ---------------------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_adapter_names_equal_row_by_row_routing(k) -> None:
    model = _lora_model(k)
    names = [f"a{i % k}" for i in range(k + 2)] + ["__base__"]
    names = names[::-1]  # unsorted, repeated, and a base row
    inputs = tiny_inputs(model, batch=len(names), seq=5)
    reference = _row_by_row(model, inputs, names)
    with torch.no_grad():
        out = _main(model(**inputs, adapter_names=names))
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    assert len(_gathered_layers(model)) == 4  # q and v of both layers ran the gathered path
    with torch.no_grad():
        base = _main(model(**{k_: v[-1:] for k_, v in inputs.items()}, adapter_names=["__base__"]))
        with adapters.AdapterSetup(None):
            bare = _main(model(**{k_: v[-1:] for k_, v in inputs.items()}))
    assert torch.equal(base, bare)
    assert not torch.allclose(reference[0], reference[-1])  # rows really differ


@pytest.mark.parametrize("arch, config", [
    ("gpt2", "lora[r={r}, alpha={a}, attn_matrices=['q', 'v'], output_lora=True]"),  # fused c_attn + Conv1D
    ("bert", "lora[r={r}, alpha={a}, intermediate_lora=True]"),
])
def test_adapter_names_on_other_architectures(arch, config) -> None:
    model = _lora_model(3, arch, config=config)
    names = ["a2", "__base__", "a0", "a1"]
    inputs = tiny_inputs(model, batch=4, seq=5)
    with torch.no_grad():
        out = _main(model(**inputs, adapter_names=names))
    torch.testing.assert_close(out, _row_by_row(model, inputs, names), rtol=1e-5, atol=1e-5)
    assert _gathered_layers(model)  # plain projections gathered; a fused q|k|v falls back to routing


@pytest.mark.parametrize("k", [1, 2, 5])
def test_blocks_on_the_gathered_path_equal_the_general_path(k) -> None:
    """MultiTask, BatchSplit and Parallel without gradients (gathered) equal the same call with gradients
    enabled (the general path, sub-batch per adapter)."""
    model = _lora_model(k)
    children = [f"a{i}" for i in range(k)]
    inputs = tiny_inputs(model, batch=2 * k, seq=4)
    setups = [
        (ac.MultiTask(*children), {"task_ids": [(i * 3) % k for i in range(2 * k)]}),
        (ac.BatchSplit(*children, batch_sizes=[2] * k), {}),
        (ac.Parallel(*children), {}),
    ]
    for setup, kwargs in setups:
        model.set_active_adapters(setup)
        feed = inputs if not isinstance(setup, ac.Parallel) else {kk: v[:2] for kk, v in inputs.items()}
        general = _main(model(**feed, **kwargs)).detach()  # grad enabled: the general path
        with torch.no_grad():
            gathered = _main(model(**feed, **kwargs))
        torch.testing.assert_close(gathered, general, rtol=1e-5, atol=1e-5, msg=repr(setup))
    assert len(_gathered_layers(model)) == 4


def test_mixed_kinds_fall_back_and_stay_exact() -> None:
    """A DoRA adapter among LoRA ones: routing runs the general path there, with the same result."""
    model = _lora_model(2)
    model.add_adapter("d", "dora[r=4]")
    _perturb(model, "d", seed=3)
    names = ["d", "a1", "__base__", "a0"]
    inputs = tiny_inputs(model, batch=4, seq=5)
    with torch.no_grad():
        out = _main(model(**inputs, adapter_names=names))
    torch.testing.assert_close(out, _row_by_row(model, inputs, names), rtol=1e-5, atol=1e-5)
    assert not _gathered_layers(model)


# ---------------------------------------------------------------------------------------------- op counts
def _ops(model, inputs, names) -> dict[str, int]:
    with torch.no_grad():
        model(**inputs, adapter_names=names)  # builds the stacks
        return dict(count_kernel_ops(lambda: model(**inputs, adapter_names=names)))


@pytest.mark.parametrize("placement, sites", [("['q', 'v']", 4), ("['q', 'k', 'v', 'o']", 8)])
def test_operations_per_projection_do_not_depend_on_k(placement, sites) -> None:
    counts = {}
    inputs = tiny_inputs(tiny_model("qwen3"), batch=8, seq=4)
    for k in (1, 2, 4, 8):
        model = _lora_model(k, config="lora[r={r}, alpha={a}, attn_matrices=" + placement + "]")
        counts[k] = _ops(model, inputs, [f"a{i % k}" for i in range(8)])
    assert counts[1] == counts[2] == counts[4] == counts[8]  # op by op, whatever the number of adapters
    plain = tiny_model("qwen3")
    adapters.init(plain)
    with torch.no_grad():
        base = count_kernel_ops(lambda: plain(**inputs))
    added = {op: n - base.get(op, 0) for op, n in counts[8].items() if n != base.get(op, 0)}
    # per projection: gather the stacked weights, x·Aᵀ, y += h·(sB)ᵀ; per call: the rows grouped once
    assert added.pop("aten.index_select") == sites
    assert added.pop("aten.bmm") == sites
    assert added.pop("aten.baddbmm_") == sites
    assert sum(added.values()) == ROUTING_OPS, added


#: operations of the forward pre-hook grouping the rows of a call: none (adapter_names are grouped in Python on the
#: host, and the three index vectors made from lists; under torch.compile they are constants of the graph)
ROUTING_OPS = 0


# ---------------------------------------------------------------------------------------------- cache
def test_stacked_weights_follow_in_place_edits_and_replaced_parameters() -> None:
    model = _lora_model(5)
    names = ["a0", "a1", "a4", "__base__"]
    inputs = tiny_inputs(model, batch=4, seq=5)
    with torch.no_grad():
        first = _main(model(**inputs, adapter_names=names))
    _perturb(model, "a1", seed=99)  # in place, without autograd (as an optimizer step or load_state_dict)
    with torch.no_grad():
        second = _main(model(**inputs, adapter_names=names))
    torch.testing.assert_close(second, _row_by_row(model, inputs, names), rtol=1e-5, atol=1e-5)
    assert torch.equal(second[0], first[0]) and not torch.allclose(second[1], first[1])
    model.share_parameters(["a4", "a1"])  # a1 now uses a4's A and B objects (both rank 8)
    with torch.no_grad():
        third = _main(model(**inputs, adapter_names=names))
    torch.testing.assert_close(third, _row_by_row(model, inputs, names), rtol=1e-5, atol=1e-5)
    layer = model.layers[0].self_attn.q_proj
    with torch.no_grad():  # a parameter object replaced by hand, behind the layer's back
        layer.adapters["a1"].lora_B = torch.nn.Parameter(layer.adapters["a1"].lora_B * 2)
        fourth = _main(model(**inputs, adapter_names=names))
    torch.testing.assert_close(fourth, _row_by_row(model, inputs, names), rtol=1e-5, atol=1e-5)


def test_copies_and_replicas_never_use_the_originals_stack() -> None:
    model = _lora_model(2)
    names = ["a1", "a0"]
    inputs = tiny_inputs(model, batch=2, seq=5)
    with torch.no_grad():
        reference = _main(model(**inputs, adapter_names=names))
    assert _gathered_layers(model)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert not any(CACHE in layer.__dict__ for layer in other._adapters_state.layers())
        with torch.no_grad():
            torch.testing.assert_close(_main(other(**inputs, adapter_names=names)), reference, rtol=0, atol=0)

    def doubled(index: int, original: torch.Tensor, copy_: torch.Tensor) -> torch.Tensor:
        return copy_ * 2 if index == 1 and original.dim() == 2 and original.shape[0] in RANKS else copy_

    with torch.no_grad():
        replicas = replicate_on_cpu(model, 2, transform=doubled)  # replica 1: every lora_A doubled
        outs = [_main(r(**inputs, adapter_names=names)) for r in replicas]
    torch.testing.assert_close(outs[0], reference, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        for layer in model._adapters_state.layers():
            for a in layer.adapters.values():
                a.lora_A.mul_(2)
        torch.testing.assert_close(outs[1], _main(model(**inputs, adapter_names=names)), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outs[1], reference)


def test_a_training_step_between_routed_calls_is_seen() -> None:
    """Fused AdamW writes parameters without bumping their versions: a grad-enabled forward (any training
    step has one) and train() / eval() drop the stacks."""
    model = _lora_model(2)
    model.train_adapter("a1")
    names = ["a1", "a0", "__base__"]
    inputs = tiny_inputs(model, batch=3, seq=5)
    with torch.no_grad():
        model(**inputs, adapter_names=names)
    assert _gathered_layers(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, fused=True)
    _main(model(**inputs)).square().mean().backward()  # no train() / eval() between the routed calls
    optimizer.step()
    with torch.no_grad():
        out = _main(model(**inputs, adapter_names=names))
    torch.testing.assert_close(out, _row_by_row(model, inputs, names), rtol=1e-5, atol=1e-5)
    assert _gathered_layers(model)
    model.eval()
    assert not _gathered_layers(model)


def test_gradients_take_the_general_path_and_flow() -> None:
    model = _lora_model(2)
    model.train_adapter(ac.MultiTask("a0", "a1"))
    inputs = tiny_inputs(model, batch=4, seq=5)
    out = _main(model(**inputs, adapter_names=["a1", "a0", "__base__", "a1"]))
    out.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert not _gathered_layers(model)


# ---------------------------------------------------------------------------------------------- API
def test_adapter_names_errors_name_the_problem() -> None:
    model = _lora_model(2)
    inputs = tiny_inputs(model, batch=2, seq=4)
    with pytest.raises(AdapterNotFoundError, match="nope"):
        model(**inputs, adapter_names=["a0", "nope"])
    with pytest.raises(ValueError, match="adapter_names has 3 entries for a batch of 2"):
        model(**inputs, adapter_names=["a0", "a1", "a0"])
    with pytest.raises(ValueError, match="not both"):
        model(**inputs, adapter_names=["a0", "a1"], task_ids=[0, 1])
    with pytest.raises(ValueError, match="one adapter name per row"):
        model(**inputs, adapter_names="a0")
    model.set_active_adapters("a0")
    model.merge_adapter("a0")
    with pytest.raises(CompositionError, match="merged"):
        model(**inputs, adapter_names=["a0", "__base__"])
    model.reset_adapter()
    with torch.no_grad():  # the default setup is untouched by per-row calls
        model(**inputs, adapter_names=["a1", "__base__"])
    assert model.active_adapters == "a0"


def test_multitask_with_task_ids_still_routes() -> None:
    model = _lora_model(2)
    model.set_active_adapters(ac.MultiTask("a0", "a1"))
    inputs = tiny_inputs(model, batch=3, seq=4)
    with torch.no_grad():
        out = _main(model(**inputs, task_ids=["a1", "a0", "a1"]))
    torch.testing.assert_close(out, _row_by_row(model, inputs, ["a1", "a0", "a1"]), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- generate
GEN_METHODS = ["lora", "ia3", "dora", "mtl_lora", "seq_bn", "par_bn", "loreft", "vera"]


def _generate(model, prompts, **kwargs):
    out = model.generate(**prompts, max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True,
                         return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.scores, dim=1)


@pytest.mark.parametrize("method", GEN_METHODS)
def test_generate_routes_every_row_to_its_adapter(method) -> None:
    model = tiny_model("qwen3", "causal_lm")
    adapters.init(model)
    for i, name in enumerate("ab"):
        model.add_adapter(name, method)
        _perturb(model, name, seed=i + 1, std=0.5)
    model.eval()
    ids = torch.tensor([[5, 9, 17, 33, 40, 41], [7, 8, 9, 10, 11, 12], [50, 51, 52, 53, 54, 55]])
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    prompts = {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}
    names = ["b", "__base__", "a"]
    single = {}
    with torch.no_grad():
        for name in ("a", "b", None):
            with adapters.AdapterSetup(name):
                single[name or "__base__"] = _generate(model, prompts)
        seqs, scores = _generate(model, prompts, adapter_names=names)
    for row, name in enumerate(names):
        assert torch.equal(seqs[row], single[name][0][row]), (method, name)
        torch.testing.assert_close(scores[row], single[name][1][row], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(single["a"][1][2], single["__base__"][1][2])  # the adapters act
    if method == "lora":  # beams expand each row in place: it keeps its adapter
        with torch.no_grad():
            beams = model.generate(**prompts, adapter_names=names, max_new_tokens=3, num_beams=2, do_sample=False,
                                   pad_token_id=0)
            for row, name in enumerate(names):
                with adapters.AdapterSetup(None if name == "__base__" else name):
                    alone = model.generate(**prompts, max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
                assert torch.equal(beams[row], alone[row])


def test_generate_refuses_rows_that_do_not_match_the_prompts() -> None:
    """``generate()`` takes one entry per prompt row and repeats it itself for the rows it expands (beams,
    ``num_return_sequences``): a shorter list is refused before generating, even when its length divides the
    batch (it is never stretched over the prompts), for ``adapter_names`` and a MultiTask's ``task_ids``."""
    model = _lora_model(2, task="causal_lm")
    prompts = tiny_inputs(model, batch=4, seq=4)
    setup = model.active_adapters
    for rows in (["a0", "a1"], ["a1"], ["a0", "a1", "a0", "a1", "a0"]):
        with pytest.raises(ValueError, match=f"adapter_names has {len(rows)} entries for 4 prompts: pass one per "
                                             "prompt row"):
            model.generate(**prompts, adapter_names=rows, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert model.active_adapters == setup
    model.set_active_adapters(ac.MultiTask("a0", "a1"))
    with pytest.raises(ValueError, match="task_ids has 2 entries for 4 prompts"):
        model.generate(**prompts, task_ids=["a0", "a1"], max_new_tokens=2, do_sample=False, pad_token_id=0)
    with torch.no_grad():  # one per prompt, expanded by generate() for num_return_sequences
        out = model.generate(**prompts, task_ids=["a0", "a1", "a1", "a0"], max_new_tokens=2, do_sample=False,
                             num_beams=2, num_return_sequences=2, pad_token_id=0)
    assert out.shape[0] == 8


@pytest.mark.parametrize("method", [*GEN_METHODS, "prompt_tuning[prompt_length=3]", "prefix_tuning[prefix_length=2]"])
def test_an_adapter_no_row_names_changes_nothing(method) -> None:
    """Per-row calls route through one MultiTask over every adapter of the model: an adapter that no row
    names (of any method, prompt and prefix tuning too, which lengthen the sequence) leaves forward and
    ``generate()`` as they were (to float rounding: another LoRA-family kind at a projection moves its rows off
    the gathered path; the same tokens); rows that all name it equal the adapter alone. The LoRA sits on k and o,
    where VeRA (q, v) does not go."""
    model = tiny_model("qwen3", "causal_lm")
    adapters.init(model)
    model.add_adapter("a", "lora[attn_matrices=['k', 'o']]")
    _perturb(model, "a", seed=1, std=0.5)
    model.eval()
    prompts = tiny_inputs(model, batch=2, seq=5)
    rows = ["a", "__base__"]
    with torch.no_grad():
        want = model(**prompts, adapter_names=rows).logits
        want_gen = model.generate(**prompts, adapter_names=rows, max_new_tokens=3, do_sample=False, pad_token_id=0)
        model.add_adapter("x", method)
        _perturb(model, "x", seed=2, std=0.5)
        torch.testing.assert_close(model(**prompts, adapter_names=rows).logits, want, rtol=1e-5, atol=1e-6)
        assert torch.equal(model.generate(**prompts, adapter_names=rows, max_new_tokens=3, do_sample=False,
                                          pad_token_id=0), want_gen)
        routed = model(**prompts, adapter_names=["x", "x"]).logits
        with adapters.AdapterSetup("x"):
            alone = model(**prompts).logits
    torch.testing.assert_close(routed, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["t5", "bart"])
@pytest.mark.parametrize("method", ["lora", "ia3", "seq_bn", "par_bn", "loreft", "prefix_tuning[prefix_length=2]"])
def test_encoder_decoder_generate_runs_the_calls_setup_in_the_encoder(arch, method) -> None:
    """``generate()`` on an encoder-decoder model calls the encoder alone before the decoder steps: an open
    ``AdapterSetup``, ``AdapterSetup(None)`` and per-row ``adapter_names`` reach it, so each gives what the same
    setup made active gives (was: the encoder ran the default setup, the decoder the asked one); the encoder
    called alone routes its rows by ``adapter_names`` too."""
    model = adapters.init(tiny_model(arch, "seq2seq_lm"))
    for i, name in enumerate("ab"):
        model.add_adapter(name, method)
        _perturb(model, name, seed=i + 1, std=0.5)
    model.eval()
    prompts = tiny_inputs(model, batch=3, seq=5)
    kwargs = dict(max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True,
                  decoder_start_token_id=0, pad_token_id=0)

    def scores(**extra):
        return torch.stack(model.generate(**prompts, **kwargs, **extra).scores, dim=1)

    with torch.no_grad():
        alone = {}
        for name in ("a", "b", None):
            model.set_active_adapters(name)
            alone[name] = scores()
        model.set_active_adapters("a")
        with adapters.AdapterSetup("b"):
            torch.testing.assert_close(scores(), alone["b"], rtol=1e-5, atol=1e-5)
        with adapters.AdapterSetup(None):
            torch.testing.assert_close(scores(), alone[None], rtol=1e-5, atol=1e-5)
        # (a prefix adds positions to its rows: base rows cannot share a batch with prefixed ones)
        rows = ["b", "a", "b"] if method.startswith("prefix") else ["b", None, "a"]
        names = [name or "__base__" for name in rows]
        routed = scores(adapter_names=names)
        # the encoder called alone with adapter_names (its forward would swallow them in **kwargs)
        encoder = model.get_encoder()
        routed_encoder = encoder(**prompts, adapter_names=names).last_hidden_state
        encoded = {}
        for name in set(rows):
            with adapters.AdapterSetup(name):
                encoded[name] = encoder(**prompts).last_hidden_state
    for row, name in enumerate(rows):
        torch.testing.assert_close(routed[row], alone[name][row], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(routed_encoder[row], encoded[name][row], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(alone["a"], alone["b"])


@pytest.mark.parametrize("arch, task", [("qwen3", "causal_lm"), ("gpt2", "causal_lm"), ("bert", "seq_cls")])
@pytest.mark.parametrize("method", ["lora", "ia3", "seq_bn", "loreft", "prefix_tuning[prefix_length=2]"])
def test_base_model_called_alone_runs_the_setup_and_routes_rows(arch, task, method) -> None:
    """The base model inside a task model called on its own (``model.model(...)``, for embeddings): an open
    ``AdapterSetup`` and ``adapter_names=`` apply to it as to a call of the whole model (its forward would
    swallow ``adapter_names`` in ``**kwargs``, and the setup would not reach its layers)."""
    model = adapters.init(tiny_model(arch, task))
    for i, name in enumerate("ab"):
        model.add_adapter(name, method)
        _perturb(model, name, seed=i + 1, std=0.5)
    model.set_active_adapters("a")
    model.eval()
    inner = model.base_model
    assert inner is not model
    prompts = tiny_inputs(model, batch=3, seq=5)
    rows = ["b", "a", "b"] if method.startswith("prefix") else ["b", "__base__", "a"]
    with torch.no_grad():
        alone = {}
        for name in set(rows):
            model.set_active_adapters(None if name == "__base__" else name)
            alone[name] = inner(**prompts).last_hidden_state
        model.set_active_adapters("a")
        with adapters.AdapterSetup("b"):
            torch.testing.assert_close(inner(**prompts).last_hidden_state, alone["b"], rtol=1e-5, atol=1e-5)
        routed = inner(**prompts, adapter_names=rows).last_hidden_state
        torch.testing.assert_close(inner(**prompts).last_hidden_state, alone["a"], rtol=1e-5, atol=1e-5)
    for row, name in enumerate(rows):
        torch.testing.assert_close(routed[row], alone[name][row], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(alone["a"], alone["b"])


# ---------------------------------------------------------------------------------------------- hot swap
def _saved(tmp_path, config: str, seed: int, name: str = "new") -> str:
    source = tiny_model("qwen3")
    adapters.init(source)
    source.add_adapter(name, config)
    source.train_adapter(name)
    _perturb(source, name, seed=seed)
    path = str(tmp_path / f"{name}-{seed}")
    source.save_adapter(path, name)
    return path


def test_hotswap_keeps_compiled_graphs_and_equals_a_fresh_load(tmp_path) -> None:
    path = _saved(tmp_path, "lora[r=4, alpha=3]", seed=5)  # smaller rank, other scaling: padded
    model = tiny_model("qwen3")
    adapters.init(model)
    model.add_adapter("a", "lora[r=8, alpha=16]", set_active=True)
    _perturb(model, "a", seed=1)
    model.eval()
    compiles = []

    def backend(graph, example_inputs):
        compiles.append(graph)
        return graph.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    inputs = tiny_inputs(model, batch=2, seq=5)
    with torch.no_grad():
        before = compiled(**inputs).last_hidden_state
        assert len(compiles) == 1
        params = {id(p) for p in model.parameters()}
        model.hotswap_adapter(path, "a")
        after = compiled(**inputs).last_hidden_state
    assert len(compiles) == 1, "hotswap_adapter made torch.compile recompile"
    assert {id(p) for p in model.parameters()} == params and list(model._adapters_state.adapters) == ["a"]
    fresh = tiny_model("qwen3")
    adapters.init(fresh)
    fresh.load_adapter(path, set_active=True)
    with torch.no_grad():
        expected = fresh(**inputs).last_hidden_state
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(before, expected)
    saved_again = str(tmp_path / "again")  # the padded adapter saves and reloads as what it computes
    model.freeze_model()
    model.save_adapter(saved_again, "a")
    reloaded = tiny_model("qwen3")
    adapters.init(reloaded)
    reloaded.load_adapter(saved_again, set_active=True)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).last_hidden_state, expected, rtol=1e-5, atol=1e-6)


def test_hotswap_under_per_row_routing(tmp_path) -> None:
    path = _saved(tmp_path, "lora[r=2, alpha=5]", seed=7)
    model = _lora_model(3)
    names = ["a1", "a0", "__base__", "a2"]
    inputs = tiny_inputs(model, batch=4, seq=5)
    with torch.no_grad():
        model(**inputs, adapter_names=names)  # stacks built
    model.hotswap_adapter(path, "a1")
    with torch.no_grad():
        out = _main(model(**inputs, adapter_names=names))
    fresh = tiny_model("qwen3")
    adapters.init(fresh)
    fresh.load_adapter(path, load_as="x", set_active=True)
    with torch.no_grad():
        expected = _main(fresh(**{k: v[:1] for k, v in inputs.items()}))
    torch.testing.assert_close(out[:1], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, _row_by_row(model, inputs, names), rtol=1e-5, atol=1e-5)


def test_hotswap_refusals_change_nothing(tmp_path) -> None:
    model = tiny_model("qwen3")
    adapters.init(model)
    model.add_adapter("a", "lora[r=4]", set_active=True)
    _perturb(model, "a", seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plans = [layer._default_plan for layer in model._adapters_state.layers()]
    cases = [
        (_saved(tmp_path, "lora[r=8]", seed=2), "rank 8"),  # larger rank
        (_saved(tmp_path, "lora[r=4, attn_matrices=['q', 'k', 'v']]", seed=3), "placed differently"),
        (_saved(tmp_path, "ia3[attn_matrices=['q', 'v'], intermediate_lora=False]", seed=4), "another kind"),
        (_saved(tmp_path, "seq_bn", seed=5), "method"),
    ]
    for path, message in cases:
        with pytest.raises(AdapterError, match=message):
            model.hotswap_adapter(path, "a")
        assert list(model._adapters_state.adapters) == ["a"]
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert [layer._default_plan for layer in model._adapters_state.layers()] == plans
    model.merge_adapter("a")
    with pytest.raises(AdapterError, match="merged"):
        model.hotswap_adapter(cases[0][0], "a")


# ---------------------------------------------------------------------------------------------- merged
@pytest.mark.parametrize("arch", ["qwen3", "gpt2"])
def test_a_merged_projection_runs_the_base_computation_alone(arch) -> None:
    model = tiny_model(arch)
    plain = copy.deepcopy(model)
    adapters.init(model)
    model.add_adapter("a", "lora[r=4, output_lora=True]", set_active=True)
    _perturb(model, "a", seed=1)
    inputs = tiny_inputs(model, batch=1, seq=6)
    with torch.no_grad():
        unmerged = model(**inputs)[0]
        model.merge_adapter("a")
        merged = model(**inputs)[0]
    layers = model._adapters_state.layers()
    assert layers and all(type(layer) is MergedLoRALinear for layer in layers)
    assert MergedLoRALinear.forward is AdapterLinear.base_forward
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    ops_merged = count_kernel_ops(lambda: model(**inputs))
    ops_plain = count_kernel_ops(lambda: plain(**inputs))
    assert ops_merged == ops_plain  # the same operations as the model without adapters
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), *replicate_on_cpu(model, 2)):
        assert all(type(layer) is MergedLoRALinear for layer in other._adapters_state.layers())
        with torch.no_grad():
            torch.testing.assert_close(other(**inputs)[0], merged, rtol=0, atol=0)
    model.add_adapter("b", "lora[r=2]")  # an unmerged adapter here again: the layer routes again
    assert all(type(layer) is LoRALinear for layer in model._adapters_state.layers("b"))
    with torch.no_grad(), adapters.AdapterSetup(ac.Stack("a", "b")):
        assert model(**inputs)[0].shape == merged.shape
    model.delete_adapter("b")
    assert all(type(layer) is MergedLoRALinear for layer in model._adapters_state.layers())
    model.reset_adapter()
    assert all(type(layer) is LoRALinear for layer in model._adapters_state.layers())
    with torch.no_grad():
        assert torch.equal(model(**inputs)[0], unmerged)
    unloaded = model.merge_and_unload()
    assert not any(isinstance(m, AdapterLinear) for m in unloaded.modules())
