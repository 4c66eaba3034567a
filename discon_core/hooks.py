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

from .errors import DisconError, close_matches
from .interfaces import KINDS

hookspec = pluggy.HookspecMarker("discon")
hookimpl = pluggy.HookimplMarker("discon")

ENTRY_POINT_GROUP = "discon"
DISABLE_ENV = "DISCON_DISABLE_PLUGINS"

BUILTIN_PLUGINS = (
    "discon_plugins.recipes",
    "discon_plugins.datasets",
    "discon_core.cli",
    "discon_plugins.cache",
    "discon_plugins.generate",
    "discon_plugins.demo",
    "discon_plugins.export",
    "discon_plugins.evaluation",
    "discon_plugins.extractors",
    "discon_plugins.maskgit_vq",
    "discon_plugins.kl_vae",
    "discon_plugins.rar",
    "discon_plugins.mar",
    "discon_plugins.heads",
    "discon_plugins.study",
    "discon_plugins.default_model",
)


class _Specs:
    @hookspec
    def discon_register_components(self, register: Callable[..., None]) -> None:
        """Register component factories by calling ``register(kind, name, factory, override=False)``.

        ``kind`` is one of dtok, ctok, prior, backbone, head; ``factory(**hyperparameters)``
        returns a ``torch.nn.Module`` satisfying that kind's interface. Its keyword parameters
        are the hyperparameters a preset or an override may set.
        """

    @hookspec
    def discon_register_presets(self, register: Callable[..., None]) -> None:
        """Contribute registry entries: ``register(mapping_or_yaml_path)`` with the schema of
        registry.yaml (``{kind: {name: entry}}``). They overlay the built-in registry; a user
        registry (``--registry``) overlays them."""

    @hookspec
    def discon_register_recipes(self, register: Callable[..., None]) -> None:
        """Training recipes: ``register(name, fn, override=False)``, ``fn(cfg, device) -> Recipe``
        (``recipe: name`` in a training config)."""

    @hookspec
    def discon_register_datasets(self, register: Callable[..., None]) -> None:
        """Datasets: ``register(type_name, factory, override=False)``; ``factory(**options)``
        returns a dataset with ``len()``, ``get(index, flip) -> (image [3,H,W] in [0,1], label)``
        (``data: {type: type_name, ...options}`` in a config)."""

    @hookspec
    def discon_register_extractors(self, register: Callable[..., None]) -> None:
        """Feature extractors for ``discon eval``: ``register(name, factory, override=False)``,
        ``factory()`` returns the extractor module (interface: discon_plugins/evaluation.py)."""

    @hookspec
    def discon_register_commands(self, subparsers) -> None:
        """Add ``discon`` sub-commands: ``p = subparsers.add_parser(...)``, then
        ``p.set_defaults(func=handler)`` where ``handler(args) -> int`` (exit code). Every such
        parser already has the common flags (``args.device``, ``args.dtype``, ``args.seed``,
        ``args.out``, ...; docs/cli.md); re-declare one to change its default or help, or
        ``p.set_defaults(unused_flags=("out",))`` to refuse one the command has no use for."""

    @hookspec(firstresult=True)
    def discon_default_pipeline(self) -> dict[str, str] | None:
        """kind -> preset name of the pipeline used when none is named (``discon run``,
        ``Pipeline.from_pretrained()``); the built-in: the embedded Fashion-MNIST one. The
        plugin registered last wins."""


def default_pipeline() -> dict[str, str]:
    names = plugin_manager().hook.discon_default_pipeline()
    if not names:
        raise DisconError("no default pipeline (DISCON_DISABLE_PLUGINS or no plugin provides "
                          "discon_default_pipeline): name the components")
    return dict(names)


@dataclass(frozen=True)
class Named:
    """A registered factory (component, recipe, dataset or extractor) and the plugin that
    provided it."""

    name: str
    fn: Callable[..., object]
    plugin: str


_manager: pluggy.PluginManager | None = None
_named: dict[str, dict] = {}  # hook name -> {name or (kind, name): Named}
generation = 0  # bumped whenever the plugin set changes, so caches built from it (registry) refresh


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
        _check_hooks(pm)
        _manager = pm
    return _manager


