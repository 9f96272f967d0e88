"""Hub: load by repo id from the local cache (offline), push with a generated model card (SPEC §6).

Nothing here talks to huggingface.co: loading uses a cache directory in huggingface_hub's on-disk layout
with ``HF_HUB_OFFLINE=1``; pushing uses a stand-in for ``HfApi`` passed as ``api=``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import adapters
from adapters.errors import CheckpointError
from adapters.testing import tiny_inputs, tiny_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _model():
    model = tiny_model("qwen3", "base")
    adapters.init(model)
    return model


def _with_adapter():
    model = _model()
    model.config._name_or_path = "tiny-org/tiny-qwen3"
    model.add_adapter("helper", adapters.LoRAConfig(r=2, alpha=4, init_weights="bert", init_weights_seed=0))
    return model


def _populate_cache(cache, repo_id: str, source_dir) -> None:
    """Lay out ``source_dir`` the way huggingface_hub caches a model repo snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(source_dir, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)


class FakeApi:
    """Records what push_adapter_to_hub would send to the Hub and 'stores' it in a cache layout."""

    def __init__(self, cache) -> None:
        self.cache = cache
        self.repos: list[tuple[str, dict]] = []
        self.uploads: list[dict] = []

    def create_repo(self, repo_id, **kwargs):
        self.repos.append((repo_id, kwargs))
        return f"https://hub.example/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, revision=None, commit_message=None, **kwargs):
        files = {name: open(os.path.join(folder_path, name), "rb").read() for name in os.listdir(folder_path)}
        self.uploads.append({"repo_id": repo_id, "files": files, "message": commit_message})
        _populate_cache(self.cache, repo_id, folder_path)

        class Info:
            commit_url = f"https://hub.example/{repo_id}/commit/{COMMIT}"

        return Info()


def test_push_writes_card_and_files_then_loads_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    model = _with_adapter()
    model.set_active_adapters("helper")
    inputs = tiny_inputs(model)
    with torch.no_grad():
        ref = model(**inputs).last_hidden_state
    api = FakeApi(tmp_path / "cache")
    url = model.push_adapter_to_hub("me/helper-lora", "helper", api=api, private=True)
    assert url.endswith(COMMIT)
    assert api.repos == [("me/helper-lora", {"private": True, "exist_ok": True, "repo_type": "model"})]
    (upload,) = api.uploads
    assert sorted(upload["files"]) == ["README.md", "adapter.safetensors", "adapter_config.json"]
    card = upload["files"]["README.md"].decode()
    assert "base_model: tiny-org/tiny-qwen3" in card and "- lora" in card
    assert '"r": 2' in card and '"alpha": 4' in card and 'load_adapter("me/helper-lora"' in card
    assert json.loads(upload["files"]["adapter_config.json"])["config"]["method"] == "lora"

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    other = _model()
    name = other.load_adapter("me/helper-lora", set_active=True)
    assert name == "helper"
    with torch.no_grad():
        assert torch.equal(other(**inputs).last_hidden_state, ref)


def test_push_peft_format(tmp_path):
    model = _with_adapter()
    api = FakeApi(tmp_path / "cache")
    model.push_adapter_to_hub("me/helper-peft", "helper", api=api, format="peft")
    files = api.uploads[0]["files"]
    assert sorted(files) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert json.loads(files["adapter_config.json"])["peft_type"] == "LORA"


def test_missing_repo_offline_is_a_checkpoint_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model = _model()
    with pytest.raises(CheckpointError, match="nobody/nothing"):
        model.load_adapter("nobody/nothing")
    with pytest.raises(CheckpointError, match="neither a directory nor a valid Hub repo id"):
        model.load_adapter("not a//valid id")
    assert not model._adapters_state.adapters


SCRIPT = """
import os, sys, torch, adapters
from huggingface_hub import constants
from adapters.testing import tiny_model, tiny_inputs
assert constants.HF_HUB_OFFLINE and constants.HF_HUB_CACHE == os.environ["HF_HUB_CACHE"]
m = tiny_model("qwen3", "base"); adapters.init(m)
name = m.load_adapter("org/peft-lora", set_active=True)
print(name, m._adapters_state.record(name).config.r)
"""


def test_env_vars_select_cache_and_offline_mode(tmp_path):
    """A fresh process with HF_HUB_CACHE / HF_HUB_OFFLINE=1 finds a (PEFT-format) adapter in the cache."""
    data = os.path.join(os.path.dirname(__file__), "data", "compat", "peft_qwen3_lora")
    _populate_cache(tmp_path / "cache", "org/peft-lora", data)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-2:] == ["peft-lora", "2"]
