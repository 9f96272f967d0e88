"""``adapters.init`` and the model-level API it adds to a model.

``init`` resolves the model's interface, validates every hook point, and gives the model the
methods of :class:`AdapterModelMixin` by switching its class to a subclass that mixes them in
(the original class stays the base, so ``isinstance`` checks keep working). Until an adapter is
added and activated the model computes exactly what it did before.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from . import composition as ac
from .errors import AdapterError, CompositionError
from .forward import generate_with_setup
from .interface import AdapterModelInterface
from .method import AdapterConfig, AttachSite
from .plugins import registry
from .state import AdapterRecord, AdapterState, FusionRecord, setup_adapter_names
from .summary import adapter_summary
from .trainability import freeze_base, set_trainable

__all__ = ["AdapterModelMixin"]

_class_cache: dict[type, type] = {}


def _adapter_class(cls: type) -> type:
    """The class an initialised model gets: the original class with :class:`AdapterModelMixin` mixed in
    (and, where the original generates, a ``generate`` that applies the call's setup to every step)."""
    if issubclass(cls, AdapterModelMixin):
        return cls
    if cls not in _class_cache:
        namespace: dict[str, Any] = {"__module__": cls.__module__, "_adapters_original_class": cls}
        original_generate = getattr(cls, "generate", None)
        if callable(original_generate):
            def generate(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
                return generate_with_setup(self, original_generate, args, kwargs)

            generate.__doc__ = (original_generate.__doc__ or "") + (
                "\n\nWith adapters: the active setup (or an open AdapterSetup) applies to the prompt and every "
                "decode step; task_ids=... routes MultiTask rows; Parallel returns one copy per child.")
            namespace["generate"] = generate
        original_save = getattr(cls, "save_pretrained", None)
        if callable(original_save):
            def save_pretrained(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
                from .trainer_checkpoints import save_pretrained as save_with_adapters

                return save_with_adapters(self, original_save, args, kwargs)

            save_pretrained.__doc__ = (original_save.__doc__ or "") + (
                "\n\nWith adapters (adapters.trainer_checkpoints.save_pretrained): while adapters train alone "
                "(train_adapter), writes the adapter checkpoint only, as AdapterTrainer does (what any "
                "transformers.Trainer then writes and resumes from); otherwise the full model, with a warning, and "
                "the unmerged active or trained adapters beside it.")
            namespace["save_pretrained"] = save_pretrained
        if hasattr(cls, "_hf_peft_config_loaded"):
            namespace["_hf_peft_config_loaded"] = property(_trains_adapters, _set_hf_peft_loaded)
        _class_cache[cls] = type(cls.__name__, (AdapterModelMixin, cls), namespace)
    return _class_cache[cls]


def _trains_adapters(self: nn.Module) -> bool:
    """transformers' "adapters are attached" flag (``_hf_peft_config_loaded``, set by its own PEFT integration):
    also true while our adapters train alone, so ``Trainer`` (and TRL's trainers) accept a quantized base with
    trainable adapters, as they accept a peft model. Saving is unaffected: ``save_pretrained`` writes the
    adapter checkpoint itself whenever this is true."""
    if self.__dict__.get("_adapters_hf_peft_loaded", False):
        return True
    from .trainer_checkpoints import adapters_in_training

    return "_adapters_state" in self.__dict__ and adapters_in_training(self)


def _set_hf_peft_loaded(self: nn.Module, value: bool) -> None:
    self.__dict__["_adapters_hf_peft_loaded"] = bool(value)


def _rebuild_adapter_model(original_class: type) -> nn.Module:
    """Unpickling / deep copy of an initialised model: an empty instance of its adapter class."""
    cls = _adapter_class(original_class)
    return cls.__new__(cls)


# ---------------------------------------------------------------------------------------------- model API
class AdapterModelMixin:
    """Methods added to a model by :func:`init`. Every failing call leaves the model unchanged."""

    _adapters_state: AdapterState

    def __reduce_ex__(self, protocol: Any) -> tuple:
        # the adapter class is made at run time: pickle and deepcopy rebuild it from the original class
        return (_rebuild_adapter_model, (type(self)._adapters_original_class,), self.__getstate__())

    # -- adapters --------------------------------------------------------------------------------
    @property
    def adapter_interface(self) -> AdapterModelInterface:
        """The interface this model was initialised with."""
        return self._adapters_state.interface

    @property
    def adapters_config(self) -> dict[str, AdapterConfig]:
        """Config of every adapter, by name."""
        return {n: r.config for n, r in self._adapters_state.adapters.items()}

    def has_adapter(self, name: str) -> bool:
        return name in self._adapters_state.adapters

    def add_adapter(self, adapter_name: str, config: Any = None, overwrite_ok: bool = False,
                    set_active: bool = False) -> None:
        """Add a new adapter.

        :param adapter_name: a name made of letters, digits, ``_``, ``-``.
        :param config: a config object, dict, or config string (``"lora"``, ``"lora[r=16]"``,
            ``"lora|seq_bn"``); ``None`` uses the config an installed plugin declares as the default
            (entry-point group ``adapters.default_config``; ``adapters-bottleneck`` declares ``seq_bn``,
            AdapterHub's default).
        :param overwrite_ok: replace an existing adapter of the same name.
        :param set_active: activate the new adapter.
        """
        state = self._adapters_state
        state.check_name(adapter_name)
        if adapter_name in state.adapters and not overwrite_ok:
            raise AdapterError(
                f"An adapter named '{adapter_name}' already exists; pass overwrite_ok=True to replace it."
            )
        if config is None:
            config = registry.default_config()
            if config is None:
                raise AdapterError(
                    "add_adapter needs a config (e.g. config='lora' or LoRAConfig(...)): no installed plugin declares "
                    "a default config. AdapterHub's default, 'seq_bn', comes with adapters-bottleneck: "
                    "pip install adapters-bottleneck (from a checkout: pip install -e packages/adapters-bottleneck)."
                )
        config = AdapterConfig.load(config)
        methods = []
        for single in config.configs:
            method = registry.method_for_config(single)
            if not state.interface.accepts(method.name):
                raise AdapterError(
                    f"This model's interface accepts methods {state.interface.adapter_methods}, not '{method.name}'."
                )
            method.validate(single, state.points)
            methods.append(method)
        was_active = state.active is not None and adapter_name in setup_adapter_names(state.active)
        previous_setup = state.active
        if adapter_name in state.adapters:
            if adapter_name in state.merged:
                raise AdapterError(f"Adapter '{adapter_name}' is merged; call reset_adapter() before overwriting it.")
            if was_active:
                state.activate(None)
            self.delete_adapter(adapter_name)
        else:
            was_active = False
        site = AttachSite(state, adapter_name)
        try:
            for method, single in zip(methods, config.configs):
                method.attach(site, adapter_name, single)
        except BaseException:
            _undo_attach(state, site, adapter_name)
            raise
        for layer in site.touched:  # new modules start in train mode; follow the model's mode instead
            if adapter_name in layer.adapters:
                layer.adapters[adapter_name].train(layer.training)
        for module in state.shared_modules(adapter_name).values():
            module.train(self.training)
        state.adapters[adapter_name] = AdapterRecord(adapter_name, config, methods)
        if state.training is not None and adapter_name not in state.training.adapters:
            # a training setup is in force: a new adapter outside it must not train along with it
            # (DDP would wait for its gradients, an optimizer would pick it up)
            for p in state.adapter_parameters(adapter_name):
                p.requires_grad_(False)
        state.refresh()
        if was_active:  # an overwritten adapter that was active stays active, in the same setup
            try:
                state.activate(previous_setup)
            except (AdapterError, CompositionError):
                pass
        if set_active:
            self.set_active_adapters(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter and every module it added; the model returns to its earlier state."""
        state = self._adapters_state
        record = state.record(adapter_name)
        if adapter_name in state.merged:
            raise AdapterError(f"Adapter '{adapter_name}' is merged into the weights; call reset_adapter() first.")
        for fusion in [f for f in state.fusions.values() if adapter_name in f.adapter_names]:
            self.delete_adapter_fusion(fusion.name)
        if state.active is not None and adapter_name in setup_adapter_names(state.active):
            state.activate(_without(state.active, adapter_name))
        state.remove_modules(adapter_name, state.layers(adapter_name))
        for method in record.methods:
            method.after_delete(state, adapter_name)
        del state.adapters[adapter_name]
        if not state.adapters:
            state.remove_layer_frames()  # the model is exactly as adapters.init left it
        state.refresh()

    def get_adapter(self, name: str) -> dict[str, nn.Module]:
        """The modules owning adapter ``name``'s parameters, by portable location."""
        self._adapters_state.record(name)
        return dict(self._adapters_state.adapter_modules(name))

    def adapter_to(self, name: str, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        """Move adapter ``name``'s weights to ``device`` and/or ``dtype``."""
        for _, module in self._adapters_state.adapter_modules(name):
            module.to(device=device, dtype=dtype)

    def iter_layers(self) -> Iterator[tuple[int, nn.Module]]:
        """``(index, layer)`` for every Transformer layer the interface names."""
        for lp in self._adapters_state.points.layers:
            yield lp.index, lp.module.module

    # -- activation ------------------------------------------------------------------------------
    @property
    def active_adapters(self) -> ac.AdapterCompositionBlock | None:
        """The active setup as a composition block; ``None`` when no adapter is active.

        A single adapter ``"copy"`` is ``Stack("copy")``, the block AdapterHub returns, so its code keeps
        working (``== Stack("copy")``, ``flatten()``, ``first()``, iteration). That block is the adapter
        alone: it equals ``"copy"`` (``model.active_adapters == "copy"``) and ``print`` shows ``copy``.
        """
        active = self._adapters_state.active
        return ac.Stack(active) if isinstance(active, str) else active

    @active_adapters.setter
    def active_adapters(self, setup: Any) -> None:
        self.set_active_adapters(setup)

    def set_active_adapters(self, adapter_setup: Any, skip_layers: Sequence[int] | None = None) -> None:
        """Activate a setup: a name, a list (``Stack``), a composition block, or ``None`` to deactivate."""
        if skip_layers:
            raise AdapterError("skip_layers is not supported; use leave_out in the adapter config instead.")
        self._adapters_state.activate(adapter_setup)

    def train_adapter(self, adapter_setup: Any, train_embeddings: bool = False) -> None:
        """Train exactly the adapters of ``adapter_setup``: activate it, switch to train mode and set
        ``requires_grad`` so that the trainable parameters are the adapters in the setup, the task
        heads outside the base model (``classifier``, ``score``; never the output embeddings,
        ``get_output_embeddings()``, tied or not) and, with ``train_embeddings=True``, the input
        embeddings. Everything else is frozen; :meth:`save_adapter` writes all of it back.
        Adapters added or loaded later stay frozen unless they belong to this setup.
        """
        state = self._adapters_state
        parsed = ac.parse_composition(adapter_setup)
        if parsed is None:
            raise AdapterError("train_adapter needs at least one adapter name.")
        state.validate_setup(parsed)
        merged = [n for n in setup_adapter_names(parsed) if n in state.merged]
        if merged:
            raise AdapterError(f"Adapter(s) {merged} are merged into the base weights, so their own weights take no "
                               "part in the forward pass and cannot train; call model.reset_adapter() first.")
        self._set_trainable(set(setup_adapter_names(parsed)), set(), train_embeddings)
        state.activate(parsed)
        self.train()

    def _set_trainable(self, adapter_names: set[str], fusion_names: set[str], train_embeddings: bool) -> None:
        set_trainable(self, adapter_names, fusion_names, train_embeddings)

    def freeze_model(self, freeze: bool = True) -> None:
        """Freeze (or unfreeze) every weight of the base model except adapter weights. Unfreezing ends
        the training setup of :meth:`train_adapter` (the whole model is then yours to train)."""
        freeze_base(self, freeze)
        if not freeze:
            self._adapters_state.training = None

    # -- merging ---------------------------------------------------------------------------------
    def merge_adapter(self, name: str) -> None:
        """Fold adapter ``name`` into the base weights so it costs nothing at inference; several adapters
        may be merged, in order (see :mod:`adapters.merging`). ``reset_adapter`` undoes all merges."""
        from .merging import merge_adapter

        merge_adapter(self, name)

    def reset_adapter(self) -> None:
        """Undo every :meth:`merge_adapter`: restore the base weights exactly, and the setup active before."""
        from .merging import reset_adapter

        reset_adapter(self)

    def merge_and_unload(self, adapter_names: str | Sequence[str] | None = None) -> nn.Module:
        """Merge (``None``: the active setup) and return this model as a plain transformers model, for
        ``save_pretrained`` and serving; see :func:`adapters.merging.merge_and_unload`."""
        from .merging import merge_and_unload

        return merge_and_unload(self, adapter_names)

    # -- averaging and sharing -------------------------------------------------------------------
    def average_adapter(self, adapter_name: str, adapter_list: Sequence[str], weights: Sequence[float] | None = None,
                        combine_strategy: str = "linear", normalize_weights: bool = True, set_active: bool = False,
                        **kwargs: Any) -> None:
        """Create ``adapter_name`` whose weights combine those of ``adapter_list``.

        ``combine_strategy="linear"`` averages every weight; methods may offer more (LoRA:
        ``"lora_linear_only_negate_b"``, ``"lora_delta_w_svd"`` with ``svd_rank``). All adapters must
        share the same config. Every argument is honoured or refused: the method decides the new
        adapter's config from the strategy and its arguments (:meth:`AdapterMethod.average_config`).

        :raises AdapterError: unknown strategy or argument, configs differ, weights do not fit.
        """
        state = self._adapters_state
        records = [state.record(n) for n in adapter_list]
        if not records:
            raise AdapterError("average_adapter needs at least one adapter in adapter_list.")
        base = records[0].config
        for r in records[1:]:
            if r.config.to_dict() != base.to_dict():
                raise AdapterError(
                    f"average_adapter: '{r.name}' has a different config than '{records[0].name}'; "
                    "only adapters with identical configs can be averaged."
                )
        weights = [1.0] * len(records) if weights is None else [float(w) for w in weights]
        if len(weights) != len(records):
            raise AdapterError(f"average_adapter got {len(weights)} weights for {len(records)} adapters.")
        if normalize_weights:
            total = sum(weights)
            if total == 0:
                raise AdapterError("average_adapter weights sum to 0.")
            weights = [w / total for w in weights]
        config = base
        for method in records[0].methods:
            config = method.average_config(config, combine_strategy, **kwargs)
        self.add_adapter(adapter_name, config)
        try:
            sources = list(zip(adapter_list, weights))
            for layer in state.layers(adapter_name):
                layer.average_adapter(adapter_name, sources, combine_strategy, **kwargs)
            for key, module in state.shared_modules(adapter_name).items():
                src = state.shared_modules(adapter_list[0])[key]
                module.load_state_dict(src.state_dict())
        except BaseException:
            self.delete_adapter(adapter_name)
            raise
        if set_active:
            self.set_active_adapters(adapter_name)

    def share_parameters(self, adapter_names: Sequence[str], name: str | None = None,
                         reference_adapter_name: str | None = None) -> None:
        """Tie parameters of several adapters of one method (e.g. MTL-LoRA's shared ``A``/``B``)."""
        state = self._adapters_state
        records = [state.record(n) for n in adapter_names]
        methods = {m.name: m for r in records for m in r.methods}
        if len(methods) != 1:
            raise AdapterError(f"share_parameters needs adapters of one method; got {sorted(methods)}.")
        method = next(iter(methods.values()))
        method.share_parameters(state, list(adapter_names), name or "_".join(adapter_names), reference_adapter_name)
        state.refresh()

    def unshare_parameters(self, adapter_names: Sequence[str] | None = None, name: str | None = None) -> None:
        """Undo :meth:`share_parameters`: each adapter gets its own copy of the shared weights."""
        state = self._adapters_state
        names = list(adapter_names or state.adapters)
        records = [state.record(n) for n in names]
        methods = {m.name: m for r in records for m in r.methods}
        for method in methods.values():
            method.unshare_parameters(state, [r.name for r in records if method in r.methods])
        state.refresh()

    # -- fusion ----------------------------------------------------------------------------------
    def add_adapter_fusion(self, adapter_names: Any, config: Any = None, name: str | None = None,
                           overwrite_ok: bool = False, set_active: bool = False) -> str:
        """Add an AdapterFusion layer over ``adapter_names`` (a ``Fuse`` block or a list). Returns its name."""
        state = self._adapters_state
        fuse = adapter_names if isinstance(adapter_names, ac.Fuse) else ac.Fuse(*adapter_names, name=name)
        names = fuse.flatten()
        records = [state.record(n) for n in names]
        owners = {m.name: m for r in records for m in r.methods if "Fuse" in m.supported_blocks}
        if len(owners) != 1:
            methods = sorted({m.name for r in records for m in r.methods})
            raise AdapterError(f"AdapterFusion fuses adapters of one method that supports Fuse (bottleneck adapters); "
                               f"{names} use {methods}.")
        method = next(iter(owners.values()))
        fusion_name = name or fuse.fusion_name
        if fusion_name in state.fusions:
            if not overwrite_ok:
                raise AdapterError(f"AdapterFusion '{fusion_name}' exists; pass overwrite_ok=True to replace it.")
            self.delete_adapter_fusion(fusion_name)
        try:
            method.add_fusion(state, fusion_name, names, config)
        except BaseException:
            try:
                method.delete_fusion(state, fusion_name)
            except Exception:  # noqa: BLE001 - best-effort cleanup of a half-made fusion
                pass
            state.invalidate()
            raise
        state.fusions[fusion_name] = FusionRecord(fusion_name, names, method, config)
        state.refresh()
        if set_active:
            self.set_active_adapters(ac.Fuse(*names, name=fusion_name))
        return fusion_name

    def delete_adapter_fusion(self, adapter_names: Any) -> None:
        """Remove an AdapterFusion layer (by name, ``Fuse`` block or list of the fused adapters)."""
        state = self._adapters_state
        fusion_name = _fusion_name(adapter_names)
        if fusion_name not in state.fusions:
            raise AdapterError(f"No AdapterFusion '{fusion_name}' (have: {sorted(state.fusions)}).")
        if fusion_name in ac.fusion_names(state.active):
            state.activate(None)
        state.fusions[fusion_name].method.delete_fusion(state, fusion_name)
        del state.fusions[fusion_name]
        state.refresh()

    def train_adapter_fusion(self, adapter_setup: Any, unfreeze_adapters: bool = False) -> None:
        """Train only the fusion layers of the ``Fuse`` blocks in ``adapter_setup`` (and, optionally, the
        fused adapters)."""
        state = self._adapters_state
        parsed = ac.parse_composition(adapter_setup)
        if parsed is None:
            raise AdapterError("train_adapter_fusion needs a Fuse setup.")
        if isinstance(parsed, str):
            raise CompositionError("train_adapter_fusion needs a Fuse block, e.g. Fuse('a', 'b').")
        state.validate_setup(parsed)
        fusions = ac.fusion_names(parsed)
        if not fusions:
            raise CompositionError("train_adapter_fusion: the setup contains no Fuse block.")
        self._set_trainable(set(setup_adapter_names(parsed)) if unfreeze_adapters else set(), fusions, False)
        state.activate(parsed)
        self.train()

    # -- summary ---------------------------------------------------------------------------------
    def adapter_summary(self, as_dict: bool = False) -> str | list[dict[str, Any]]:
        """A table of adapters: name, method, #params, % of the base model, active, trainable (merged);
        see :func:`adapters.summary.adapter_summary`."""
        return adapter_summary(self, as_dict)

    # -- checkpoints -----------------------------------------------------------------------------
    def save_adapter(self, save_directory: str, adapter_name: str, with_head: bool = True,
                     use_safetensors: bool = True, **kwargs: Any) -> None:
        """Save one adapter with everything its training could have changed (task head, trained
        embeddings) to ``save_directory``; see :func:`adapters.checkpoint.save_adapter`."""
        from .checkpoint import save_adapter

        save_adapter(self, save_directory, adapter_name, with_head=with_head, use_safetensors=use_safetensors,
                     **kwargs)

    def load_adapter(self, adapter_name_or_path: str, load_as: str | None = None, set_active: bool = False,
                     with_head: bool = True, **kwargs: Any) -> str:
        """Load an adapter from a directory or Hub repo id; return its name on this model."""
        from .checkpoint import load_adapter

        return load_adapter(self, adapter_name_or_path, load_as=load_as, set_active=set_active, with_head=with_head,
                            **kwargs)

    def hotswap_adapter(self, adapter_name_or_path: str, adapter_name: str, with_head: bool = True,
                        **kwargs: Any) -> None:
        """Load new weights (directory or Hub repo id) into the existing adapter ``adapter_name`` in place (same
        method and placement; a smaller LoRA rank is padded), so a ``torch.compile``'d model keeps its graphs;
        see :func:`adapters.hotswap.hotswap_adapter`."""
        from .hotswap import hotswap_adapter

        hotswap_adapter(self, adapter_name_or_path, adapter_name, with_head=with_head, **kwargs)

    def save_all_adapters(self, save_directory: str, with_head: bool = True, use_safetensors: bool = True) -> None:
        """Save every adapter into ``save_directory/<name>``."""
        import os

        for name in self._adapters_state.adapters:
            self.save_adapter(os.path.join(save_directory, name), name, with_head=with_head,
                              use_safetensors=use_safetensors)

    def save_adapter_fusion(self, save_directory: str, adapter_names: Any, **kwargs: Any) -> None:
        """Save an AdapterFusion layer's weights and config."""
        from .checkpoint import save_adapter_fusion

        save_adapter_fusion(self, save_directory, _fusion_name(adapter_names))

    def load_adapter_fusion(self, path: str, load_as: str | None = None, set_active: bool = False) -> str:
        """Load an AdapterFusion layer saved by :meth:`save_adapter_fusion` (the fused adapters must exist)."""
        from .checkpoint import load_adapter_fusion

        return load_adapter_fusion(self, path, load_as=load_as, set_active=set_active)

    def push_adapter_to_hub(self, repo_id: str, adapter_name: str, **kwargs: Any) -> str:
        """Upload adapter ``adapter_name`` to the Hugging Face Hub; see :mod:`adapters.hub`."""
        from .hub import push_adapter_to_hub

        return push_adapter_to_hub(self, repo_id, adapter_name, **kwargs)


def _without(setup: Any, name: str) -> Any:
    """``setup`` after deleting adapter ``name``: a Stack loses it, anything else that holds it ends."""
    if isinstance(setup, ac.Stack) and all(isinstance(c, str) for c in setup.children):
        rest = [c for c in setup.children if c != name]
        return None if not rest else rest[0] if len(rest) == 1 else ac.Stack(*rest)
    return None


def _fusion_name(adapter_names: Any) -> str:
    if isinstance(adapter_names, ac.Fuse):
        return adapter_names.fusion_name
    if isinstance(adapter_names, str):
        return adapter_names
    return ",".join(adapter_names)


def _undo_attach(state: AdapterState, site: AttachSite, name: str) -> None:
    state.remove_modules(name, list(reversed(site.touched)))


