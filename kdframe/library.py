"""kdframe from Python: ``kdframe.run`` distils as ``kdframe run`` does (the command calls it), and
takes models, a tokenizer and datasets held in memory in place of the recipe's sources.

    import kdframe
    result = kdframe.run("recipes/emd_text.toml", teacher=model, tokenizer=tokenizer, train=train, dev=dev)
    result.summary["student"]["best"], result.student.save_pretrained("student"), result.run_dir

The objects become ``memory:KIND-DIGEST`` names in the resolved recipe (kdframe.memory): the
recipe stays data, its run directory is an ordinary one, and the same objects give the same
recipe again (a resume, a cache hit).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from kdframe import memory
from kdframe.errors import KdframeError, RecipeError

if TYPE_CHECKING:
    import datasets
    import torch

    from kdframe.plugins import PluginHost
    from kdframe.recipe import Recipe


@attrs.frozen
class RunResult:
    """What a finished run gives back."""

    summary: dict[str, Any]  # summary.json: scores of teacher and student, stages, parameters, times
    student: torch.nn.Module  # the trained student (a transformers model for transformers students), on the CPU
    run_dir: Path  # the run directory (checkpoints, metrics.jsonl, ...); `kdframe export` takes it


def run(recipe: str | Path | Mapping[str, Any] | Recipe, *, overrides: Sequence[str] = (),
        teacher: torch.nn.Module | None = None, student: torch.nn.Module | None = None, tokenizer: Any = None,
        train: datasets.Dataset | None = None, dev: datasets.Dataset | None = None, out: str | Path | None = None,
        resume: str | Path | None = None, progress: str = "auto", plugins: Sequence[str] = (),
        options: dict[str, Any] | None = None) -> RunResult:
    """Run ``recipe`` (a TOML file, a dict as the file would read, or a ``kdframe.recipe.Recipe``).

    ``overrides`` are ``--set`` assignments (``"stages[0].epochs=1"``). ``teacher`` and ``student``
    (transformers sequence-classification models) replace the recipe's models, ``tokenizer`` its
    tokenizer; ``train`` and ``dev`` (``datasets.Dataset``) replace where its data source reads
    examples, keeping its columns, labels and metrics (the ``text`` source can; without ``dev``,
    ``data.dev_fraction`` holds out part of ``train``). The objects passed are not changed: the
    run trains copies. ``out`` is the run directory (default ``runs/NAME-TIME``); ``resume``
    continues an interrupted run there (pass the same recipe and objects). ``progress``: ``auto``,
    ``rich``, ``plain`` or ``off``; ``plugins``: ``-p`` modules. Bad input raises a
    ``kdframe.errors.KdframeError`` (the CLI's exit 2) before anything is written.
    """
    from kdframe.plugins import load_plugins
    from kdframe.runs import start_run

    if out is not None and resume is not None:
        raise KdframeError("out and resume cannot be used together: resume=DIR continues the run in DIR")
    host = load_plugins(list(plugins))
    source, overrides = _with_objects(recipe, list(overrides), host, teacher, student, tokenizer, train, dev)
    summary, session, run_dir = start_run(source, overrides, host, None if out is None else str(out),
                                          None if resume is None else str(resume), progress,
                                          {"overrides": overrides, "plugins": list(plugins), **(options or {})})
    model = session.student.model
    return RunResult(summary, getattr(model, "module", model).to("cpu").eval(), run_dir)


def _with_objects(recipe: Any, overrides: list[str], host: PluginHost, teacher: Any, student: Any, tokenizer: Any,
                  train: Any, dev: Any) -> tuple[Any, list[str]]:
    """The recipe to run: as given when no object replaces a source; else the recipe resolved (its
    overrides applied, paths absolute) as a dict, with the objects' ``memory:`` names in it."""
    from kdframe.recipe import Recipe, load_recipe, to_plain

    if attrs.has(type(recipe)):
        if not isinstance(recipe, Recipe):
            raise KdframeError(f"recipe: a file, a dict or a kdframe.recipe.Recipe, not a {type(recipe).__name__}")
        recipe = to_plain(recipe)
    if all(obj is None for obj in (teacher, student, tokenizer, train, dev)):
        return recipe, overrides
    if dev is not None and train is None:  # before anything is hashed or loaded
        raise KdframeError("dev= without train=: pass the training examples too")
    loaded = load_recipe(recipe, overrides, host.registry)
    plain = to_plain(loaded.recipe)
    if tokenizer is not None:
        plain["teacher"]["tokenizer"] = memory.put("tokenizer", tokenizer)
    for role, model in (("teacher", teacher), ("student", student)):
        if model is not None:
            plain[role].update(init="pretrained", model=memory.put("model", model), layers=[], config={})
    if train is not None:
        plain["data"] = _with_datasets(loaded.recipe.data, plain["data"], host, {"train": train, "dev": dev})
    return plain, []


def _with_datasets(data: Any, plain: dict[str, Any], host: PluginHost, splits: dict[str, Any]) -> dict[str, Any]:
    """``[data]`` reading ``splits`` through its data source's ``in_memory`` (refused for a source
    registered without one)."""
    from kdframe.recipe import to_plain

    source = host.registry.data_source(data.source)
    if source is None or source.in_memory is None:
        able = ", ".join(sorted(s.name for s in host.registry.data_sources() if s.in_memory)) or "(none)"
        raise RecipeError([f"data.source: {data.source!r} cannot read datasets passed to kdframe.run; sources that"
                           f" can: {able} (set data.source and its columns and labels)"])
    splits = {name: dataset for name, dataset in splits.items() if dataset is not None}
    own = to_plain(data.params) if attrs.has(type(data.params)) else dict(data.params)
    common = {key: value for key, value in plain.items() if key not in own}
    return {**common, **source.in_memory(own, memory.put("datasets", splits), list(splits))}
