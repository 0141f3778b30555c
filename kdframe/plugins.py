"""Plugin loading and the typed facade the engine calls instead of ``pm.hook``.

Order: entry points of the ``kdframe`` group (the bundled plugins are entry points of the kdframe
distribution itself; third-party ones are skipped when KDFRAME_DISABLE_PLUGIN_AUTOLOAD is set),
then modules named with ``-p MODULE``. ``-p no:NAME`` blocks a plugin by entry-point or module name.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from typing import Any, Iterable

import attrs
import pluggy

from kdframe import hookspecs
from kdframe.errors import PluginError
from kdframe.registry import StrategyRegistry

GROUP = "kdframe"
hookimpl = pluggy.HookimplMarker("kdframe")


@attrs.frozen
class PluginInfo:
    name: str
    module: str
    version: str
    source: str  # "bundled" | "entry point" | "-p"


class PluginHost:
    """Loads plugins and exposes every hook as a plain method with a checked result."""

    def __init__(self, pm: pluggy.PluginManager, infos: list[PluginInfo], registry: StrategyRegistry):
        self.pm = pm
        self.infos = infos
        self.registry = registry

    # -- introspection -------------------------------------------------------------------
    def hooks_of(self, name: str) -> list[str]:
        plugin = self.pm.get_plugin(name)
        return sorted(
            caller.name.removeprefix("kdframe_")
            for caller in self.pm.get_hookcallers(plugin) or []
        )

    # -- single-answer hooks -------------------------------------------------------------
    def first(self, hook: str, what: str, **kwargs: Any) -> Any:
        result = getattr(self.pm.hook, hook)(**kwargs)
        if result is None:
            raise PluginError(f"no plugin provides {what}")
        return result

    def merged(self, hook: str, **kwargs: Any) -> dict[str, Any]:
        """Merge the dicts every plugin returns; a key given twice is an error."""
        merged: dict[str, Any] = {}
        for impl_result in self._results_with_names(hook, **kwargs):
            plugin, result = impl_result
            if result is None:
                continue
            if not isinstance(result, dict):
                raise PluginError(f"plugin {plugin!r}: {hook} must return a dict, got {type(result).__name__}")
            for key, value in result.items():
                if key in merged:
                    raise PluginError(f"plugin {plugin!r}: {hook} returned {key!r}, which another plugin returned too")
                merged[key] = value
        return merged

    def _results_with_names(self, hook: str, **kwargs: Any):
        caller = getattr(self.pm.hook, hook)
        for impl in reversed(caller.get_hookimpls()):
            args = {name: kwargs[name] for name in impl.argnames}
            yield impl.plugin_name, impl.function(**args)

    def call(self, hook: str, **kwargs: Any) -> list[Any]:
        return getattr(self.pm.hook, hook)(**kwargs)


def _version_of(module_name: str) -> str:
    top = module_name.split(".")[0]
    for dist in importlib.metadata.packages_distributions().get(top, []):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    module = sys.modules.get(module_name)
    return str(getattr(module, "__version__", "-"))


def _import_plugin(module_name: str, origin: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except Exception as exc:  # a plugin's own import error, reported as bad input
        raise PluginError(f"plugin {origin} failed to import: {type(exc).__name__}: {exc}") from exc


def _register(pm: pluggy.PluginManager, plugin: Any, name: str) -> None:
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:  # a hook implemented with wrong arguments
        raise PluginError(f"plugin {name!r} is invalid: {exc}") from None


def load_plugins(extra: Iterable[str] = (), objects: Iterable[Any] = ()) -> PluginHost:
    """Load every plugin and register their strategies. ``extra`` holds ``-p`` values;
    ``objects`` are plugin objects registered last (inline plugins in tests)."""
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    extra = list(extra)
    blocked = {value[3:] for value in extra if value.startswith("no:")}
    for name in blocked:
        pm.set_blocked(name)
    autoload = not os.environ.get("KDFRAME_DISABLE_PLUGIN_AUTOLOAD")
    infos: list[PluginInfo] = []

    for ep in sorted(importlib.metadata.entry_points(group=GROUP), key=lambda e: e.name):
        dist_name = ep.dist.name if ep.dist else ""
        bundled = dist_name.lower() == "kdframe"
        if not bundled and not autoload:
            continue
        if ep.name in blocked or ep.value in blocked:
            continue
        if pm.get_plugin(ep.name) is not None:
            raise PluginError(
                f"two installed plugins use the name {ep.name!r} ({ep.value} from {dist_name})"
            )
        module = _import_plugin(ep.value, f"{ep.name!r} (entry point {ep.value})")
        _register(pm, module, ep.name)
        version = ep.dist.version if ep.dist else "-"
        infos.append(PluginInfo(ep.name, ep.value, version, "bundled" if bundled else "entry point"))

    for module_name in extra:
        if module_name.startswith("no:") or module_name in blocked:
            continue
        if any(info.module == module_name for info in infos):
            continue  # already loaded (an installed plugin named again with -p)
        module = _import_plugin(module_name, f"{module_name!r} (-p)")
        _register(pm, module, module_name)
        infos.append(PluginInfo(module_name, module_name, _version_of(module_name), "-p"))

    for obj in objects:
        name = getattr(obj, "__name__", type(obj).__name__)
        _register(pm, obj, name)
        infos.append(PluginInfo(name, name, "-", "inline"))

    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        name = pm.get_name(exc.plugin) or exc.plugin
        raise PluginError(f"plugin {name!r} implements a hook kdframe does not define: {exc}") from None

    if os.environ.get("KDFRAME_TRACE_HOOKS") == "1":
        pm.trace.root.setwriter(lambda message: sys.stderr.write(message))
        pm.enable_tracing()

    registry = StrategyRegistry()
    for impl in pm.hook.kdframe_register_strategies.get_hookimpls():  # registration order: bundled first
        registry.current_plugin = impl.plugin_name
        impl.function(registry=registry)
    registry.current_plugin = "?"
    return PluginHost(pm, infos, registry)
