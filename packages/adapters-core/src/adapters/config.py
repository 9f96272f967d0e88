"""Adapter configs: the dataclass base every method's configs derive from, unions of configs
(``"lora|seq_bn"``), and config strings (``"lora[r=16]"``) resolved through the plugin registry."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import re
from collections.abc import Mapping
from typing import Any, ClassVar

from .errors import AdapterError

__all__ = ["AdapterConfig", "ConfigUnion", "parse_config_string"]


@dataclasses.dataclass
class AdapterConfig:
    """Base class of method configs: a dataclass whose class attribute ``method`` names its method.

    Subclasses are dataclasses too; every field must be JSON-serialisable (numbers, strings,
    booleans, lists, dicts, ``None``) so that it survives ``save_adapter`` / ``load_adapter``.
    """

    method: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """Every field plus ``method`` and ``config_class``, ready for JSON."""
        data: dict[str, Any] = {"method": self.method, "config_class": type(self).__name__}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            data[f.name] = list(value) if isinstance(value, tuple) else value
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdapterConfig:
        """Build the config from :meth:`to_dict` output. Unknown fields are an error."""
        data = {k: v for k, v in data.items() if k not in ("method", "config_class", "architecture")}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AdapterError(
                f"{cls.__name__} has no field(s) {unknown} (known: {sorted(known)}). The config may come from a "
                "newer version of the method's package; upgrade it."
            )
        return cls(**data)

    def replace(self, **changes: Any) -> AdapterConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @property
    def configs(self) -> list[AdapterConfig]:
        """The single configs this config is made of (itself; several for a :class:`ConfigUnion`)."""
        return [self]

    @property
    def label(self) -> str:
        """What :meth:`~adapters.model.adapter_summary` shows as the architecture: the method's name, or the
        name of the variant a method's config selects (override it for that)."""
        return self.method

    @staticmethod
    def load(config: str | Mapping[str, Any] | AdapterConfig, **overrides: Any) -> AdapterConfig:
        """Resolve a config given as an instance, a dict (as saved) or a string.

        Strings are config names registered by plugins (``"lora"``), with optional parameters
        (``"lora[r=16, alpha=32]"``) and ``|`` to join several into a :class:`ConfigUnion`.
        """
        from .plugins import registry

        if isinstance(config, AdapterConfig):
            result = config
        elif isinstance(config, str):
            result = parse_config_string(config)
        elif isinstance(config, Mapping):
            method = config.get("method") or config.get("architecture")
            if method == "union":
                result = ConfigUnion(*[AdapterConfig.load(c) for c in config["configs"]])
            elif not method:
                raise AdapterError(f"Config dict {dict(config)!r} has no 'method' key.")
            else:
                impl = registry.method(str(method))
                cls = impl.config_class_named(config.get("config_class"))
                result = cls.from_dict(config)
        else:
            raise AdapterError(f"Cannot use {config!r} as an adapter config; pass a config object, dict or string.")
        return result.replace(**overrides) if overrides else result


class ConfigUnion(AdapterConfig):
    """Several configs applied as one adapter (``"lora|seq_bn"``): one name, several methods."""

    method: ClassVar[str] = "union"

    def __init__(self, *configs: AdapterConfig) -> None:
        flat: list[AdapterConfig] = []
        for c in configs:
            flat.extend(c.configs)
        if not flat:
            raise AdapterError("ConfigUnion needs at least one config.")
        self._configs = flat

    @property
    def configs(self) -> list[AdapterConfig]:
        return list(self._configs)

    def to_dict(self) -> dict[str, Any]:
        return {"method": "union", "configs": [c.to_dict() for c in self._configs]}

    def replace(self, **changes: Any) -> AdapterConfig:
        return ConfigUnion(*[c.replace(**{k: v for k, v in changes.items() if hasattr(c, k)}) for c in self._configs])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ConfigUnion) and self._configs == other._configs

    def __repr__(self) -> str:
        return f"ConfigUnion({', '.join(map(repr, self._configs))})"


_CONFIG_RE = re.compile(r"^\s*([^\[\]|]+?)\s*(?:\[(.*)\])?\s*$", re.S)


def _split_top(text: str, sep: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[({":
            depth += 1
        elif ch in "])}":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


def parse_config_string(text: str) -> AdapterConfig:
    """Parse ``"name"``, ``"name[key=value, ...]"`` or ``"a|b"`` into a config through the registry."""
    from .plugins import registry

    pieces = [p for p in _split_top(text, "|")]
    if len(pieces) > 1:
        return ConfigUnion(*[parse_config_string(p) for p in pieces])
    match = _CONFIG_RE.match(text)
    if not match:
        raise AdapterError(f"Cannot parse adapter config string {text!r}; expected 'name' or 'name[key=value, ...]'.")
    name, args = match.group(1), match.group(2)
    _, factory = registry.config_factory(name)
    kwargs: dict[str, Any] = {}
    if args and args.strip():
        for item in _split_top(args, ","):
            if not item.strip():
                continue
            if "=" not in item:
                raise AdapterError(f"Config string {text!r}: '{item.strip()}' is not of the form key=value.")
            key, value = item.split("=", 1)
            try:
                kwargs[key.strip()] = ast.literal_eval(value.strip())
            except (ValueError, SyntaxError):
                kwargs[key.strip()] = value.strip()
    try:
        return factory(**kwargs)
    except TypeError as exc:
        raise AdapterError(_unknown_fields_message(text, factory, kwargs, exc)) from None


def _unknown_fields_message(text: str, factory: Any, kwargs: dict[str, Any], exc: TypeError) -> str:
    """Name the keys of a config string its config class does not have, with the fields it does have."""
    try:
        config = factory()
        fields = sorted(f.name for f in dataclasses.fields(config))
    except Exception:  # noqa: BLE001 - fall back to the original message
        return f"Config string {text!r}: {exc}"
    unknown = [key for key in kwargs if key not in fields]
    if not unknown:
        return f"Config string {text!r}: {exc}"
    named = []
    for key in unknown:
        close = difflib.get_close_matches(key, fields, n=1)
        named.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    return (f"Config string {text!r}: {type(config).__name__} has no field {', '.join(named)}. "
            f"Its fields: {', '.join(fields)}.")
