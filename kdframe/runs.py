"""What the CLI and ablation cells call: start (or resume) a run, export a run's student.

A run: ``prepare`` loads and checks everything, ``plan`` dry-runs each stage's first step (so what
only shows with models loaded fails before a run directory exists or a teacher is trained), then
the run directory is created (or reopened) and the ``Trainer`` runs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import attrs

from kdframe import checkpoint
from kdframe.errors import KdframeError
from kdframe.plan import plan
from kdframe.progress import Progress
from kdframe.recipe import load_recipe, to_plain
from kdframe.rundir import PROGRESS, RECIPE, RunDir
from kdframe.session import Session, prepare
from kdframe.trainer import Trainer


def _same_recipe(session: Session):
    """Whether a stored resolved recipe means the same as the session's (compared structured, so
    a recipe stored by an earlier kdframe, with other defaults spelled out, still matches)."""
    def same(stored: Path) -> bool:
        try:
            earlier = load_recipe(stored, [], session.host.registry)
        except KdframeError:
            return False
        return not earlier.problems and to_plain(earlier.recipe) == to_plain(session.recipe)
    return same


def start_run(recipe_path: str | Path, overrides: list[str], plugin_args: list[str], out: str | None,
              resume: str | None, progress: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    session = prepare(recipe_path, overrides, plugin_args)
    plan(session)
    trainer = Trainer(session, None, Progress(progress), options)  # joins the other processes, if launched so
    if trainer.world > 1 and not (out or resume):
        raise KdframeError(f"a run of {trainer.world} processes needs --out DIR (or --resume DIR):"
                           " every process must use the same run directory")
    if resume:
        run_dir = RunDir.open_for_resume(Path(resume), _same_recipe(session))
    else:
        path = Path(out) if out else Path("runs") / f"{session.recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        # The main process creates the directory; the others take its outcome (and write nothing).
        problem = None
        if trainer.is_main:
            try:
                RunDir.create(path, session.resolved_toml())
            except KdframeError as exc:
                problem = str(exc)
        if problem := trainer.processes.from_main(problem):
            raise KdframeError(problem)
        run_dir = RunDir(path)
    run_dir.writes = trainer.is_main
    trainer.run_dir = run_dir
    if trainer.is_main:
        trainer.progress.status_file = run_dir.path / PROGRESS
    run_dir.write_env(session.recipe.seed, str(trainer.device), [attrs.asdict(info) for info in session.host.infos])
    trainer.progress.message(f"run directory: {run_dir.path.resolve()}")
    return trainer.run(resume=bool(resume))


def export(run_path: str | Path, out_dir: str, plugin_args: list[str] = ()) -> str:
    """Write a finished run's student in its framework's own format (``kdframe_export_model``)."""
    run_dir = Path(run_path)
    weights = run_dir / "student.pt"
    if not (run_dir / RECIPE).exists() or not weights.exists():
        raise KdframeError(f"{run_dir} holds no finished run (needs {RECIPE} and student.pt)")
    session = prepare(run_dir / RECIPE, [], plugin_args, load_data=False)
    session.student.model.load_state_dict(checkpoint.load(weights))
    return session.host.export_model(session.student, out_dir, session.task, session.recipe.data.max_length)
