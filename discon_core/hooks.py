"""pluggy hook specs, the plugin manager, and plugin discovery.

A plugin is any module with a ``discon_register_components`` hook implementation::

    from discon_core.hooks import hookimpl

    @hookimpl
    def discon_register_components(register):
        register("head", "my-head", MyHead)             # kind, name, factory
        register("head", "flow", BetterFlow, override=True)   # replacing a built-in: say so

The built-in plugins (``discon_plugins.*``) register through the same hook. Third-party
plugins are found through the ``discon`` entry-point group::

    [project.entry-points."discon"]
    my_plugin = "my_package.plugin_module"

Set ``DISCON_DISABLE_PLUGINS=1`` to load the built-ins only (tests do, for isolation).
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import pluggy

from .errors import DisconError
from .interfaces import KINDS

hookspec = pluggy.HookspecMarker("discon")
hookimpl = pluggy.HookimplMarker("discon")

ENTRY_POINT_GROUP = "discon"
DISABLE_ENV = "DISCON_DISABLE_PLUGINS"

BUILTIN_PLUGINS = (
    "discon_plugins.maskgit_vq",
    "discon_plugins.kl_vae",
    "discon_plugins.rar",
    "discon_plugins.mar",
    "discon_plugins.heads",
)


class _Specs:
    @hookspec
    def discon_register_components(self, register: Callable[..., None]) -> None:
        """Register component factories by calling ``register(kind, name, factory, override=False)``.

        ``kind`` is one of dtok, ctok, prior, backbone, head; ``factory(**hyperparameters)``
        returns a ``torch.nn.Module`` satisfying that kind's interface. Its keyword parameters
        are the hyperparameters a preset or an override may set.
        """


@dataclass(frozen=True)
class Factory:
    """A registered component factory and the plugin that provided it."""

    kind: str
    name: str
    fn: Callable[..., object]
    plugin: str


_manager: pluggy.PluginManager | None = None
_factories: dict[tuple[str, str], Factory] | None = None


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager (built-ins, then entry-point plugins unless disabled)."""
    global _manager
    if _manager is None:
        pm = pluggy.PluginManager("discon")
        pm.add_hookspecs(_Specs)
        for module_name in BUILTIN_PLUGINS:
            pm.register(importlib.import_module(module_name), name=module_name)
        if os.environ.get(DISABLE_ENV, "").strip() not in ("1", "true", "yes"):
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        _manager = pm
    return _manager


def register_plugin(plugin: object, name: str | None = None) -> None:
    """Register a plugin object (a module or any object with the hook) programmatically,
    e.g. from a notebook; its factories are visible on the next ``factories()`` call."""
    global _factories
    plugin_manager().register(plugin, name=name)
    _factories = None


def reset() -> None:
    """Forget the plugin manager and factories (re-discovers entry points on next use)."""
    global _manager, _factories
    _manager = None
    _factories = None


def _is_builtin(plugin_name: str) -> bool:
    return plugin_name in BUILTIN_PLUGINS


def factories() -> dict[tuple[str, str], Factory]:
    """All registered factories keyed by (kind, name). Built-ins register first."""
    global _factories
    if _factories is not None:
        return _factories
    pm = plugin_manager()
    found: dict[tuple[str, str], Factory] = {}
    impls = pm.hook.discon_register_components.get_hookimpls()
    # pluggy calls implementations last-registered first; we want built-ins first.
    impls = sorted(impls, key=lambda i: (not _is_builtin(i.plugin_name), i.plugin_name))
    for impl in impls:
        plugin = impl.plugin_name

        def register(kind: str, name: str, factory: Callable[..., object], *,
                     override: bool = False, _plugin: str = plugin) -> None:
            if kind not in KINDS:
                raise DisconError(
                    f"plugin {_plugin!r} registers {name!r} under unknown kind {kind!r}; "
                    f"kinds are: {', '.join(KINDS)}")
            if not callable(factory):
                raise DisconError(f"plugin {_plugin!r}: factory for {kind} {name!r} is not callable")
            previous = found.get((kind, name))
            if previous is not None and not override:
                raise DisconError(
                    f"plugin {_plugin!r} registers {kind} {name!r}, which plugin "
                    f"{previous.plugin!r} already provides; pass override=True to "
                    "register() to replace it deliberately")
            found[(kind, name)] = Factory(kind, name, factory, _plugin)

        impl.function(register=register)
    _factories = found
    return found
