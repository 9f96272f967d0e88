"""The conformance checks plugin authors run (:mod:`adapters.testing.conformance`), on a decoder, an encoder
and an encoder-decoder model (the cross-package suite, ``tests/test_conformance.py``, runs more)."""

from __future__ import annotations

import pytest

from adapters.testing.conformance import check_method


@pytest.mark.parametrize("config", ["prompt_tuning", "prefix_tuning", "prefix_tuning_flat"])
@pytest.mark.parametrize("arch", ["qwen3", "bert", "t5"])
def test_conforms(config, arch, tmp_path):
    assert check_method(config, arch, tmp_path)
