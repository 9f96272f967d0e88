"""The conformance checks plugin authors run (:mod:`adapters.testing.conformance`), on a decoder, an encoder
and an encoder-decoder model (the cross-package suite, ``tests/test_conformance.py``, runs more)."""

from __future__ import annotations

import pytest

from adapters.testing.conformance import check_method


@pytest.mark.parametrize("config", ["prompt_tuning", "prefix_tuning", "prefix_tuning_flat"])
@pytest.mark.parametrize("arch", ["qwen3", "bert", "t5"])
def test_conforms(config, arch, tmp_path):
    assert check_method(config, arch, tmp_path)


#: built-in architectures each method refuses (cleanly, the model unchanged): ViT has no token embeddings for a
#: prompt; DistilBERT, ModernBERT and ViT attention take no key/value cache for prefixes
REFUSED = {"prompt_tuning": {"vit"}, "prefix_tuning": {"distilbert", "modernbert", "vit"}}


@pytest.mark.parametrize("config", sorted(REFUSED))
def test_every_builtin_architecture_conforms_or_refuses_cleanly(config, tmp_path):
    from adapters.testing import MODEL_TYPES
    from adapters.testing.conformance import check_lifecycle

    refused = {arch for arch in MODEL_TYPES if not check_lifecycle(config, arch, tmp_path, required=False)}
    assert refused == REFUSED[config]
