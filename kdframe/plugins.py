"""Plugin loading, and the typed facade through which the core calls every hook.

Registration order: the plugins bundled with kdframe (entry points of the kdframe distribution),
then third-party entry points of the ``kdframe`` group (skipped when
KDFRAME_DISABLE_PLUGIN_AUTOLOAD is set), then modules named with ``-p MODULE``, then inline plugin
objects (tests). pluggy calls the last registered first, so a third-party plugin answers a
firstresult hook before a bundled one, whatever its name; bundled catch-all implementations (the
Hugging Face loader takes any model) are also ``trylast``. ``-p no:NAME`` blocks a plugin by
entry-point or module name.

Every call goes through ``pm.hook``: ``wrapper=True`` implementations wrap any hook and
``KDFRAME_TRACE_HOOKS=1`` prints every call.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import pluggy

from kdframe import hookspecs
from kdframe.errors import PluginError
from kdframe.registry import Registry
from kdframe.types import Control, Features, LoadedModel, StageContext, TaskInfo, TokenizedSplit, as_needed, extracted

GROUP = "kdframe"
hookimpl = pluggy.HookimplMarker("kdframe")


@attrs.frozen
class PluginInfo:
    name: str
    module: str
    version: str
    source: str  # "bundled" | "entry point" | "-p" | "inline"


class PluginHost:
    """The loaded plugins; one method per hook, each checking what the plugins answered."""

    def __init__(self, pm: pluggy.PluginManager, infos: list[PluginInfo], registry: Registry):
        self.pm = pm
        self.infos = infos
        self.registry = registry

    # -- introspection ------------------------------------------------------------------------
    def hooks_of(self, name: str) -> list[str]:
        plugin = self.pm.get_plugin(name)
        return sorted(caller.name.removeprefix("kdframe_") for caller in self.pm.get_hookcallers(plugin) or [])

    def answers_by_plugin(self, hook: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Each implementing plugin's own answer (None for none), in pluggy's call order, each plugin
        called alone through pluggy (its own wrappers apply): for contract checks, and for naming
        the plugins behind a clash."""
        caller = getattr(self.pm.hook, hook)
        firstresult = caller.spec.opts.get("firstresult", False)
        names = [impl.plugin_name for impl in reversed(caller.get_hookimpls()) if not (impl.wrapper or impl.hookwrapper)]
        answers = []
        for name in dict.fromkeys(names):
            others = [plugin for other, plugin in self.pm.list_name_plugin() if other != name and plugin is not None]
            results = self.pm.subset_hook_caller(hook, others)(**kwargs)
            answers.append((name, results if firstresult else (results[0] if results else None)))
        return answers

    # -- how answers combine ------------------------------------------------------------------
    def _first(self, hook: str, what: str, **kwargs: Any) -> Any:
        result = getattr(self.pm.hook, hook)(**kwargs)
        if result is None:
            raise PluginError(f"no plugin provides {what}")
        return result

    def _merged(self, hook: str, **kwargs: Any) -> dict[str, Any]:
        """One dict from every plugin's dict; a key given by two plugins is an error naming both."""
        merged: dict[str, Any] = {}
        for result in getattr(self.pm.hook, hook)(**kwargs):
            if not isinstance(result, dict):
                raise PluginError(f"{hook} must return a dict, got {type(result).__name__}"
                                  f" (plugins implementing it: {', '.join(self._implementers(hook))})")
            for key, value in result.items():
                if key in merged:
                    raise PluginError(f"{hook}: plugins {', '.join(map(repr, self._givers(hook, key, kwargs)))}"
                                      f" both returned {key!r}; each key must come from one plugin")
                merged[key] = value
        return merged

    def _implementers(self, hook: str) -> list[str]:
        return [impl.plugin_name for impl in getattr(self.pm.hook, hook).get_hookimpls()]

    def _givers(self, hook: str, key: str, kwargs: dict[str, Any]) -> list[str]:
        """The plugins whose own answer holds ``key`` (asked again one by one: an error path)."""
        return [name for name, answer in self.answers_by_plugin(hook, **kwargs)
                if isinstance(answer, dict) and key in answer] or self._implementers(hook)

    # -- set-up -------------------------------------------------------------------------------
    def add_cli_options(self, parser: Any) -> None:
        self.pm.hook.kdframe_add_cli_options(parser=parser)

    def validate_recipe(self, recipe: Any) -> list[str]:
        return [problem for found in self.pm.hook.kdframe_validate_recipe(recipe=recipe, registry=self.registry)
                for problem in found or []]

    # -- models and data ----------------------------------------------------------------------
    def load_model(self, role: str, spec: Any, task: TaskInfo, teacher: LoadedModel | None,
                   base_dir: str, cache_dir: str) -> LoadedModel:
        return self._first("kdframe_load_model", f"a loader for {role} init {spec.init!r}", role=role, spec=spec,
                           task=task, teacher=teacher, base_dir=base_dir, cache_dir=cache_dir)

    def load_data(self, data: Any, task: TaskInfo, split: str, tokenizer: Any, cache_dir: str) -> TokenizedSplit:
        return self._first("kdframe_load_data", f"data for task {task.name!r}", data=data, task=task, split=split,
                           tokenizer=tokenizer, cache_dir=cache_dir)

    def data_fingerprint(self, data: Any) -> str | None:
        return self.pm.hook.kdframe_data_fingerprint(data=data)

    def compute_metrics(self, task: TaskInfo, predictions: Any, labels: Any) -> dict[str, float]:
        metrics = self._first("kdframe_compute_metrics", f"metrics for task {task.name!r}", task=task,
                              predictions=predictions, labels=labels)
        return {name: float(value) for name, value in metrics.items()}

    def export_model(self, loaded: LoadedModel, out_dir: str, task: TaskInfo, max_length: int) -> str:
        return self._first("kdframe_export_model", "model export", loaded=loaded, out_dir=out_dir, task=task,
                           max_length=max_length)

    def extract_features(self, role: str, loaded: LoadedModel, batch: dict[str, Any],
                         needs: frozenset[str]) -> Features:
        features = self._first("kdframe_extract_features", f"feature extraction for {loaded.description}",
                               role=role, model=loaded.model, batch=batch, needs=extracted(needs))
        return as_needed(features, needs)

    # -- the step -----------------------------------------------------------------------------
    def extra_parameters(self, ctx: StageContext) -> dict[str, Any]:
        return self._merged("kdframe_extra_parameters", ctx=ctx)

    def layer_costs(self, student: Features, teacher: Features, ctx: StageContext,
                    pairs: Callable[[str, int, int], Any] = lambda kind, m, n: None) -> dict[str, Any]:
        return self._merged("kdframe_layer_costs", student=student, teacher=teacher, ctx=ctx, pairs=pairs)

    def layer_mapping(self, kind: str, cost: Any, weights: tuple[Any, Any], ctx: StageContext) -> Any:
        name = ctx.mapping.name if ctx.mapping else "(none)"
        return self._first("kdframe_layer_mapping", f"mapping {name!r} for cost {kind!r}", kind=kind, cost=cost,
                           weights=weights, ctx=ctx)

    def update_layer_weights(self, flows: dict[str, Any], costs: dict[str, Any], weights: dict[str, Any],
                             ctx: StageContext) -> dict[str, Any]:
        return self._first("kdframe_update_layer_weights", f"weighting {ctx.weighting.name!r}", flows=flows,
                           costs=costs, weights=weights, ctx=ctx)

    def loss_terms(self, student: Features, teacher: Features | None, costs: dict[str, Any],
                   flows: dict[str, Any], batch: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
        return self._merged("kdframe_loss_terms", student=student, teacher=teacher, costs=costs, flows=flows,
                            batch=batch, ctx=ctx)

    # -- checkpoint state ---------------------------------------------------------------------
    def state_dict(self, ctx: StageContext) -> dict[str, Any]:
        return self._merged("kdframe_state_dict", ctx=ctx)

    def load_state_dict(self, ctx: StageContext, state: dict[str, Any]) -> None:
        self.pm.hook.kdframe_load_state_dict(ctx=ctx, state=state)

    # -- events -------------------------------------------------------------------------------
    def run_start(self, run: Any) -> None:
        self.pm.hook.kdframe_run_start(run=run)

    def stage_start(self, ctx: StageContext) -> None:
        self.pm.hook.kdframe_stage_start(ctx=ctx)

    def step_end(self, ctx: StageContext, record: dict[str, Any]) -> Control:
        return self._control("kdframe_step_end", ctx=ctx, record=record)

    def eval_end(self, ctx: StageContext, metrics: dict[str, float]) -> Control:
        return self._control("kdframe_eval_end", ctx=ctx, metrics=metrics)

    def _control(self, hook: str, **kwargs: Any) -> Control:
        """What every plugin's answer asks of the engine, together (None asks nothing)."""
        control = Control()
        for result in getattr(self.pm.hook, hook)(**kwargs):
            if not isinstance(result, Control):
                raise PluginError(f"{hook} must return a kdframe.api.Control or None, got {type(result).__name__}"
                                  f" (plugins implementing it: {', '.join(self._implementers(hook))})")
            control |= result
        return control

    def stage_end(self, ctx: StageContext) -> None:
        self.pm.hook.kdframe_stage_end(ctx=ctx)

    def run_end(self, run: Any, summary: dict[str, Any]) -> None:
        self.pm.hook.kdframe_run_end(run=run, summary=summary)

    def on_exception(self, run: Any, exc: BaseException) -> None:
        self.pm.hook.kdframe_on_exception(run=run, exc=exc)


# -- loading --------------------------------------------------------------------------------------

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
    except (Exception, SystemExit) as exc:  # a plugin's own import error (or exit), reported as bad input
        raise PluginError(f"plugin {origin} failed to import: {type(exc).__name__}: {exc}") from exc


def _register(pm: pluggy.PluginManager, plugin: Any, name: str) -> None:
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:  # a hook implemented with wrong arguments
        raise PluginError(f"plugin {name!r} is invalid: {exc}") from None


def _entry_points(autoload: bool, blocked: set[str]) -> list[tuple[importlib.metadata.EntryPoint, bool]]:
    """(entry point, bundled) in registration order: kdframe's own first, then third-party ones,
    each group sorted (by distribution, then name) so that the order never depends on install order.
    A name in ``blocked`` that names no installed plugin is an error (a typo would block nothing)."""
    installed = importlib.metadata.entry_points(group=GROUP)
    unknown = sorted(blocked - {ep.name for ep in installed} - {ep.value for ep in installed})
    if unknown:
        names = ", ".join(sorted(ep.name for ep in installed))
        raise PluginError(f"-p no:{unknown[0]}: no installed plugin is called {unknown[0]!r}, so nothing would be"
                          f" blocked; installed: {names}")
    found = []
    for ep in installed:
        dist_name = ep.dist.name if ep.dist else ""
        bundled = dist_name.lower() == "kdframe"
        if (bundled or autoload) and ep.name not in blocked and ep.value not in blocked:
            found.append((ep, bundled))
    return sorted(found, key=lambda item: (not item[1], (item[0].dist.name if item[0].dist else "").lower(),
                                           item[0].name))


def _calling_plugin(owners: dict[Any, str]) -> Callable[[], str]:
    """A function naming the plugin whose hook implementation is on the call stack (the code
    objects of ``kdframe_register``'s implementations map to their plugins)."""

    def caller() -> str:
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_code in owners:
                return owners[frame.f_code]
            frame = frame.f_back
        return "?"

    return caller


def load_plugins(extra: Iterable[str] = (), objects: Iterable[Any] = ()) -> PluginHost:
    """Load every plugin and their registrations. ``extra`` holds ``-p`` values; ``objects`` are
    plugin objects registered last (inline plugins in tests)."""
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    extra = list(extra)
    blocked = {value[3:] for value in extra if value.startswith("no:")}
    for name in blocked:
        pm.set_blocked(name)
    autoload = not os.environ.get("KDFRAME_DISABLE_PLUGIN_AUTOLOAD")
    infos: list[PluginInfo] = []

    for ep, bundled in _entry_points(autoload, blocked):
        dist_name = ep.dist.name if ep.dist else ""
        if pm.get_plugin(ep.name) is not None:
            raise PluginError(f"two installed plugins use the name {ep.name!r} ({ep.value} from {dist_name})")
        module = _import_plugin(ep.value, f"{ep.name!r} (entry point {ep.value})")
        _register(pm, module, ep.name)
        infos.append(PluginInfo(ep.name, ep.value, ep.dist.version if ep.dist else "-",
                                "bundled" if bundled else "entry point"))

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

    owners = {impl.function.__code__: impl.plugin_name for impl in pm.hook.kdframe_register.get_hookimpls()}
    registry = Registry(_calling_plugin(owners))
    pm.hook.kdframe_register(registry=registry)
    registry.check_sources()
    return PluginHost(pm, infos, registry)
