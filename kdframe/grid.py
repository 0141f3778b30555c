"""Grid files of ``kdframe ablate`` (docs/ablation.md), their cells, and the state file names.

Nothing here imports torch: ``kdframe report`` reads ablation directories with it alone.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import attrs

from kdframe.errors import KdframeError, RecipeError
from kdframe.recipe import PLAIN_NAME, bounded, read_toml, structure

STATE = "ablation.json"

Cell = dict[str, Any]  # as stored in the state file: definition + status


@attrs.frozen
class Resources:
    """What one cell asks of a Ray cluster (``--on ray``); the local executor runs one cell per
    process whatever they say. Unset keys of a variant's table take the grid's."""

    cpus: float | None = bounded(None, gt=0)  # CPU cores (and the cell's torch threads); grid default 1
    gpus: float | None = bounded(None, ge=0)  # GPUs; grid default 0
    memory_gb: float | None = bounded(None, ge=0)  # memory Ray reserves for the cell, in GiB; 0 (default): none reserved
    max_retries: int | None = bounded(None, ge=0)  # times a cell is run again when its worker process or node dies; grid default 3

    def over(self, base: "Resources") -> "Resources":
        """These values where set, else ``base``'s."""
        return Resources(**{f.name: base_value if (value := getattr(self, f.name)) is None else value
                            for f, base_value in zip(attrs.fields(Resources), attrs.astuple(base))})


#: A grid's resources where its file does not set them.
DEFAULT_RESOURCES = Resources(cpus=1, gpus=0, memory_gb=0, max_retries=3)


@attrs.frozen
class Variant:
    recipe: str = ""  # a recipe file used instead of the grid's base
    set: list[str] = attrs.Factory(list)
    resources: Resources = Resources()  # this variant's cells' requests on Ray (unset keys: the grid's)


@attrs.frozen
class Axes:
    tasks: list[str]
    seeds: list[int]


@attrs.frozen
class Grid:
    axes: Axes
    variants: dict[str, Variant]
    base: str = ""
    name: str = "ablation"
    set: list[str] = attrs.Factory(list)
    tasks_set: dict[str, list[str]] = attrs.Factory(dict)
    resources: Resources = Resources()  # every cell's requests on Ray (unset keys: DEFAULT_RESOURCES)

    def resources_of(self, cell: Cell) -> Resources:
        return self.variants[cell["variant"]].resources.over(self.resources.over(DEFAULT_RESOURCES))


# -- the grid -----------------------------------------------------------------------------------

def load_grid(path: Path) -> Grid:
    """Structure a grid file; every problem (with its path) is reported at once as a RecipeError."""
    if not path.is_file():
        raise KdframeError(f"grid file not found: {path.resolve()}")
    grid, problems = structure(read_toml(path), Grid)
    if grid is not None:
        problems += _grid_problems(grid, path.resolve().parent)
    if problems:
        raise RecipeError(problems, source=str(path.resolve()))
    return grid


def _grid_problems(grid: Grid, here: Path) -> list[str]:
    problems = []
    if not grid.variants:
        problems.append("variants: give at least one [variants.NAME] table")
    for where, values in (("axes.tasks", grid.axes.tasks), ("axes.seeds", grid.axes.seeds)):
        if not values:
            problems.append(f"{where}: give at least one")
        problems += [f"{where}: {v!r} is listed twice" for i, v in enumerate(values) if v in values[:i]]
    for where, names in (("axes.tasks", grid.axes.tasks), ("variants", grid.variants)):
        problems += [f"{where}: {name!r} cannot name a directory (use letters, digits, '_', '-', '.')"
                     for name in names if not PLAIN_NAME.match(name)]
    problems += [f"tasks_set.{task}: {task!r} is not in axes.tasks" for task in grid.tasks_set
                 if task not in grid.axes.tasks]
    recipes = [("base", grid.base)] + [(f"variants.{n}.recipe", v.recipe) for n, v in grid.variants.items()]
    problems += [f"{where}: recipe file not found: {(here / file).resolve()}" for where, file in recipes
                 if file and not (here / file).is_file()]
    if not grid.base:
        problems += [f"variants.{n}: no recipe, and the grid has no base recipe" for n, v in grid.variants.items()
                     if not v.recipe]
    return problems


def grid_cells(grid: Grid, here: Path) -> list[Cell]:
    """Cells in a stable order: tasks, then seeds, then variants (as written), so an interrupted
    grid has compared every variant on a task before it repeats them with more seeds."""
    cells = []
    for task in grid.axes.tasks:
        for seed in grid.axes.seeds:
            for name, variant in grid.variants.items():
                recipe = (here / (variant.recipe or grid.base)).resolve()
                overrides = [*grid.set, *grid.tasks_set.get(task, []), *variant.set,
                             f"data.task={json.dumps(task)}", f"seed={seed}"]
                cells.append({"task": task, "variant": name, "seed": seed, "recipe": str(recipe),
                              "overrides": overrides, "dir": f"cells/{task}/{name}/seed{seed}",
                              "status": "pending", "error": None, "wall_time_s": None})
    return cells


def cell_label(cell: Cell) -> str:
    return f"{cell['task']}/{cell['variant']}/seed{cell['seed']}"


def parse_shard(shard: str | None) -> tuple[int, int]:
    if shard is None:
        return 0, 1
    match = re.fullmatch(r"(\d+)/(\d+)", shard.strip())
    if not match or not int(match[1]) < int(match[2]):
        raise KdframeError(f"--shard {shard!r}: expected I/N with 0 <= I < N, e.g. 0/2")
    return int(match[1]), int(match[2])


def state_file_name(shard: str | None) -> str:
    if shard is None:
        return STATE
    index, count = parse_shard(shard)
    return f"ablation.shard-{index}-of-{count}.json"


def state_files(root: Path) -> list[Path]:
    """Every state file in an ablation directory (one, or one per shard)."""
    return sorted(p for p in root.glob("ablation*.json") if p.name == STATE or p.name.startswith("ablation.shard-"))
