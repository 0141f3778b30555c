"""What the CLI and ablation cells call: start (or resume) a run, export a run's student.

A run: ``prepare`` loads and checks everything, ``plan`` dry-runs each stage's first step (so what
only shows with models loaded fails before a run directory exists or a teacher is trained), then
the run directory is created (or reopened) and the ``Trainer`` runs.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import attrs

from kdframe import card, checkpoint
from kdframe.caches import cache_root, check_writable, teacher_path
from kdframe.errors import KdframeError, RunFailed
from kdframe.fileio import exclusive_use
from kdframe.plan import plan
from kdframe.progress import Progress
from kdframe.plugins import PluginHost
from kdframe.recipe import RecipeSource, load_recipe, to_plain
from kdframe.rundir import PROGRESS, RECIPE, RUN_LOCK, SUMMARY, RunDir
from kdframe.session import Session, prepare
from kdframe.tracking import Trackers
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


def check_caches(session: Session, say: Any) -> None:
    """What a run writes to the cache must be writable, and a cached fine-tuned teacher must load,
    before the run directory exists: failing after the teacher's fine-tuning, or on a torn cache
    file, would waste the run. A corrupt cached teacher is removed (and fine-tuned again)."""
    recipe = session.recipe
    fine_tunes = session.needs_teacher and session.teacher_stage is not None
    if not (fine_tunes or (recipe.teacher_cache.enabled and recipe.teacher_cache.storage == "disk")):
        return
    check_writable(cache_root(recipe.data), "the run would fail after fine-tuning its teacher")
    if fine_tunes:
        cached = teacher_path(recipe, session.host.data_fingerprint(recipe.data))
        if cached.exists():
            try:
                checkpoint.load(cached)
            except KdframeError as exc:
                cached.unlink()
                say(f"{exc}; removed it: the teacher is fine-tuned again")


def start_run(source: RecipeSource, overrides: list[str], host: PluginHost, out: str | None, resume: str | None,
              progress: str, options: dict[str, Any] | None = None) -> tuple[dict[str, Any], Session, Path]:
    """Run (or resume) the recipe ``source`` (a file or a dict); its summary, session (with the
    trained student) and run directory. ``kdframe.run`` is the public form of this."""
    session = prepare(source, overrides, host=host)
    plan(session)
    trainer = Trainer(session, None, Progress(progress), options)  # joins the other processes, if launched so
    if trainer.is_main:
        check_caches(session, trainer.progress.message)
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
    # Only the main process writes the directory, so only it holds the lock against other runs.
    with exclusive_use(run_dir.path / RUN_LOCK) if trainer.is_main else nullcontext():
        if trainer.is_main:
            trainer.progress.status_file = run_dir.path / PROGRESS
        run_dir.write_env(session.recipe.seed, str(trainer.device), [attrs.asdict(info) for info in session.host.infos])
        trainer.progress.message(f"run directory: {run_dir.path.resolve()}")
        tracking = session.recipe.tracking
        trainer.trackers = Trackers.open(tracking, tracking.project or session.recipe.name,
                                         tracking.run_name or run_dir.path.resolve().name,
                                         Path(tracking.dir) if tracking.dir else run_dir.path / "tracking",
                                         to_plain(session.recipe), trainer.is_main)
        return trainer.run(resume=bool(resume)), session, run_dir.path


def export(run_path: str | Path, out_dir: str, plugin_args: list[str] = (), push_to_hub: str | None = None,
           private: bool = False) -> str:
    """Write a finished run's student in its framework's own format (``kdframe_export_model``) with
    a model card (README.md) beside it; with ``push_to_hub``, upload both to that hub repository."""
    run_dir, out = Path(run_path), Path(out_dir)
    if push_to_hub is not None:
        card.check_repo_id(push_to_hub)
    weights = run_dir / "student.pt"
    if not all((run_dir / name).exists() for name in (RECIPE, SUMMARY, weights.name)):
        raise KdframeError(f"{run_dir} holds no finished run (needs {RECIPE}, {SUMMARY} and {weights.name})")
    if out.exists() and not out.is_dir():
        raise KdframeError(f"export: {out} is a file; give a directory to write the model into")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KdframeError(f"export: cannot create {out}: {exc.strerror}") from None
    session = prepare(run_dir / RECIPE, [], plugin_args, load_data=False)
    session.student.model.load_state_dict(checkpoint.load(weights))
    written = session.host.export_model(session.student, str(out), session.task, session.recipe.data.max_length)
    if not any(out.iterdir()):  # a plugin that said it exported, and wrote nothing
        raise RunFailed(f"export: nothing was written to {out}")
    summary = json.loads((run_dir / SUMMARY).read_text())
    speed = card.measure_speed(session, session.recipe.data.max_length)
    card.write(out, card.render(session, summary, (run_dir / RECIPE).read_text(), speed))
    if push_to_hub is not None:
        return f"{written}\npushed to {card.push_to_hub(out, push_to_hub, private)}"
    return written
