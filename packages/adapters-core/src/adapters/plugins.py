"""Plugin discovery and the registry of adapter methods and model interfaces.

Discovery reads entry-point *names* (groups ``adapters.methods``, ``adapters.exports`` and
``adapters.interfaces``) without importing any plugin. A plugin module is imported and registered
with the pluggy :class:`~pluggy.PluginManager` the first time one of its names is asked for;
the hooks are *historic*, so a plugin registered at any time gets the ``register`` callbacks.

Environment:

* ``ADAPTERS_DISABLE_PLUGIN_AUTOLOAD=1`` -- ignore installed plugins (core's own built-in model
  interfaces still load); register plugins in-process with :func:`register_plugin`.
* ``ADAPTERS_PLUGINS=dist-a,dist-b`` -- load entry points only from these distributions
  (core's built-in interfaces always load).
"""

from __future__ import annotations

import difflib
import importlib
import os
import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any

import pluggy

from . import hookspecs
from .hookspecs import PROJECT

if TYPE_CHECKING:
    from .interface import AdapterModelInterface
    from .method import AdapterConfig, AdapterMethod

__all__ = [
    "PluginError",
    "MissingPluginError",
    "PluginLoadWarning",
    "UnknownNameError",
    "PluginInfo",
    "Registry",
    "registry",
    "register_plugin",
    "FIRST_PARTY_NAMES",
]

GROUP_METHODS = "adapters.methods"
GROUP_EXPORTS = "adapters.exports"
GROUP_INTERFACES = "adapters.interfaces"
#: A method plugin may name one of its config strings here: ``add_adapter(name)`` without a config uses it.
GROUP_DEFAULT = "adapters.default_config"
#: ``"<format>:<method>"`` for each foreign checkpoint format a method reads or writes (AdapterMethod.formats).
GROUP_FORMATS = "adapters.formats"
CORE_DISTRIBUTION = "adapters-core"

#: Names provided by this project's own method packages, used only to say which distribution to
#: install when a name is not available. Core never imports these packages. A test compares it with the
#: entry points in the packages' pyproject.toml files (and prints the dict to paste when they drift).
FIRST_PARTY_NAMES: dict[str, tuple[str, ...]] = {
    "adapters-lora": ("lora", "ia3", "dora", "mtl_lora", "LoRAConfig", "IA3Config", "DoRAConfig", "MTLLoRAConfig"),
    "adapters-bottleneck": (
        "bottleneck", "seq_bn", "pfeiffer", "double_seq_bn", "houlsby", "par_bn", "parallel", "scaled_par_bn",
        "compacter", "compacter++", "adapterplus", "BnConfig", "SeqBnConfig", "DoubleSeqBnConfig", "ParBnConfig",
        "AdapterPlusConfig", "CompacterConfig", "CompacterPlusPlusConfig", "AdapterFusionConfig",
        "StaticAdapterFusionConfig", "DynamicAdapterFusionConfig",
    ),
    "adapters-reft": ("reft", "loreft", "noreft", "direft", "ReftConfig", "LoReftConfig", "NoReftConfig",
                      "DiReftConfig"),
    "adapters-vera": ("vera", "VeraConfig"),
    "adapters-prompt": ("prompt_tuning", "prefix_tuning", "prefix_tuning_flat", "PromptTuningConfig",
                        "PrefixTuningConfig"),
}


class PluginError(RuntimeError):
    """A plugin is broken, or two plugins claim the same name."""


class MissingPluginError(ModuleNotFoundError):
    """A method or name was asked for whose plugin distribution is not installed."""


