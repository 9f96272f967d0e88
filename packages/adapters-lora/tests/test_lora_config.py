"""LoRA-family configs as users see them."""

from __future__ import annotations


def test_summary_names_the_variant() -> None:
    """``adapter_summary`` shows which LoRA-family variant each adapter is (the configs' ``label``), not the
    method that hosts them all."""
    import adapters
    from adapters.testing import tiny_model

    model = adapters.init(tiny_model("qwen3"))
    for name, config in (("i", "ia3"), ("d", "dora"), ("m", "mtl_lora"), ("l", "lora"), ("u", "lora|ia3")):
        model.add_adapter(name, config=config)
    rows = {r["name"]: r["method"] for r in model.adapter_summary(as_dict=True)}
    assert [rows[n] for n in "idmlu"] == ["ia3", "dora", "mtl_lora", "lora", "lora+ia3"]
    assert "ia3 " in model.adapter_summary()