def register_plugin(plugin: object, name: str | None = None) -> None:
    """Register a plugin object (a module or any object with the hook) programmatically,
    e.g. from a notebook; its factories are visible on the next ``factories()`` call."""
    global generation
    pm = plugin_manager()
    pm.register(plugin, name=name)
    try:
        _check_hooks(pm)
    except DisconError:
        pm.unregister(plugin)
        raise
    _named.clear()
    generation += 1


def _check_hooks(pm: pluggy.PluginManager) -> None:
    """pluggy's check_pending as one line: a misspelled hook would otherwise never run."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        specs = sorted(n for n in vars(_Specs) if n.startswith("discon_"))
        hook = next((n for n in dir(e.plugin) if n not in specs
                     and pm.parse_hookimpl_opts(e.plugin, n)), "?")
        raise DisconError(f"plugin {pm.get_name(e.plugin)!r} implements unknown hook {hook!r}"
                          f"{close_matches(hook, specs)}; hooks are: {', '.join(specs)}") from None


def reset() -> None:
    """Forget the plugin manager and factories (re-discovers entry points on next use)."""
    global _manager, generation
    _manager = None
    _named.clear()
    generation += 1


def _impls(hook: str) -> list:
    """Implementations of ``hook``: built-ins first, in their listed order, then the others by
    name (pluggy itself calls the last registered first)."""
    impls = getattr(plugin_manager().hook, hook).get_hookimpls()
    order = {name: i for i, name in enumerate(BUILTIN_PLUGINS)}
    return sorted(impls, key=lambda i: (order.get(i.plugin_name, len(order)), i.plugin_name))


def _collect(what: str) -> dict:
    """All registrations of ``discon_register_<what>``, built-ins first: replacing a name that
    another plugin registered needs ``override=True``. Components are keyed by (kind, name)."""
    if what in _named:
        return _named[what]
    found: dict = {}

    def add(key, item: Named, label: str, override: bool) -> None:
        if not callable(item.fn):
            raise DisconError(f"plugin {item.plugin!r}: {label} is not callable")
        previous = found.get(key)
        if previous is not None and not override:
            raise DisconError(f"plugin {item.plugin!r} registers {label}, which plugin "
                              f"{previous.plugin!r} already provides; pass override=True to "
                              "register() to replace it deliberately")
        found[key] = item

    for impl in _impls(f"discon_register_{what}"):
        plugin = impl.plugin_name
        if what == "components":
            def register(kind: str, name: str, factory: Callable[..., object], *,
                         override: bool = False, _plugin: str = plugin) -> None:
                if kind not in KINDS:
                    raise DisconError(f"plugin {_plugin!r} registers {name!r} under unknown kind "
                                      f"{kind!r}; kinds are: {', '.join(KINDS)}")
                add((kind, name), Named(name, factory, _plugin), f"{kind} {name!r}", override)
        else:
            def register(name: str, fn: Callable[..., object], *, override: bool = False,
                         _plugin: str = plugin) -> None:
                add(name, Named(name, fn, _plugin), f"{what[:-1]} {name!r}", override)
        impl.function(register=register)
    _named[what] = found
    return found


def factories() -> dict[tuple[str, str], Named]:
    """Component factories keyed by (kind, name)."""
    return _collect("components")


def recipes() -> dict[str, Named]:
    """Training recipes by name (``recipe:`` in a training config)."""
    return _collect("recipes")


def datasets() -> dict[str, Named]:
    """Dataset factories by type name (``data: {type: ...}``)."""
    return _collect("datasets")


def extractors() -> dict[str, Named]:
    """Feature extractors of ``discon eval`` by name."""
    return _collect("extractors")


def presets() -> list[tuple[object, str]]:
    """Registry entries contributed by plugins: ``(mapping or YAML path, plugin name)``, in
    registration order (built-ins first)."""
    out: list[tuple[object, str]] = []
    for impl in _impls("discon_register_presets"):
        impl.function(register=lambda entries, _p=impl.plugin_name: out.append((entries, _p)))
    return out


def add_commands(subparsers) -> None:
    """Let every plugin add its ``discon`` sub-commands (built-in ones first)."""
    for impl in _impls("discon_register_commands"):
        impl.function(subparsers=subparsers)
