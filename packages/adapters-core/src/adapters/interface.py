"""``AdapterModelInterface``: the schema that maps any Transformer onto adapter hook points.

An interface is plain data: dotted attribute paths relative to a reference module.
The prefix of each field name says which module a path starts from:

* ``model_*`` -- the base model (``base_model``; default: the model's ``base_model_prefix`` module),
* ``layer_*`` -- one Transformer layer (an element of ``model_layers``),
* ``attn_*``  -- an attention module (``layer_self_attn`` or ``layer_cross_attn``).

Paths may have several levels (``"mlp.down_proj"``) and integer steps into
``ModuleList``/``Sequential`` containers, negative ones included (``"layer.-1.DenseReluDense"``).
``model_layers`` may name several layer stacks (``["encoder.block", "decoder.block"]``); their
layers are numbered consecutively, encoder first.

Resolving an interface on a concrete model (and validating it) is done by :mod:`adapters.points`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

__all__ = ["AdapterModelInterface", "INTERFACE_FILE", "QKV_LAYOUTS"]

INTERFACE_FILE = "adapter_interface.json"

#: How a fused QKV projection orders its output features.
#: ``concat``: ``[q | k | v]`` (GPT-2, phi3, ModernBERT); ``per_head``: for every head
#: ``[q_h | k_h | v_h]`` (GPT-NeoX).
QKV_LAYOUTS = ("concat", "per_head")

PATH_FIELDS = (
    "model_embeddings",
    "model_layers",
    "layer_self_attn",
    "layer_cross_attn",
    "attn_q_proj",
    "attn_k_proj",
    "attn_v_proj",
    "attn_qkv_proj",
    "attn_o_proj",
    "layer_intermediate_proj",
    "layer_output_proj",
    "layer_pre_self_attn",
    "layer_pre_cross_attn",
    "layer_pre_ffn",
    "layer_ln_1",
    "layer_ln_2",
    "base_model",
)


@dataclass
class AdapterModelInterface:
    """Dotted attribute paths that tell adapter methods where to attach in a model.

    :param adapter_methods: method families this model accepts (e.g. ``["lora", "bottleneck"]``);
        ``None`` accepts every installed method. ``adapter_types=`` is accepted as an alias.
    :param model_embeddings: the token/patch embedding module, relative to ``base_model``.
    :param model_layers: the ``ModuleList`` of Transformer layers (or a list of several, for
        encoder-decoder models), relative to ``base_model``.
    :param layer_self_attn: the self-attention module, relative to a layer.
    :param layer_cross_attn: the cross-attention module, relative to a layer (``None`` if absent;
        layers that lack it, such as encoder layers, are skipped).
    :param attn_q_proj: query projection, relative to the attention module.
    :param attn_k_proj: key projection.
    :param attn_v_proj: value projection.
    :param attn_qkv_proj: a fused query/key/value projection (instead of the three above).
    :param attn_o_proj: attention output projection.
    :param layer_intermediate_proj: the FFN's first (up) projection, relative to a layer.
    :param layer_output_proj: the FFN's last (down) projection, relative to a layer.
    :param layer_pre_self_attn: a module whose *input* is the residual stream entering self-attention.
    :param layer_pre_cross_attn: a module whose input is the residual stream entering cross-attention.
    :param layer_pre_ffn: a module whose input is the residual stream entering the FFN.
    :param layer_ln_1: the norm applied after the attention sub-block's residual add (post-norm models).
    :param layer_ln_2: the norm applied after the FFN sub-block's residual add (post-norm models).
    :param base_model: path of the module that holds the layers, from the model root; ``None`` means
        the model's ``base_model_prefix`` module (or the model itself).
    :param attn_qkv_split: output widths ``[q, k, v]`` of the fused projection; ``None`` derives them
        from the model config (grouped-query attention included) or splits into equal thirds.
    :param attn_qkv_layout: ``"concat"`` or ``"per_head"``, see :data:`QKV_LAYOUTS`.
    :param model_type: the ``config.model_type`` this interface was written for (informational).
    """

    adapter_methods: list[str] | None = None
    model_embeddings: str | None = None
    model_layers: str | list[str] | None = None
    layer_self_attn: str | None = None
    layer_cross_attn: str | None = None
    attn_q_proj: str | None = None
    attn_k_proj: str | None = None
    attn_v_proj: str | None = None
    attn_qkv_proj: str | None = None
    attn_o_proj: str | None = None
    layer_intermediate_proj: str | None = None
    layer_output_proj: str | None = None
    layer_pre_self_attn: str | None = None
    layer_pre_cross_attn: str | None = None
    layer_pre_ffn: str | None = None
    layer_ln_1: str | None = None
    layer_ln_2: str | None = None
    base_model: str | None = None
    attn_qkv_split: list[int] | None = None
    attn_qkv_layout: str = "concat"
    model_type: str | None = None
    adapter_types: dataclasses.InitVar[list[str] | None] = None

    def __post_init__(self, adapter_types: list[str] | None) -> None:
        if adapter_types is not None:
            if self.adapter_methods is not None and list(self.adapter_methods) != list(adapter_types):
                raise ValueError(
                    "AdapterModelInterface got both adapter_methods and its alias adapter_types "
                    f"with different values ({self.adapter_methods!r} vs {adapter_types!r}); pass one."
                )
            self.adapter_methods = list(adapter_types)
        if self.adapter_methods is not None:
            self.adapter_methods = list(self.adapter_methods)
        if isinstance(self.model_layers, (list, tuple)):
            self.model_layers = list(self.model_layers)
        if self.model_layers is None:
            raise ValueError("AdapterModelInterface needs model_layers: the path of the layer list.")
        if self.attn_qkv_proj is not None and any(
            p is not None for p in (self.attn_q_proj, self.attn_k_proj, self.attn_v_proj)
        ):
            raise ValueError(
                "AdapterModelInterface: give either attn_qkv_proj (a fused projection) or "
                "attn_q_proj/attn_k_proj/attn_v_proj, not both."
            )
        if self.attn_qkv_layout not in QKV_LAYOUTS:
            raise ValueError(
                f"AdapterModelInterface: attn_qkv_layout={self.attn_qkv_layout!r} is unknown; "
                f"use one of {QKV_LAYOUTS}."
            )
        for name in PATH_FIELDS:
            value = getattr(self, name)
            paths = value if isinstance(value, list) else [value]
            for path in paths:
                if path is not None and (not isinstance(path, str) or not path.strip(".")):
                    raise ValueError(f"AdapterModelInterface.{name} must be a dotted path string, got {path!r}.")

    @property
    def layer_stacks(self) -> list[str]:
        """The layer-list paths as a list (one entry for decoder-only / encoder-only models)."""
        return list(self.model_layers) if isinstance(self.model_layers, list) else [self.model_layers]

    def accepts(self, method: str) -> bool:
        """Whether this interface allows adapters of method family ``method``."""
        return self.adapter_methods is None or method in self.adapter_methods

    def __str__(self) -> str:
        """One field per line (set fields only), as ``adapters inspect`` shows an interface."""
        width = max(len(name) for name in PATH_FIELDS)
        lines = [f"AdapterModelInterface ({self.model_type or 'no model type'})"]
        lines += [f"  {name:<{width}}  {value}" for name, value in self.path_fields().items()]
        extra = {k: v for k, v in self.__dict__.items() if k not in PATH_FIELDS and k != "model_type" and v}
        lines += [f"  {name:<{width}}  {value}" for name, value in extra.items()]
        return "\n".join(lines)

    def path_fields(self) -> dict[str, Any]:
        """Every path field that is set, by field name."""
        return {name: getattr(self, name) for name in PATH_FIELDS if getattr(self, name) is not None}

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterModelInterface:
        """Build an interface from :meth:`to_dict` output; unknown keys are an error."""
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)} | {"adapter_types"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"Unknown AdapterModelInterface field(s) {unknown}; known fields: {sorted(known)}. "
                "Was this interface written by a newer version of adapters?"
            )
        return cls(**data)

    def save(self, directory: str | os.PathLike, *, model_type: str | None = None) -> str:
        """Write ``adapter_interface.json`` into ``directory``; return the file path."""
        from ._version import __version__

        os.makedirs(directory, exist_ok=True)
        payload = {
            "model_type": model_type or self.model_type,
            "interface": self.to_dict(),
            "version": __version__,
        }
        path = os.path.join(directory, INTERFACE_FILE)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=2, sort_keys=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> AdapterModelInterface:
        """Read an interface from ``adapter_interface.json`` (or the directory holding it)."""
        if os.path.isdir(path):
            path = os.path.join(path, INTERFACE_FILE)
        try:
            with open(path, encoding="utf-8") as fh:
                payload = json.load(fh)
        except FileNotFoundError:
            raise FileNotFoundError(f"No model interface file at {path}.") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(payload, dict) or "interface" not in payload:
            raise ValueError(f"{path} has no 'interface' entry; it is not an adapter_interface.json file.")
        interface = cls.from_dict(payload["interface"])
        if interface.model_type is None:
            interface.model_type = payload.get("model_type")
        return interface