class UnknownNameError(KeyError):
    """A config string, method or exported name that no installed plugin provides."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class PluginLoadWarning(UserWarning):
    """An installed plugin failed to import; the others keep working."""


@dataclass(frozen=True)
class PluginInfo:
    """One installed entry point: what it provides and where it comes from."""

    group: str
    name: str
    module: str
    distribution: str
    version: str


def _dist_of(ep: metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "<unknown distribution>", "?"
    return dist.metadata["Name"] or dist.name, dist.version


def _install_hint(name: str) -> str | None:
    for dist, names in FIRST_PARTY_NAMES.items():
        if name in names:
            return dist
    return None


class Registry:
    """Methods, exported names and model interfaces known to this process.

    Use the module-level :data:`registry`; tests may build a private one.
    """

    def __init__(self, *, autoload: bool | None = None) -> None:
        self._lock = threading.RLock()
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        if autoload is None:
            disabled = os.environ.get("ADAPTERS_DISABLE_PLUGIN_AUTOLOAD", "").strip().lower()
            autoload = disabled not in {"1", "true", "yes"}
        self.autoload = autoload
        allow = os.environ.get("ADAPTERS_PLUGINS", "").strip()
        self.allowed = {a.strip().lower() for a in allow.split(",") if a.strip()} or None
        self.methods: dict[str, AdapterMethod] = {}
        self.config_strings: dict[str, tuple[AdapterMethod, Any]] = {}
        self.exports: dict[str, tuple[Any, str]] = {}
        self.interfaces: dict[str, tuple[AdapterModelInterface, str]] = {}
        self.interface_variants: dict[str, Callable[[Any], AdapterModelInterface | None]] = {}
        self.failed: dict[str, tuple[PluginInfo, BaseException]] = {}
        self._owner: dict[tuple[str, str], str] = {}
        self._loaded_modules: set[str] = set()
        self._current_distribution = "<in-process>"
        self._entry_points: dict[str, dict[str, list[PluginInfo]]] | None = None
        self.pm.hook.adapters_register_methods.call_historic(kwargs={"register": self._register_method})
        self.pm.hook.adapters_register_model_interfaces.call_historic(kwargs={"register": self._register_interface})

    # ------------------------------------------------------------------ discovery
    def entry_points(self) -> dict[str, dict[str, list[PluginInfo]]]:
        """Installed entry points by group and name (read once; nothing is imported)."""
        if self._entry_points is None:
            found: dict[str, dict[str, list[PluginInfo]]] = {}
            for group in (GROUP_METHODS, GROUP_EXPORTS, GROUP_INTERFACES, GROUP_DEFAULT, GROUP_FORMATS):
                by_name: dict[str, list[PluginInfo]] = {}
                for ep in metadata.entry_points(group=group):
                    dist, version = _dist_of(ep)
                    if dist.lower() != CORE_DISTRIBUTION:
                        if not self.autoload or (self.allowed is not None and dist.lower() not in self.allowed):
                            continue
                    info = PluginInfo(group, ep.name, ep.value.split(":")[0], dist, version)
                    entries = by_name.setdefault(ep.name, [])
                    if all(e.distribution != info.distribution or e.module != info.module for e in entries):
                        entries.append(info)
                found[group] = by_name
            self._entry_points = found
        return self._entry_points

    def installed(self) -> list[PluginInfo]:
        """Every installed entry point, for listings (``adapters plugins``)."""
        return [info for group in self.entry_points().values() for infos in group.values() for info in infos]

    def _load_entry(self, group: str, name: str) -> bool:
        infos = self.entry_points().get(group, {}).get(name, [])
        dists = {i.distribution for i in infos}
        if len(dists) > 1:
            raise PluginError(
                f"'{name}' is claimed by several installed distributions: "
                + ", ".join(sorted(f"{i.distribution} {i.version} ({i.module})" for i in infos))
                + ". Uninstall one of them, or choose one with ADAPTERS_PLUGINS=<distribution>."
            )
        loaded = False
        for info in infos:
            self.load_module(info)
            loaded = True
        return loaded

    def load_module(self, info: PluginInfo) -> None:
        """Import a plugin module and register it; a failure is recorded and reported, not raised."""
        with self._lock:
            if info.module in self._loaded_modules:
                return
            if info.module in self.failed:
                return
            try:
                module = importlib.import_module(info.module)
            except Exception as exc:  # noqa: BLE001 - report any plugin import failure
                self.failed[info.module] = (info, exc)
                warnings.warn(
                    f"adapters plugin '{info.module}' from {info.distribution} {info.version} failed to load: "
                    f"{type(exc).__name__}: {exc}. Other plugins keep working.",
                    PluginLoadWarning,
                    stacklevel=3,
                )
                return
            self._loaded_modules.add(info.module)
            self.register_plugin(module, distribution=info.distribution)

    def load_all(self) -> None:
        """Import every installed plugin (for listings; normal use loads plugins on demand)."""
        for group in self.entry_points().values():
            for infos in group.values():
                for info in infos:
                    self.load_module(info)

    def register_plugin(self, plugin: object, *, distribution: str | None = None, name: str | None = None) -> None:
        """Register an in-process plugin (a module or object with ``@hookimpl`` functions)."""
        with self._lock:
            if self.pm.is_registered(plugin):
                return
            previous = self._current_distribution
            self._current_distribution = distribution or getattr(plugin, "__name__", type(plugin).__name__)
            try:
                self.pm.register(plugin, name=name)
            finally:
                self._current_distribution = previous

    # ------------------------------------------------------------------ register callbacks
    def _claim(self, kind: str, name: str) -> None:
        owner = self._owner.get((kind, name))
        dist = self._current_distribution
        if owner is not None and owner != dist:
            raise PluginError(f"{kind} '{name}' is registered by both {owner} and {dist}; names must be unique.")
        self._owner[(kind, name)] = dist

    def _register_method(self, method: AdapterMethod) -> None:
        # checked by what the registry uses, not by importing adapters.method (which imports the registry)
        if not all(callable(getattr(method, attr, None)) for attr in ("check_declaration", "config_strings",
                                                                      "exports", "attach")):
            raise PluginError(
                f"{self._current_distribution} registered {method!r}, which is not an adapters.method.AdapterMethod."
            )
        method.check_declaration()
        self._claim("method", method.name)
        strings = method.config_strings()
        exports = method.exports()
        for s in strings:
            self._claim("config string", s)
        for e in exports:
            self._claim("exported name", e)
        method.distribution = self._current_distribution
        self._check_entry_points(method, strings, exports)
        self.methods[method.name] = method
        for s, factory in strings.items():
            self.config_strings[s] = (method, factory)
        for e, obj in exports.items():
            self.exports[e] = (obj, self._current_distribution)

    def _check_entry_points(self, method: AdapterMethod, strings: dict[str, Any], exports: dict[str, Any]) -> None:
        """An installed plugin must declare every config string and exported name it registers as an entry
        point, or the name works only after another name of the plugin was used and is never listed."""
        dist = self._current_distribution
        points = self.entry_points()
        declared = {g: {n for n, infos in points.get(g, {}).items() if any(i.distribution == dist for i in infos)}
                    for g in (GROUP_METHODS, GROUP_EXPORTS)}
        if not declared[GROUP_METHODS] and not declared[GROUP_EXPORTS]:
            return  # registered in-process (register_plugin), not through entry points
        missing = [f"{GROUP_METHODS}: {s}" for s in sorted(strings) if s not in declared[GROUP_METHODS]]
        missing += [f"{GROUP_EXPORTS}: {e}" for e in sorted(exports) if e not in declared[GROUP_EXPORTS]]
        if missing:
            warnings.warn(f"{dist} registers method '{method.name}' with names its package metadata does not declare "
                          f"as entry points ({'; '.join(missing)}); they work only after another of its names was "
                          "used. Add them to [project.entry-points] in its pyproject.toml.",
                          PluginLoadWarning, stacklevel=4)

    def format_handlers(self, kind: str) -> list[tuple[AdapterMethod, Any, Any]]:
        """``(method, reader, writer)`` of every installed method that handles the foreign checkpoint
        format ``kind`` (loading the plugins whose ``adapters.formats`` entry points name it)."""
        with self._lock:
            for name, infos in self.entry_points().get(GROUP_FORMATS, {}).items():
                if name == kind or name.startswith(kind + ":"):
                    for info in infos:
                        self.load_module(info)
            return [(m, *m.formats[kind]) for m in self.methods.values() if kind in getattr(m, "formats", {})]

    def default_config(self) -> str | None:
        """The config string an installed plugin declares as the default of ``add_adapter(name)``
        (entry-point group ``adapters.default_config``), or ``None``.

        :raises PluginError: several distributions declare different defaults."""
        declared = self.entry_points().get(GROUP_DEFAULT, {})
        if len(declared) > 1:
            owners = ", ".join(f"'{n}' ({infos[0].distribution})" for n, infos in sorted(declared.items()))
            raise PluginError(f"Several installed plugins declare a default adapter config: {owners}. Pass config=...")
        return next(iter(declared), None)

    def _register_interface(self, model_type: str, interface: AdapterModelInterface,
                            for_config: Callable[[Any], AdapterModelInterface | None] | None = None) -> None:
        from .interface import AdapterModelInterface

        if not isinstance(interface, AdapterModelInterface):
            raise PluginError(f"{self._current_distribution} registered {interface!r} for {model_type!r}, "
                              "which is not an AdapterModelInterface.")
        if for_config is not None and not callable(for_config):
            raise PluginError(f"{self._current_distribution} registered for_config={for_config!r} for "
                              f"{model_type!r}; it must be a function of the model's config.")
        self._claim("model interface", model_type)
        if interface.model_type is None:
            interface.model_type = model_type
        self.interfaces[model_type] = (interface, self._current_distribution)
        if for_config is not None:
            self.interface_variants[model_type] = for_config

    def interface_for_model(self, model: Any) -> AdapterModelInterface | None:
        """The registered interface for ``model.config.model_type``, as that model needs it: the plugin's
        variant for the model's config (``for_config``), without the layer stacks the model class
        lacks (an encoder-only class of an encoder-decoder type). ``None`` when none is registered."""
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        interface = self.interface(model_type) if model_type else None
        if interface is None:
            return None
        variant = self.interface_variants.get(model_type)
        if variant is not None:
            interface = variant(config) or interface
        from .interface_fit import fit_layer_stacks

        return fit_layer_stacks(interface, model)

    # ------------------------------------------------------------------ lookups
    def _missing(self, kind: str, name: str, known: Iterable[str]) -> Exception:
        # a failed module may have been imported for another name/group (e.g. its method before its export)
        failed = [info for info, _ in self.failed.values()
                  if any(e.module == info.module for g in self.entry_points().values() for e in g.get(name, []))]
        dist = _install_hint(name)
        if not failed and dist is not None:  # installed but broken: never report it as not installed
            failed = [info for info, _ in self.failed.values() if info.distribution == dist]
        if failed:
            info = failed[0]
            exc = self.failed[info.module][1]
            return PluginError(
                f"{kind} '{name}' comes from {info.distribution} {info.version}, whose plugin module "
                f"'{info.module}' failed to import: {type(exc).__name__}: {exc}"
            )
        if dist is not None:
            return MissingPluginError(
                f"{kind} '{name}' is provided by the '{dist}' distribution, which is not installed "
                f"(or is disabled). Install it with: pip install {dist} (from a checkout of the adapters "
                f"repository: pip install -e packages/{dist})"
            )
        available = ", ".join(sorted(known)) or "none installed"
        close = difflib.get_close_matches(name, sorted(known), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return UnknownNameError(f"Unknown {kind} '{name}'.{hint} Available: {available}.")

    def method(self, name: str) -> AdapterMethod:
        """The method registered under ``name`` (loading its plugin on first use)."""
        with self._lock:
            if name not in self.methods:
                self._load_entry(GROUP_METHODS, name)
            if name not in self.methods:
                raise self._missing("adapter method", name, self.methods)
            return self.methods[name]

    def config_factory(self, config_string: str) -> tuple[AdapterMethod, Any]:
        """``(method, factory)`` for a config string such as ``"lora"`` or ``"seq_bn"``."""
        with self._lock:
            if config_string not in self.config_strings:
                self._load_entry(GROUP_METHODS, config_string)
            if config_string not in self.config_strings:
                known = set(self.config_strings) | set(self.entry_points().get(GROUP_METHODS, {}))
                raise self._missing("adapter config", config_string, known)
            return self.config_strings[config_string]

    def export(self, name: str) -> Any:
        """An exported object (e.g. ``LoRAConfig``) by name."""
        with self._lock:
            if name not in self.exports:
                self._load_entry(GROUP_EXPORTS, name)
            if name not in self.exports:
                raise self._missing("name", name, set(self.exports) | set(self.entry_points().get(GROUP_EXPORTS, {})))
            return self.exports[name][0]

    def has_export(self, name: str) -> bool:
        """Whether ``name`` is exported by a registered or installed plugin (nothing is imported)."""
        return name in self.exports or name in self.entry_points().get(GROUP_EXPORTS, {})

    def has_config_string(self, name: str) -> bool:
        """Whether a config string is registered or installed (nothing is imported)."""
        return name in self.config_strings or name in self.entry_points().get(GROUP_METHODS, {})

    def interface(self, model_type: str) -> AdapterModelInterface | None:
        """The interface registered for ``model_type``, or ``None``."""
        with self._lock:
            if model_type not in self.interfaces:
                self._load_entry(GROUP_INTERFACES, model_type)
            entry = self.interfaces.get(model_type)
            return entry[0] if entry else None

    def interface_types(self) -> list[str]:
        """Model types with an interface (registered or installed)."""
        return sorted(set(self.interfaces) | set(self.entry_points().get(GROUP_INTERFACES, {})))

    def method_for_config(self, config: AdapterConfig) -> AdapterMethod:
        """The method that implements a config instance."""
        return self.method(config.method)


registry = Registry()


def register_plugin(plugin: object, *, distribution: str | None = None) -> None:
    """Register an in-process plugin object or module with the global registry."""
    registry.register_plugin(plugin, distribution=distribution)
