"""The conformance suite (:mod:`adapters.testing.conformance`, shipped for plugin authors): every
installed method on every architecture behaves like an adapter should.

For each installed config string and architecture (tiny random models from ``adapters.testing``):

* add -> outputs change (every adapter parameter is first perturbed with seeded noise, so methods
  whose adapters start as the identity -- LoRA's zero ``B``, IA3's ones -- really act),
* deactivate -> outputs equal the base model exactly,
* save -> load into a fresh identical model -> bit-identical outputs,
* merge (when the method can merge) -> equal within 1e-5; reset -> base weights exact; a method that
  cannot merge refuses and changes nothing,
* delete -> state-dict keys and module types back to the original,
* train a few SGD steps -> only adapter weights move,
* ``model.to(torch.float64)`` -> the forward pass works and agrees with float32,
* ``adapter_summary`` counts equal the real number of parameters the adapter added,
* threads in their own ``AdapterSetup``, ``nn.DataParallel``-style replicas and deep copies / pickles
  each compute with their own setup and weights.

Config strings whose plugin is not installed are skipped (slim installs are tested in their own nox
sessions). The core architectures must support every method; for the extra ones a method may refuse
with a clear ``AdapterError`` that leaves the model unchanged.
"""

from __future__ import annotations

import pytest

from adapters.plugins import registry
from adapters.testing.conformance import check_call_state, check_lifecycle, check_training

METHODS = ["lora", "ia3", "dora", "seq_bn", "par_bn", "double_seq_bn", "loreft", "vera",
           "prompt_tuning", "prefix_tuning", "prefix_tuning_flat",
           # placed by module names instead of the interface (every linear inside the layers)
           "lora[target_modules='all-linear']", "vera[target_modules='all-linear', r=8]"]
#: LoRA on the input embeddings and one projection by regular expression, on models whose embedding table
#: is not tied to another module (merging into a tied table is refused: tests/test_target_modules.py)
EMBEDDING_LORA = "lora[target_modules='.*(embed_tokens|wte|embed_in|word_embeddings|q_proj|c_attn|query)$', r=4]"
UNTIED_ARCHS = ["qwen3", "llama", "gpt2", "bert", "phi3", "gpt_neox"]
CORE_ARCHS = ["qwen3", "llama", "gpt2", "bert", "t5"]
EXTRA_ARCHS = ["phi3", "gpt_neox", "bart"]
ARCHS = CORE_ARCHS + EXTRA_ARCHS


def _installed(config: str) -> bool:
    return registry.has_config_string(config.split("[", 1)[0])


CASES = [
    pytest.param(m, a, id=f"{m}-{a}", marks=[] if _installed(m) else [pytest.mark.skip(reason=f"{m}: not installed")])
    for m in METHODS
    for a in ARCHS
] + [pytest.param(EMBEDDING_LORA, a, id=f"embedding_lora-{a}") for a in UNTIED_ARCHS]


@pytest.mark.parametrize(("method", "arch"), CASES)
def test_lifecycle(method, arch, tmp_path):
    check_lifecycle(method, arch, tmp_path, required=arch in CORE_ARCHS)


@pytest.mark.parametrize(("method", "arch"), CASES)
def test_training_summary_and_dtype(method, arch):
    check_training(method, arch, required=arch in CORE_ARCHS)


@pytest.mark.parametrize(("method", "arch"), [c for c in CASES if c.values[1] in ("qwen3", "gpt2", "bert")])
def test_threads_replicas_and_copies(method, arch):
    check_call_state(method, arch, required=True)
