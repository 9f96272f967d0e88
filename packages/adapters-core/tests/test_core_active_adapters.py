"""``model.active_adapters`` for a single adapter (issue: "active_adapters shows Stack('copy')").

Decision: the property keeps returning the block AdapterHub returns, ``Stack("copy")``, so AdapterHub code
(``== Stack("copy")``, ``flatten()``, ``first()`` / ``last()``, iteration, ``len``) keeps working; that
one-child ``Stack`` is the adapter alone, so it also equals ``"copy"``, hashes like it and prints as
``copy``. The REPL shows the value (``Stack('copy')``), which can be typed back in.
"""

from __future__ import annotations

import pytest
import torch

import adapters
import adapters.composition as ac
from adapters.testing import tiny_inputs, tiny_model


@pytest.fixture
def model(toy):
    model = adapters.init(tiny_model("bert", "seq_cls"))
    for seed, name in enumerate(("copy", "other")):
        model.add_adapter(name, config=toy.NAME)
        toy.randomize(model, name, seed=seed + 1)
    return model


def test_a_single_active_adapter_reads_as_its_name_and_stays_an_adapterhub_block(model):
    model.set_active_adapters("copy")
    active = model.active_adapters
    # AdapterHub user code
    assert isinstance(active, ac.Stack) and active == ac.Stack("copy")
    assert active.flatten() == ["copy"] and list(active) == ["copy"] and len(active) == 1 and active[0] == "copy"
    assert active.first() == active.last() == "copy" and active.name == "copy"
    # what a newcomer tries
    assert active == "copy" and "copy" == active and not active != "copy"
    assert active != "other" and active != ac.Stack("copy", "other")
    assert str(active) == "copy" and f"{active}" == "copy" and repr(active) == "Stack('copy')"
    assert eval(repr(active), {"Stack": ac.Stack}) == active  # the repr is the value, typed back in
    assert {"copy": 1}[active] == 1 and hash(active) == hash("copy")
    # several adapters keep their block's form everywhere
    model.set_active_adapters(["copy", "other"])
    stacked = model.active_adapters
    assert stacked == ac.Stack("copy", "other") and stacked != "copy"
    assert str(stacked) == repr(stacked) == "Stack('copy', 'other')"
    assert (stacked.first(), stacked.last()) == ("copy", "other")
    model.set_active_adapters(None)
    assert model.active_adapters is None


def test_a_one_child_stack_is_its_child_everywhere():
    assert ac.Stack(ac.Stack("a")) == "a" == ac.Stack("a")
    assert ac.Stack("a", ac.Stack("b")) == ac.Stack("a", "b")
    assert hash(ac.Stack("a", ac.Stack("b"))) == hash(ac.Stack("a", "b"))
    fuse = ac.Fuse("a", "b")
    assert ac.Stack(fuse) == fuse and fuse == ac.Stack(fuse) and hash(ac.Stack(fuse)) == hash(fuse)
    assert str(ac.Stack(fuse)) == "Fuse('a', 'b')"
    # other blocks keep their identity: equal only to the same block
    assert ac.Parallel("a") != "a" and ac.Average("a") != ac.Stack("a") and ac.Stack("a", "b") != "a"
    assert ac.Fuse("a", "b", name="x") != ac.Stack(ac.Fuse("a", "b", name="y"))
    assert ac.Stack(fuse, "c").first() == "a" and ac.Stack("c", fuse).last() == "b"


def test_a_setup_equal_to_the_active_one_runs_the_same_function(model):
    inputs = tiny_inputs(model)
    model.set_active_adapters("copy")
    with torch.no_grad():
        by_name = model(**inputs).logits
        with adapters.AdapterSetup(ac.Stack("copy")):
            by_block = model(**inputs).logits
        with adapters.AdapterSetup("other"):
            other = model(**inputs).logits
        model.set_active_adapters(ac.Stack(ac.Stack("copy")))
        nested = model(**inputs).logits
    assert torch.equal(by_block, by_name) and torch.equal(nested, by_name)
    assert not torch.allclose(other, by_name)  # the setup does switch adapters
