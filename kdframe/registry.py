"""Every name a plugin claims: strategies per slot, tasks, data sources and model sources.

Plugins register their names in ``kdframe_register(registry)``. A name is unique in its kind: a
second plugin claiming one is an error naming both plugins, so no plugin silently shadows
another's strategy, task or source. Each registration records the plugin that made it (the host
tells the registry which hook implementation is calling, see ``kdframe.plugins``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import attrs

from kdframe.errors import PluginError, RecipeError
from kdframe.types import FEATURES, TaskInfo

SLOTS = ("mapping", "weighting", "loss", "control")
_SCHEME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


@attrs.frozen
class NoParams:
    """Params class of a strategy (or data source) that takes none."""


@attrs.frozen
class Strategy:
    """A registered strategy.

    ``needs`` names the features (``kdframe.types.FEATURES``) it reads from both models;
    ``keeps_marginals`` says whether a mapping's flow has the layer weights as marginals;
    ``fixed`` marks a mapping whose flow depends on neither the costs nor the weights (a fixed
    plan of layer pairs); ``needs_marginals`` marks a weighting that divides by the flows'
    marginals, so it needs a mapping that keeps them (or a fixed one, whose weights it cannot
    mislead); ``student_only`` marks a loss term that needs no teacher at all (hard labels);
    ``sparse_flow`` marks a mapping whose flows leave most layer pairs at zero (an optimal
    transport has at most M + N - 1 non-zero pairs, a fixed plan its pairs): the costs may then
    be computed without autograd and the loss backpropagated through the pairs with flow only.
    """

    slot: str
    name: str
    params: type
    plugin: str
    needs: frozenset[str] = frozenset()
    description: str = ""
    keeps_marginals: bool = True
    student_only: bool = False
    fixed: bool = False
    needs_marginals: bool = False
    sparse_flow: bool = False


@attrs.frozen
class DataSource:
    """A source of examples (``data.source`` in a recipe): its own ``[data]`` keys are the fields of
    ``params``, an attrs class, structured and checked like strategy params.

    ``task`` marks a source whose recipes define the task themselves (columns, labels, metrics in
    its keys): ``task(name, params)`` gives the TaskInfo of ``data.task = name``, or raises
    RecipeError with problems that start with the key they are about (``"labels: ..."``).

    ``in_memory`` marks a source that reads datasets handed to ``kdframe.run`` in Python:
    ``in_memory(params, name, splits)`` gives the source's ``[data]`` keys (a dict, as a recipe
    writes them) that read the ``datasets`` object ``name`` of kdframe.memory, a dict of ``train``
    and, when given, ``dev``.
    """

    name: str
    params: type
    plugin: str
    description: str = ""
    task: Callable[[str, Any], TaskInfo] | None = None
    in_memory: Callable[[dict[str, Any], str, list[str]], dict[str, Any]] | None = None


@attrs.frozen
class Task:
    """A named task (``data.task``): what it is (``info``) and the data source that reads it."""

    info: TaskInfo
    source: str
    plugin: str

    @property
    def name(self) -> str:
        return self.info.name


@attrs.frozen
class ModelSource:
    """A scheme of model and tokenizer locations, ``NAME:rest`` (e.g. ``package:NAME``), that a
    loader plugin understands. Recipe values with a registered scheme are never taken as paths."""

    name: str
    plugin: str
    description: str = ""


class Registry:
    def __init__(self, caller: Callable[[], str] = lambda: "?") -> None:
        self._strategies: dict[str, dict[str, Strategy]] = {slot: {} for slot in SLOTS}
        self._data_sources: dict[str, DataSource] = {}
        self._tasks: dict[str, Task] = {}
        self._model_sources: dict[str, ModelSource] = {}
        self._caller = caller  # the plugin whose hook implementation is calling

    def _claim(self, table: dict[str, Any], kind: str, name: str) -> str:
        """The calling plugin's name, once ``name`` is known to be free in ``table``."""
        plugin = self._caller()
        taken = table.get(name)
        if taken is not None:
            raise PluginError(f"{kind} {name!r} is registered by two plugins, {taken.plugin!r} and {plugin!r};"
                              " uninstall one, or block it with -p no:NAME")
        return plugin

    def _check_params(self, plugin: str, what: str, params: type) -> None:
        if not attrs.has(params):
            raise PluginError(f"plugin {plugin!r}: params of {what} must be an attrs class, got {params!r}")

    # -- registering ----------------------------------------------------------------------------
    def add(
        self,
        slot: str,
        name: str,
        params: type = NoParams,
        *,
        needs: Iterable[str] = (),
        description: str = "",
        keeps_marginals: bool = True,
        student_only: bool = False,
        fixed: bool = False,
        needs_marginals: bool = False,
        sparse_flow: bool = False,
    ) -> Strategy:
        """Register the strategy ``name`` in ``slot`` (mapping, weighting, loss or control: a
        control watches a stage through the event hooks and may stop it, see ``Control``)."""
        if slot not in self._strategies:
            raise PluginError(f"plugin {self._caller()!r} registers {name!r} in unknown slot {slot!r};"
                              f" slots are: {', '.join(SLOTS)}")
        plugin = self._claim(self._strategies[slot], f"{slot} strategy", name)
        self._check_params(plugin, f"{slot} strategy {name!r}", params)
        unknown = set(needs) - set(FEATURES)
        if unknown:
            raise PluginError(f"plugin {plugin!r}: {slot} strategy {name!r} needs unknown features"
                              f" {sorted(unknown)}; known: {', '.join(FEATURES)}")
        strategy = Strategy(slot, name, params, plugin, frozenset(needs), description, keeps_marginals, student_only,
                            fixed, needs_marginals, sparse_flow)
        self._strategies[slot][name] = strategy
        return strategy

    def add_data_source(self, name: str, params: type = NoParams, *, description: str = "",
                        task: Callable[[str, Any], TaskInfo] | None = None,
                        in_memory: Callable[[dict[str, Any], str, list[str]], dict[str, Any]] | None = None
                        ) -> DataSource:
        """Register the data source ``name``; ``params`` declares its own keys of ``[data]``;
        ``task`` (see DataSource) lets recipes define their task in those keys; ``in_memory``
        lets it read datasets handed to ``kdframe.run``."""
        plugin = self._claim(self._data_sources, "data source", name)
        self._check_params(plugin, f"data source {name!r}", params)
        self._data_sources[name] = source = DataSource(name, params, plugin, description, task, in_memory)
        return source

    def add_task(self, info: TaskInfo, *, source: str) -> Task:
        """Register the task ``info.name``, read by the data source ``source``."""
        plugin = self._claim(self._tasks, "task", info.name)
        self._tasks[info.name] = task = Task(info, source, plugin)
        return task

    def add_model_source(self, name: str, *, description: str = "") -> ModelSource:
        """Register the location scheme ``name`` (values ``name:...``) as one this plugin loads."""
        plugin = self._claim(self._model_sources, "model source", name)
        if len(name) < 2 or not set(name) <= _SCHEME_CHARS or not name[0].isalpha():
            raise PluginError(f"plugin {plugin!r}: model source {name!r} must be a lowercase name of at least"
                              " two letters, digits, '-' or '_' (it is written as NAME:... in recipes)")
        self._model_sources[name] = source = ModelSource(name, plugin, description)
        return source

    def check_sources(self) -> None:
        """Every task names a registered data source (called once all plugins have registered)."""
        for task in self._tasks.values():
            if task.source not in self._data_sources:
                raise PluginError(f"plugin {task.plugin!r}: task {task.name!r} names data source {task.source!r},"
                                  f" which no plugin registered; known: {', '.join(sorted(self._data_sources)) or '(none)'}")

    # -- looking up -----------------------------------------------------------------------------
    def get(self, slot: str, name: str, path: str = "") -> Strategy:
        try:
            return self._strategies[slot][name]
        except KeyError:
            known = ", ".join(sorted(self._strategies.get(slot, {}))) or "(none)"
            where = f"{path}: " if path else ""
            raise RecipeError([f"{where}unknown {slot} strategy {name!r}; known: {known}"]) from None

    def names(self, slot: str) -> list[str]:
        return sorted(self._strategies[slot])

    def all(self) -> list[Strategy]:
        return [s for slot in SLOTS for s in self._strategies[slot].values()]

    def task(self, name: str) -> Task | None:
        return self._tasks.get(name)

    def task_info(self, data: Any) -> TaskInfo:
        """The task of a resolved ``[data]`` (see ``recipe.resolve_data``): a registered one, or the
        one its source defines from its keys."""
        source = self._data_sources[data.source]
        return source.task(data.task, data.params) if source.task else self._tasks[data.task].info

    def tasks(self) -> list[Task]:
        return list(self._tasks.values())

    def data_source(self, name: str) -> DataSource | None:
        return self._data_sources.get(name)

    def data_sources(self) -> list[DataSource]:
        return list(self._data_sources.values())

    def model_sources(self) -> list[ModelSource]:
        return list(self._model_sources.values())

    def by_plugin(self, plugin: str) -> list[str]:
        """What ``plugin`` registered, as ``kind:name`` labels (for ``kdframe plugins``)."""
        return ([f"{s.slot}:{s.name}" for s in self.all() if s.plugin == plugin]
                + [f"data-source:{s.name}" for s in self._data_sources.values() if s.plugin == plugin]
                + [f"model-source:{s.name}" for s in self._model_sources.values() if s.plugin == plugin]
                + [f"task:{t.name}" for t in self._tasks.values() if t.plugin == plugin])
