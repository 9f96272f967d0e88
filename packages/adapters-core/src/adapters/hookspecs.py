"""The plugin contract: pluggy hook specifications of the ``adapters`` project.

A plugin is any object or module with functions marked ``@adapters.hookimpl`` whose names match
the specifications below. Installed plugins announce themselves through Python entry points
(see :mod:`adapters.plugins`), so a third party publishes a method or a model interface as its own
distribution without touching this library:

.. code-block:: toml

    [project.entry-points."adapters.methods"]
    my_method = "my_package.plugin"        # one entry per config string / method name it registers

    [project.entry-points."adapters.exports"]
    MyMethodConfig = "my_package.plugin"   # names importable as ``from adapters import MyMethodConfig``

    [project.entry-points."adapters.interfaces"]
    my_model_type = "my_package.plugin"    # config.model_type values it has an interface for

Entry-point names are read without importing anything; a plugin module is imported, and its
hooks called, only when one of the names it declares is first used.

Both hooks receive a ``register`` callback instead of returning values, so one plugin can add
several things and the core validates each one as it arrives (unique names, required attributes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .method import AdapterMethod

PROJECT = "adapters"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: Version of the plugin contract. A plugin may check it, and declares the core releases it
#: supports through its distribution's dependency on ``adapters-core``.
PLUGIN_API_VERSION = 1


@hookspec(historic=True)
def adapters_register_methods(register: Callable[[AdapterMethod], None]) -> None:
    """Register adapter methods.

    Call ``register(method)`` once for every :class:`adapters.method.AdapterMethod` instance the
    plugin provides. The method object declares its name, its config classes and config strings,
    the hook points it uses, the composition blocks it supports and whether it can merge.

    :param register: callback that validates and records a method. It raises
        :class:`adapters.plugins.PluginError` if the method's name, one of its config strings or one
        of its exported names is already taken by another distribution.
    :return: nothing; return values are ignored.
    """


@hookspec(historic=True)
def adapters_register_model_interfaces(register: Callable[..., None]) -> None:
    """Register model interfaces, keyed by ``config.model_type``.

    Call ``register(model_type, interface)`` for every model type the plugin knows how to map.
    ``adapters.init(model)`` then uses the interface registered for ``model.config.model_type``,
    without the layer stacks the model class lacks (encoder-only classes of encoder-decoder types).

    :param register: callback ``register(model_type: str, interface: AdapterModelInterface,
        for_config=None)``; ``for_config(config)`` may return another interface for configurations
        with another module structure (gated FFN, post-norm, cross-attention), or ``None`` for the
        registered one. Registering a model type that another distribution already registered is an
        error naming both.
    :return: nothing; return values are ignored.
    """
