"""A session: a recipe with its plugins, models and data loaded, and everything checked.

``prepare`` is the one place where input is validated: every problem it finds is bad input
(exit 2) and none of them can surface after training started.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import attrs

from kdframe.caches import cache_root, check_writable
from kdframe.errors import RecipeError
from kdframe.plugins import PluginHost, load_plugins
from kdframe.recipe import LoadedRecipe, Recipe, RecipeSource, ResolvedStage, load_recipe, recipe_origin, to_plain
from kdframe.rundir import recipe_toml
from kdframe.types import LoadedModel, TaskInfo, TokenizedSplit, extracted


@attrs.define
class Session:
    """A recipe with everything it needs loaded and checked."""

    recipe: Recipe
    recipe_path: Path | None  # None: a recipe given in Python (as a dict)
    host: PluginHost
    stages: list[ResolvedStage]
    teacher_stage: ResolvedStage | None
    task: TaskInfo
    teacher: LoadedModel | None = None
    student: LoadedModel | None = None
    train: TokenizedSplit | None = None
    dev: TokenizedSplit | None = None

    @property
    def needs_teacher(self) -> bool:
        return any(stage.needs_teacher(self.host.registry) for stage in self.stages)

    def resolved_toml(self) -> str:
        return recipe_toml(to_plain(self.recipe))


def check_recipe(source: RecipeSource, overrides: list[str], host: PluginHost, here: bool = True) -> LoadedRecipe:
    """The recipe with ``overrides`` applied, checked as far as it can be without loading models
    or data (structure, plugins' checks, and with ``here`` the device: False where it will run on
    another machine, a Ray worker's); its problems raise one RecipeError."""
    loaded = load_recipe(source, list(overrides), host.registry)
    recipe, problems = loaded.recipe, list(loaded.problems)
    problems += host.validate_recipe(recipe)
    needs_cuda = {"precision: 'fp16' needs a CUDA device; use 'bf16' or 'fp32' on the CPU": recipe.precision == "fp16",
                  "device: 'cuda' asked for, but no CUDA device is available": recipe.device == "cuda"}
    if here and any(needs_cuda.values()) and not _cuda_available():
        problems += [problem for problem, needed in needs_cuda.items() if needed]
    if problems:
        raise RecipeError(problems, source=recipe_origin(source))
    return loaded


def prepare(source: RecipeSource, overrides: list[str] = (), plugin_args: list[str] = (),
            load_data: bool = True, host: PluginHost | None = None) -> Session:
    """Load plugins (unless ``host`` is given), the recipe (a file or a dict), models and data;
    every problem is bad input."""
    host = host or load_plugins(plugin_args)
    loaded = check_recipe(source, overrides, host)
    recipe = loaded.recipe
    from kdframe import checkpoint  # torch: a recipe with problems is refused without it

    task = host.registry.task_info(recipe.data)
    recipe_path = None if isinstance(source, Mapping) else Path(source).resolve()
    session = Session(recipe, recipe_path, host, loaded.stages, loaded.teacher_stage, task)
    checkpoint.seed_everything(recipe.seed)  # random-init models must not depend on what ran before
    base_dir = str(recipe_path.parent if recipe_path else Path.cwd())
    cache_dir = str(cache_root(recipe.data))
    session.teacher = host.load_model("teacher", recipe.teacher, task, None, base_dir, cache_dir)
    session.student = host.load_model("student", recipe.student, task, session.teacher, base_dir, cache_dir)
    problems = feature_problems(session) + length_problems(session)
    if problems:
        raise RecipeError(problems, source=recipe_origin(source))
    if load_data:
        check_writable(Path(cache_dir), "the data is read and tokenised into it")
        session.train = host.load_data(recipe.data, task, "train", session.student.tokenizer, cache_dir)
        session.dev = host.load_data(recipe.data, task, "dev", session.student.tokenizer, cache_dir)
        start_regression_head(session)
    return session


def start_regression_head(session: Session) -> None:
    """``student.head_bias = "label-mean"``: a new regression head predicts the training labels'
    mean from the first step (its weights stay small and random), instead of 0."""
    import pyarrow.compute as pc
    import torch

    head = session.student.fresh_head
    if not session.task.is_regression or session.recipe.student.head_bias != "label-mean" or head is None \
            or head.bias is None or not len(session.train):
        return
    mean = pc.mean(session.train.table.column("labels")).as_py()
    with torch.no_grad():
        head.bias.fill_(mean)
    session.student.description += f"; regression head's bias at the training labels' mean ({mean:.4g})"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def length_problems(session: Session) -> list[str]:
    """``data.max_length`` within what both models' position embeddings take."""
    asked = session.recipe.data.max_length
    return [f"data.max_length: {asked} tokens is longer than the {role} takes ({loaded.max_length}:"
            f" {loaded.description}); set data.max_length to at most {loaded.max_length}"
            for role, loaded in (("teacher", session.teacher), ("student", session.student))
            if loaded.max_length is not None and asked > loaded.max_length]


FEATURE_NAMES = {"attn": "attention scores", "hidden": "hidden states", "cls": "[CLS] vectors", "logits": "logits"}


def feature_problems(session: Session) -> list[str]:
    """What the stages read that a model cannot give (a family without attention capture), each
    naming the stage's term (or strategy), the model and the terms that would work with both."""
    registry = session.host.registry
    models = {"teacher": session.teacher, "student": session.student}
    both = session.teacher.features & session.student.features
    workable = ", ".join(s.name for s in registry.all() if s.slot == "loss" and extracted(s.needs) <= both) or "(none)"
    problems = []
    for i, stage in enumerate(session.stages):
        if not stage.needs_teacher(registry):
            continue
        chosen = [("mapping", "mapping", stage.mapping), ("weighting", "weighting", stage.weighting),
                  *((f"losses.{name}", "loss", choice) for name, choice in stage.losses.items())]
        for where, slot, choice in chosen:
            if choice is None:
                continue
            for feature in sorted(registry.get(slot, choice.name).needs):
                for role, loaded in models.items():
                    if not extracted(frozenset({feature})) <= loaded.features:
                        problems.append(f"stages[{i}].{where}: {choice.name!r} reads {FEATURE_NAMES[feature]}, which"
                                        f" the {role} does not give ({loaded.description}); terms that work with"
                                        f" these models: {workable}")
    return problems
