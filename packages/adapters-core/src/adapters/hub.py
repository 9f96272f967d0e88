"""Hugging Face Hub: download adapters by repo id and push saved adapters, via ``huggingface_hub``.

Loading calls ``huggingface_hub.snapshot_download``, so ``HF_HUB_OFFLINE=1``, ``HF_HUB_CACHE`` and the
on-disk cache layout (``models--org--name/snapshots/<commit>/``, ``refs/main``) behave as for any Hub
download; the snapshot may hold any format :func:`adapters.checkpoint.read_checkpoint` reads (native,
PEFT, AdapterHub 1.x). Pushing saves the adapter (``format=`` passes through to ``save_adapter``) plus a
generated model card naming the base model, the method(s) and the config, then calls ``create_repo``
and ``upload_folder`` on an ``HfApi`` (or the ``api=`` object given).

Tried: offline loading from a cache directory in the Hub's layout (also in a fresh process driven only by
the environment variables) and pushing to a stand-in ``HfApi`` (``tests/test_hub.py``). Not tried: the
real huggingface.co service (no network access where this was built): authentication, online
downloads and real uploads are untested here.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from torch import nn

from .errors import CheckpointError

__all__ = ["download_adapter", "push_adapter_to_hub"]


def download_adapter(repo_id: str, *, revision: str | None = None, cache_dir: str | None = None,
                     token: str | bool | None = None, **_: Any) -> str:
    """Fetch (or find in the local cache, honouring ``HF_HUB_OFFLINE``) an adapter repo; return its directory."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, token=token)
    except HFValidationError:
        raise CheckpointError(f"'{repo_id}' is neither a directory nor a valid Hub repo id.") from None
    except Exception as exc:  # noqa: BLE001 - network, auth and cache errors all land here
        raise CheckpointError(f"Could not get adapter '{repo_id}' from the Hub or the local cache: {exc}") from None


def _model_card(model: nn.Module, repo_id: str, adapter_name: str) -> str:
    state = model._adapters_state
    record = state.record(adapter_name)
    config = getattr(model, "config", None)
    base = getattr(config, "_name_or_path", None) or getattr(config, "model_type", "unknown")
    methods = ", ".join(record.method_names)
    lines = [
        "---",
        "library_name: adapters",
        "tags:",
        "- adapters",
        *[f"- {m}" for m in record.method_names],
        f"base_model: {base}" if base and "/" in str(base) else "",
        "---",
        "",
        f"# Adapter `{adapter_name}` for `{base}`",
        "",
        f"A **{methods}** adapter for `{base}` ({type(model).__name__}), made with the "
        "[adapters](https://pypi.org/project/adapters-core/) library.",
        "",
        "```python",
        "import adapters",
        "adapters.init(model)",
        f'name = model.load_adapter("{repo_id}", set_active=True)',
        "```",
        "",
        "## Config",
        "",
        "```json",
        __import__("json").dumps(record.config.to_dict(), indent=2, sort_keys=True),
        "```",
    ]
    return "\n".join(line for line in lines if line is not None)


def push_adapter_to_hub(model: nn.Module, repo_id: str, adapter_name: str, *, private: bool | None = None,
                        token: str | bool | None = None, commit_message: str | None = None,
                        revision: str | None = None, create_repo: bool = True, api: Any = None,
                        **save_kwargs: Any) -> str:
    """Save adapter ``adapter_name`` with a generated model card and upload it to ``repo_id``; return the
    commit URL. ``api`` may be a ``huggingface_hub.HfApi`` (tests pass one pointing at a stand-in)."""
    from huggingface_hub import HfApi

    api = api or HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_adapter(tmp, adapter_name, **save_kwargs)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as fh:
            fh.write(_model_card(model, repo_id, adapter_name))
        if create_repo:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision,
                                 commit_message=commit_message or f"Add adapter {adapter_name}")
    return str(getattr(info, "commit_url", info))
