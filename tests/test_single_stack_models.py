"""Task classes that hold one stack of an encoder-decoder model use the built-in interface minus the
stack they lack (T5EncoderModel: encoder only; BartForCausalLM: decoder only)."""

from __future__ import annotations

import pytest
import torch
import transformers

import adapters
from adapters.testing import tiny_config


@pytest.mark.parametrize(
    ("cls", "model_type", "stack", "cross"),
    [(transformers.T5EncoderModel, "t5", "encoder.block", None),
     (transformers.BartForCausalLM, "bart", "decoder.layers", "encoder_attn")],
)
def test_single_stack_class_gets_adapters(cls, model_type, stack, cross) -> None:
    torch.manual_seed(0)
    model = cls(tiny_config(model_type)).eval()
    inputs = {"input_ids": torch.randint(4, 100, (2, 6), generator=torch.Generator().manual_seed(0))}
    with torch.no_grad():
        base = model(**inputs)[0]
    adapters.init(model)
    interface = model.adapter_interface
    assert interface.model_layers == stack and interface.layer_cross_attn == cross
    assert len(model._adapters_state.points.layers) == 2
    model.add_adapter("a", "lora[init_weights='bert']", set_active=True)
    model.add_adapter("b", "seq_bn[init_weights='bert']")
    with torch.no_grad():
        with_lora = model(**inputs)[0]
        model.set_active_adapters("b")
        with_bn = model(**inputs)[0]
        model.set_active_adapters(None)
        inactive = model(**inputs)[0]
    assert (with_lora - base).abs().max() > 1e-4
    assert (with_bn - base).abs().max() > 1e-4
    assert torch.equal(inactive, base)
