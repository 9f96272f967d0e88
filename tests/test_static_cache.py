"""``generate()`` with a static cache (``cache_implementation="static"``), the way a compiled server runs: for
every method, the tokens equal those of the default dynamic cache, and inside the decode step transformers
compiles (``torch.compile``, here ``fullgraph=True`` with dynamo's ``eager`` backend: any graph break fails)
too, as one graph for every step. Prompt tuning (and prefix tuning on encoder-decoder models), whose virtual
tokens a static cache has no room for, is refused with a message, and the model generates as before afterwards."""

from __future__ import annotations

import pytest
import torch

import adapters
from adapters.errors import AdapterError
from adapters.testing import tiny_model

METHODS = ["lora", "ia3", "dora", "mtl_lora", "vera", "seq_bn", "par_bn", "double_seq_bn",
           "compacter[reduction_factor=4]", "loreft", "prefix_tuning"]
ARCHS = ["qwen3", "gpt2"]


def _model(arch: str, method: str) -> torch.nn.Module:
    model = adapters.init(tiny_model(arch, "causal_lm", num_hidden_layers=2))
    model.add_adapter("a", config=method)
    model.set_active_adapters("a")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every adapter weight away from its (often identity) initial value
        for p in model._adapters_state.adapter_parameters("a"):
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def _generate(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens and every step's logits."""
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                             min_new_tokens=10, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                             output_logits=True, **kwargs)
    return out.sequences, torch.stack(out.logits)


def _same(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> None:
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)


def _compile_config():
    from transformers.generation import CompileConfig

    config = CompileConfig(fullgraph=True, backend="eager")
    config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    return config


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_static_cache_and_compiled_decode_equal_dynamic_cache(arch: str, method: str) -> None:
    model = _model(arch, method)
    ids = torch.randint(4, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    want = _generate(model, ids)
    base = _generate(adapters.init(tiny_model(arch, "causal_lm", num_hidden_layers=2)), ids)
    assert not torch.allclose(want[1], base[1]), "the adapter changes nothing: the comparison would be empty"
    _same(_generate(model, ids, cache_implementation="static"), want)
    if arch != "qwen3":  # compiling every method once is enough
        return
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    try:
        got = _generate(model, ids, cache_implementation="static", compile_config=_compile_config())
        assert model._compiled_call is not None
        # one graph for the 9 decode steps: nothing reads the cache's length on the host (past the recompile
        # limit of 8, fullgraph=True would have raised)
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        torch._dynamo.reset()
    _same(got, want)


def test_prompt_tuning_refuses_a_static_cache_and_keeps_working() -> None:
    model = _model("qwen3", "prompt_tuning")
    ids = torch.randint(4, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    want = _generate(model, ids)
    with pytest.raises(AdapterError, match=r"Prompt tuning cannot use a static .* 10 virtual tokens"):
        _generate(model, ids, cache_implementation="static")
    _same(_generate(model, ids), want)


ROUTED = ["lora", "ia3", "dora", "mtl_lora", "vera", "seq_bn", "par_bn", "loreft", "prefix_tuning"]


@pytest.mark.parametrize("method", ROUTED)
def test_per_row_adapters_compile_into_the_decode_step(method: str) -> None:
    """``adapter_names`` (two adapters and a base row; prefix tuning: no base row, whose rows could not share
    one prefix length) through a static cache and the compiled decode step: the rows are grouped on the host
    in Python, so routing is part of one graph (``fullgraph=True``; LoReFT branches on the cache's length,
    which a static cache counts on the device, so its graph breaks there), and the tokens and logits equal
    the eager dynamic-cache generation's."""
    model = _model("qwen3", method)
    model.add_adapter("b", config=method)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model._adapters_state.adapter_parameters("b"):
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    ids = torch.randint(4, model.config.vocab_size, (3, 5), generator=torch.Generator().manual_seed(1))
    rows = ["b", "a", "a"] if method == "prefix_tuning" else ["b", "__base__", "a"]
    want = _generate(model, ids, adapter_names=rows)
    config = _compile_config()
    config.fullgraph = True
    torch._dynamo.reset()
    try:
        got = _generate(model, ids, adapter_names=rows, cache_implementation="static", compile_config=config)
    finally:
        torch._dynamo.reset()
    _same(got, want)


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_prefix_tuning_on_encoder_decoder_refuses_a_static_cache(arch: str) -> None:
    """Cross-attention caches and T5's relative biases of a static cache are sized without the prefix: a
    message, no shape error, and the model generates as before afterwards; other methods work there."""
    model = _model(arch, "prefix_tuning")
    ids = torch.randint(4, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    want = _generate(model, ids)
    with pytest.raises(AdapterError, match="Prefix tuning on an encoder-decoder model cannot use a static"):
        _generate(model, ids, cache_implementation="static")
    _same(_generate(model, ids), want)
    lora = _model(arch, "lora")
    _same(_generate(lora, ids, cache_implementation="static"), _generate(lora, ids))
